-- A worker in its own OS process that runs a fixed time, for specs of the
-- background jobs (retention, schedules) shared by several processes:
--   upkeep_process.lua <domain> <seconds> <retention interval> [handlers module]
-- Prints one line at the end: `health <JSON of worker:health()>`.
local commandbus = require "commandbus"
local cjson = require "cjson"
local socket = require "socket"
local domain, seconds, interval, module = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4]
local bus = assert(commandbus.connect())
local worker = assert(bus:worker{domain = domain, handlers = module or "spec.support.handlers", concurrency = 2,
                                 poll_interval = 0.1, retention = {interval = interval}})
local deadline = socket.gettime() + seconds
worker:run{tick_interval = 0.05, tick = function() return socket.gettime() < deadline end}
io.write("health ", cjson.encode(worker:health()), "\n")
worker:close()
bus:close()
