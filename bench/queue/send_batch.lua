-- q:send_batch of N small messages in one call, timed from the Lua side
-- (encoding each message, joining the array, the round trip): run by
-- bench_queue under each interpreter, it prints the best of R runs as
-- "<messages per second> <seconds>". Usage: send_batch.lua [N] [R]
local commandbus = require "commandbus"
local gettime = require("socket").gettime

local n, runs = tonumber(arg[1]) or 30000, tonumber(arg[2]) or 3
local bus = assert(commandbus.connect(os.getenv("DATABASE_URL")))
local q = assert(bus:queue(("bench_queue_lua_%d"):format(math.random(1, 1e9))))
local messages = {}
for i = 1, n do messages[i] = {kind = "bench", n = i, body = "a small message of about sixty bytes"} end
local best = math.huge
for _ = 1, runs do
  assert(q:create())
  local t0 = gettime()
  local ids = assert(q:send_batch(messages))
  local took = gettime() - t0
  assert(#ids == n)
  if took < best then best = took end
  assert(q:drop())
end
bus:close()
print(("%.0f %.4f"):format(n / best, best))
