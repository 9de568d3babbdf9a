-- One side of the split run: run_one.lua worker|router <domain> <processes>
-- Runs until every process of the domain has finished.
local commandbus = require "commandbus"
local role, domain, total = arg[1], arg[2], tonumber(arg[3])
local bus = assert(commandbus.connect())
-- Done when the total-th COMPLETED process exists (one query, no psql).
local function finished()
  local page = assert(bus:list_processes{domain = domain, status = "COMPLETED", limit = 1, offset = total - 1})
  return #page == 1
end
local runner
if role == "worker" then
  runner = assert(bus:worker{domain = domain, handlers = "bench.saga.handlers", concurrency = 2, poll_interval = 0.05})
else
  runner = assert(bus:reply_router{domain = domain, managers = "bench.saga.managers", concurrency = 2, poll_interval = 0.05})
end
runner:run{tick_interval = 0.02, tick = function() return not finished() end}
bus:close()
