-- Process events: the per-process log, the event sink, awaiting a process
-- or an event, host events and purging finished processes.
--   eval "$(scripts/env lua5.4)"; lua5.4 examples/process_events.lua
local commandbus = require "commandbus"
local saga_order = require "examples.saga.order"

local bus = assert(commandbus.connect())
assert(bus:setup())
local domain = "events_demo"

-- The saga example's order process, started in this example's own domain.
local fields = {type = saga_order.type, domain = domain}
for _, hook in ipairs{"first_step", "build_command", "update_state", "next_step", "compensation_step"} do
  fields[hook] = saga_order[hook]
end
local order = commandbus.process.define(fields)

-- The sink sees each event this bus's writers append, once committed (not
-- the terminal ones: await_process is for those).
assert(bus:on_process_event(function(e)
  print(("  sink: process %s #%d %s at step %s"):format(e.process_id:sub(1, 8), e.sequence, e.event_type,
                                                        e.step or "-"))
end))

local shipped = assert(order:start(bus, {order = 1, amount = 25}))
local declined = assert(order:start(bus, {order = 10, amount = 99})) -- every tenth order is declined
-- A host's own event on a running process, e.g. a progress mark.
print("appended event #" .. assert(bus:append_process_event(domain, shipped, "label_printed", {printer = "P1"})))

local commands = assert(bus:queue(domain .. "__commands"))
local replies = assert(bus:queue(domain .. "__process_replies"))
local function busy(q) return assert(q:metrics()).queue_length > 0 end
for _ = 1, 20 do -- workers and the reply router take turns on this thread
  local worker = assert(bus:worker{domain = domain, handlers = "examples.saga.handlers", poll_interval = 0.05})
  worker:run{tick_interval = 0.05, tick = function() return busy(commands) end}
  worker:close()
  local router = assert(bus:reply_router{domain = domain, managers = "examples.saga.managers", poll_interval = 0.05})
  router:run{tick_interval = 0.05, tick = function() return busy(replies) end}
  router:close()
  if not busy(commands) and not busy(replies) then break end
end
print(("the sink got %d event(s) in all"):format(bus:dispatch_process_events()))

-- Both have finished, so these return at once; from another thread or
-- process they would block until the change (woken by NOTIFY).
local p = assert(bus:await_process(domain, declined, {timeout = 10}))
print(("order 10 ended %s (%s)"):format(p.status, p.error_code or ""))
local e = assert(bus:await_event(domain, shipped, "STEP_STARTED", 0, {timeout = 10}))
print(("order 1's first STEP_STARTED is #%d, step %s"):format(e.sequence, e.step))

print("order 1's log:")
for _, ev in ipairs(assert(bus:process_events(domain, shipped))) do
  print(("  #%d %-14s step %-8s status %s"):format(ev.sequence, ev.event_type, ev.step or "-", ev.status))
end

local _, err = bus:await_process(domain, "01234567-89ab-7def-8123-456789abcdef", {timeout = 1})
print(("awaiting an unknown process: %s: %s"):format(err.code, err.message))
print(("purged %d finished process(es)"):format(assert(bus:purge_processes{domain = domain, older_than = 0})))
bus:close()
