-- Starts 100 order processes, runs workers and the reply router until every
-- process has finished, and prints how they ended.
--   eval "$(scripts/env lua5.4)"; lua5.4 examples/saga/run.lua
local commandbus = require "commandbus"
local order = require "examples.saga.order"

local bus = assert(commandbus.connect())
assert(bus:setup())
local domain = order.domain
local ids = {}
for i = 1, 100 do ids[i] = assert(order:start(bus, {order = i, amount = 10 + i})) end
print(("started %d order processes"):format(#ids))

local commands = assert(bus:queue(domain .. "__commands"))
local replies = assert(bus:queue(domain .. "__process_replies"))
local function busy(q) return assert(q:metrics()).queue_length > 0 end

-- Workers and the router take turns on this thread until both queues are
-- empty (in production each runs in its own process or thread).
for round = 1, 20 do
  local worker = assert(bus:worker{domain = domain, handlers = "examples.saga.handlers", concurrency = 2,
                                   poll_interval = 0.05})
  worker:run{tick_interval = 0.05, tick = function() return busy(commands) end}
  worker:close()
  local router = assert(bus:reply_router{domain = domain, managers = "examples.saga.managers", concurrency = 2,
                                         poll_interval = 0.05})
  router:run{tick_interval = 0.05, tick = function() return busy(replies) end}
  router:close()
  if not busy(commands) and not busy(replies) then break end
end

local ended = {}
for _, id in ipairs(ids) do
  local p = assert(bus:get_process(domain, id))
  ended[p.status] = (ended[p.status] or 0) + 1
end
for status, n in pairs(ended) do print(("%-12s %d"):format(status, n)) end
local declined = assert(bus:get_process(domain, ids[10]))
local steps = {}
for _, a in ipairs(assert(bus:process_audit(domain, ids[10]))) do
  steps[#steps + 1] = ("%s (%s)"):format(a.step_name, a.reply_outcome or "waiting")
end
print(("order 10 was declined: %s; %s"):format(declined.status, table.concat(steps, " -> ")))
bus:close()
