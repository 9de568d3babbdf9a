-- Run as a separate OS process by specs: waits, sends one message to a
-- queue through its own bus, and writes the wall-clock send time (after
-- commit) to a file.  Usage: send_later.lua <queue> <delay_s> <out_file>
local commandbus = require "commandbus"
local socket = require "socket"
local queue, delay, out = arg[1], tonumber(arg[2]), arg[3]
local bus = assert(commandbus.connect())
local q = assert(bus:queue(queue))
socket.sleep(delay)
assert(q:send({from = "another process"}))
local sent_at = socket.gettime()
local f = assert(io.open(out, "w"))
f:write(string.format("%.6f", sent_at))
f:close()
bus:close()
