-- Run as a separate OS process by specs: at the given wall-clock time, sets
-- up the database at <url> and sends one command to <domain>, then prints
-- "result: ok" or "result: <error>" as its last line.
-- Usage: setup_and_send.lua <url> <start_at> <domain>
local commandbus = require "commandbus"
local socket = require "socket"
local url, start_at, domain = arg[1], tonumber(arg[2]), arg[3]
local bus = assert(commandbus.connect(url))
socket.sleep(math.max(0, start_at - socket.gettime()))
local ok, err = bus:setup()
if ok then ok, err = bus:send{domain = domain, type = "Echo"} end
bus:close()
print("result: " .. (ok and "ok" or tostring(err)))
