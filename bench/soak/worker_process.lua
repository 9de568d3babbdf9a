-- The soak's worker: <domain> <concurrency> <seconds> <retention interval>.
-- Runs with the library's defaults (poll interval 1 s, retention on), then
-- drains, and prints `health <JSON>`.
local commandbus = require "commandbus"
local cjson = require "cjson"
local socket = require "socket"
local domain, concurrency, seconds, interval = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4])
local bus = assert(commandbus.connect())
local worker = assert(bus:worker{domain = domain, handlers = "bench.soak.handlers", concurrency = concurrency,
                                 retention = {interval = interval}})
local deadline = socket.gettime() + seconds
worker:run{tick_interval = 0.5, tick = function() return socket.gettime() < deadline end}
io.write("health ", cjson.encode(worker:health()), "\n")
worker:close()
bus:close()
