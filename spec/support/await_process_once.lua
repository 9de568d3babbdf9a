-- Run as a separate OS process: awaits one process and writes the
-- wall-clock time it woke and the status it saw.
--   await_process_once.lua <domain> <process_id> <out_file>
local commandbus = require "commandbus"
local socket = require "socket"
local bus = assert(commandbus.connect())
local p, err = bus:await_process(arg[1], arg[2], {timeout = 30})
local f = assert(io.open(arg[3], "w"))
f:write(string.format("%.6f %s", socket.gettime(), p and p.status or tostring(err)))
f:close()
bus:close()
