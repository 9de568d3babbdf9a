-- Metrics: a worker handles a few commands, then the bus's snapshot is read
-- as a table, as Prometheus text, and as other processes see the worker
-- (its heartbeats).
--   eval "$(scripts/env lua5.4)"; lua5.4 examples/metrics.lua
local commandbus = require "commandbus"

local bus = assert(commandbus.connect())
assert(bus:setup())
local domain = "metrics_demo"

for i = 1, 5 do assert(bus:send{domain = domain, type = "Charge", data = {kind = "ok", amount = i}}) end
assert(bus:send{domain = domain, type = "Charge", data = {kind = "broken", card = "4111"}})

local worker = assert(bus:worker{domain = domain, handlers = "examples.quickstart_handlers", concurrency = 2,
                                 poll_interval = 0.1})
local queue = assert(bus:queue(domain .. "__commands"))
local text
worker:run{tick_interval = 0.05, tick = function()
  if assert(queue:metrics()).queue_length > 0 then return true end
  text = assert(bus:metrics_text()) -- while the worker is still this process's
  return false
end}

-- The snapshot as a table.
local m = assert(bus:metrics())
for _, d in ipairs(m.domains) do
  if d.domain == domain then
    print(("%s: %d completed, %d in the troubleshooting queue"):format(domain, d.commands.COMPLETED or 0, d.tsq))
  end
end
for _, w in ipairs(m.workers) do
  print(("worker %s (%s): %d successes, %d failures"):format(w.domain, w.state, w.successes, w.failures))
end

-- The Prometheus exposition (what an nginx location serves at /metrics).
for line in text:gmatch("[^\n]+") do
  if line:find(domain, 1, true) and line:match("^commandbus_worker_") then print(line) end
end

-- Closed, the worker leaves its last heartbeat: what `commandbus health`
-- shows from any process.
worker:close()
for _, r in ipairs(assert(bus:runners{domain = domain})) do
  print(("%s %s on %s, pid %d: %s, %d successes"):format(r.kind, r.domain, r.host, r.pid, r.state, r.successes))
end
bus:close()
