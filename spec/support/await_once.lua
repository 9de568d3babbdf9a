-- Run as a separate OS process: awaits one command and writes the
-- wall-clock time it woke and the status it saw.
--   await_once.lua <domain> <command_id> <out_file>
local commandbus = require "commandbus"
local socket = require "socket"
local bus = assert(commandbus.connect())
local cmd, err = bus:await(arg[1], arg[2], {timeout = 20})
local f = assert(io.open(arg[3], "w"))
f:write(string.format("%.6f %s", socket.gettime(), cmd and cmd.status or tostring(err)))
f:close()
bus:close()
