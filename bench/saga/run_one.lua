-- One side of the split run: run_one.lua worker|router <domain> <processes>
-- Runs until every process of the domain has finished.
local commandbus = require "commandbus"
local role, domain, total = arg[1], arg[2], tonumber(arg[3])
local bus = assert(commandbus.connect())
local function finished()
  local f = io.popen(("psql -qAt %q -c \"SELECT count(*) FROM commandbus.process WHERE domain = '%s' AND status = 'COMPLETED'\"")
    :format(os.getenv("DATABASE_URL"), domain))
  local n = tonumber(f:read("*a"):match("%d+"))
  f:close()
  return n >= total
end
local runner
if role == "worker" then
  runner = assert(bus:worker{domain = domain, handlers = "bench.saga.handlers", concurrency = 2, poll_interval = 0.05})
else
  runner = assert(bus:reply_router{domain = domain, managers = "bench.saga.managers", concurrency = 2, poll_interval = 0.05})
end
runner:run{tick_interval = 0.25, tick = function() return not finished() end}
bus:close()
