-- Run as a separate OS process: awaits one command or process and writes
-- the wall-clock time it woke and the status it saw.
--   await_elsewhere.lua command|process <domain> <id> <out_file>
local commandbus = require "commandbus"
local socket = require "socket"
local kind, domain, id, out = arg[1], arg[2], arg[3], arg[4]
local bus = assert(commandbus.connect())
local record, err
if kind == "process" then record, err = bus:await_process(domain, id, {timeout = 30})
else record, err = bus:await(domain, id, {timeout = 30}) end
local f = assert(io.open(out, "w"))
f:write(string.format("%.6f %s", socket.gettime(), record and record.status or tostring(err)))
f:close()
bus:close()
