-- Our worker process for bench/peers:
--   cb_worker.lua burn <domain> <concurrency> <start_at>
--     connects and builds the worker (no-op module handlers) first, starts
--     it when the wall clock reaches <start_at> (socket.gettime() seconds,
--     so that every process of a run starts together), runs until the
--     domain's queue is empty, then prints "worked <t0> <t1>".
--   cb_worker.lua serve <domain>
--     runs bench.peers.signal_handlers with concurrency 1, prints "ready"
--     once running, and runs until a Stop command stops it.
local commandbus = require "commandbus"
local socket = require "socket"

local mode, domain = arg[1], arg[2]
local bus = assert(commandbus.connect())
local queue = assert(bus:queue(domain .. "__commands"))

if mode == "burn" then
  local concurrency, start_at = tonumber(arg[3]), tonumber(arg[4])
  local worker = assert(bus:worker{domain = domain, handlers = "bench.throughput.noop_handlers",
                                   concurrency = concurrency, poll_interval = 0.05})
  local wait = start_at - socket.gettime()
  if wait > 0 then socket.sleep(wait) end
  local t0 = socket.gettime()
  -- Done once the queue is empty (a completed command's message is
  -- deleted). The queue's length is a count over it, which at 50,000
  -- messages costs PostgreSQL about as much as receiving a hundred: it is
  -- asked only when this worker holds nothing (health().held: received and
  -- not yet acknowledged), so that the run measures the worker
  -- (graphile-worker's runOnce asks nothing either).
  worker:run{tick_interval = 0.02, tick = function()
    return assert(worker:health()).held > 0 or assert(queue:metrics()).queue_length > 0
  end}
  local t1 = socket.gettime()
  worker:close()
  io.write(("worked %.6f %.6f\n"):format(t0, t1))
elseif mode == "serve" then
  local worker = assert(bus:worker{domain = domain, handlers = "bench.peers.signal_handlers", concurrency = 1})
  local ready = false
  worker:run{tick_interval = 0.05, tick = function()
    if not ready then
      io.write("ready\n")
      io.flush()
      ready = true
    end
    return true
  end}
  worker:close()
else
  error("usage: cb_worker.lua burn <domain> <concurrency> <start_at> | serve <domain>")
end
bus:close()
