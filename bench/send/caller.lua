-- One Lua caller of bench/send:
--   caller.lua <domain> <start_at> <seconds>
-- Connects and sends 50 commands (the statements get prepared), waits until
-- the wall clock reaches <start_at> (socket.gettime() seconds, so that the
-- callers of a run start together), then calls bus:send, one command each,
-- for <seconds>, and prints "sent <n> warm 50 <t0> <t1>", t0 and t1 the
-- wall-clock times its loop started and ended.
local commandbus = require "commandbus"
local socket = require "socket"

local domain, start_at, seconds = arg[1], tonumber(arg[2]), tonumber(arg[3])
local bus = assert(commandbus.connect(nil, {application_name = "bench_send_lua",
                                            notify_after_commit = os.getenv("BENCH_SEND_NOTIFY_AFTER") == "1"}))
local WARM = 50
for i = 1, WARM do assert(bus:send{domain = domain, type = "Noop", data = {n = i}}) end
local wait = start_at - socket.gettime()
if wait > 0 then socket.sleep(wait) end
local stop_at, n = start_at + seconds, 0
local t0 = socket.gettime()
while socket.gettime() < stop_at do
  for _ = 1, 10 do
    n = n + 1
    assert(bus:send{domain = domain, type = "Noop", data = {n = n}})
  end
end
local t1 = socket.gettime()
bus:close()
io.write(("sent %d warm %d %.6f %.6f\n"):format(n, WARM, t0, t1))
