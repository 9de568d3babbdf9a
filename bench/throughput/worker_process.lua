-- One worker process for the two-process run of bench/throughput:
--   worker_process.lua <domain> <concurrency> <total>
-- Runs until every command of the domain has completed.
local commandbus = require "commandbus"
local domain, concurrency, total = arg[1], tonumber(arg[2]), tonumber(arg[3])
local bus = assert(commandbus.connect())
local worker = assert(bus:worker{domain = domain, handlers = "bench.throughput.noop_handlers",
                                 concurrency = concurrency, poll_interval = 0.05})
local q = assert(bus:queue(domain .. "__commands"))
-- Done once the queue is empty (a completed command's message is deleted);
-- its length, a count over the queue, is asked only when this worker holds
-- nothing (health().held; see bench/peers/cb_worker.lua).
worker:run{tick_interval = 0.05, tick = function()
  return assert(worker:health()).held > 0 or assert(q:metrics()).queue_length > 0
end}
bus:close()
