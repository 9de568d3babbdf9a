-- One sending process for the two-process send_batch run of bench/throughput:
--   send_process.lua <domain> <count> <start_at>
-- Builds <count> command tables and connects first, waits until the wall
-- clock reaches <start_at> (socket.gettime() seconds, set by the parent so
-- that both processes start together), sends them with one send_batch (the
-- same call as the one-process run), then prints
--   sent <count> <t0> <t1>
-- with the wall-clock times the call started and returned.
local commandbus = require "commandbus"
local socket = require "socket"
local domain, count, start_at = arg[1], tonumber(arg[2]), tonumber(arg[3])
local bus = assert(commandbus.connect())
local commands = {}
for i = 1, count do commands[i] = {type = "Noop", data = {n = i}} end
local wait = start_at - socket.gettime()
if wait > 0 then socket.sleep(wait) end
local t0 = socket.gettime()
local res = assert(bus:send_batch{domain = domain, commands = commands})
local t1 = socket.gettime()
assert(#res == count)
bus:close()
io.write(("sent %d %.6f %.6f\n"):format(count, t0, t1))
