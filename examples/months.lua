-- A bus that runs for months: priorities, a deduplication window, a rate
-- limit, a schedule, a retention policy and a one-off purge.
--   eval "$(scripts/env lua5.4)"; lua5.4 examples/months.lua
local commandbus = require "commandbus"

local bus = assert(commandbus.connect())
assert(bus:setup())
local domain = "months_demo"
assert(bus:purge{domain = domain, older_than = 0}) -- a clean slate for the demo

-- Priorities: higher is taken first (default 0; negative waits for the rest).
assert(bus:send{domain = domain, type = "Report", data = {name = "monthly"}, priority = -1})
assert(bus:send{domain = domain, type = "Email", data = {to = "ada"}})
assert(bus:send{domain = domain, type = "Page", data = {to = "on-call"}, priority = 10})

-- A deduplication window: the same key within 60 s is refused, naming the
-- command that holds it (the key carries the time so that the demo can run
-- again at once).
local key = ("welcome:bob:%d:%.6f"):format(os.time(), os.clock())
local first = assert(bus:send{domain = domain, type = "Email", data = {to = "bob"}, dedup_key = key, dedup_for = 60})
local again, err = bus:send{domain = domain, type = "Email", data = {to = "bob"}, dedup_key = key, dedup_for = 60}
assert(again == nil and err.code == "DUPLICATE_COMMAND" and err.command_id == first.command_id)
print("a second welcome for bob within the minute: " .. err.code)

-- At most 20 emails a second and 2 at once, across every worker process.
assert(bus:set_limit{domain = domain, type = "Email", per_second = 20, concurrency = 2})

-- A schedule: every workday at 07:30 in Paris; any running worker of the
-- domain sends it, once per due time.
local s = assert(bus:schedule{name = "months_demo_digest", domain = domain, type = "Email",
                              data = {to = "team", digest = true}, cron = "30 7 * * mon-fri",
                              timezone = "Europe/Paris"})
print("next digest due at " .. s.next_due_at)

-- Keep finished commands a day, archived messages a week (the rest: defaults).
assert(bus:set_retention{domain = domain, commands = 86400, archive = 7 * 86400})
local policy = assert(bus:retention(domain))
print(("retention: commands %d s, archive %d s, batches %d s"):format(policy.commands, policy.archive, policy.batches))

local order = {}
local worker = assert(bus:worker{domain = domain, concurrency = 1, poll_interval = 0.1, handlers = {
  Report = function(cmd) order[#order + 1] = "Report" end,
  Email = function(cmd) order[#order + 1] = "Email" end,
  Page = function(cmd) order[#order + 1] = "Page" end,
}})
worker:run{tick_interval = 0.05, tick = function() return #order < 4 end}
print("handled in this order: " .. table.concat(order, ", "))
local health = worker:health()
print(("this worker's retention so far: %d passes, %d commands removed"):format(health.retention.passes,
                                                                             tonumber(health.retention.commands)))
worker:close()

-- A one-off purge: finished commands older than an hour (none yet here).
local removed = assert(bus:purge{domain = domain, older_than = 3600})
print(("purged %d commands and %d audit rows"):format(tonumber(removed.commands), tonumber(removed.audit)))
assert(bus:unschedule("months_demo_digest"))
assert(bus:set_limit{domain = domain, type = "Email"}) -- no limit any more
bus:close()
