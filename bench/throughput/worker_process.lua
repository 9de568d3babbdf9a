-- One worker process for the two-process run of bench/throughput:
--   worker_process.lua <domain> <concurrency> <total>
-- Runs until every command of the domain has completed.
local commandbus = require "commandbus"
local domain, concurrency, total = arg[1], tonumber(arg[2]), tonumber(arg[3])
local bus = assert(commandbus.connect())
local worker = assert(bus:worker{domain = domain, handlers = "bench.throughput.noop_handlers",
                                 concurrency = concurrency, poll_interval = 0.05})
local q = assert(bus:queue(domain .. "__commands"))
worker:run{tick_interval = 0.05, tick = function()
  return assert(q:metrics()).queue_length > 0  -- a completed command's message is deleted
end}
bus:close()
