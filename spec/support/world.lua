-- Shared by the command specs: a bus with the schema in place, a way to run a
-- worker until a condition holds, and small readers for audit rows and
-- replies. Each spec builds its own world with unique domains.
local helper = require "spec.helper"

local world = {}

local schema_ready = false

--- A fresh domain name. helper.unique alone repeats across runs started in
-- the same second (two interpreters, or a rerun), and a repeat would see the
-- previous run's rows; a random suffix keeps each run's world its own.
function world.domain()
  return string.format("%s_%06x", helper.unique("d"), math.random(0, 0xffffff))
end

--- A connected bus on the test database, the schema applied.
function world.bus()
  local bus = helper.bus()
  if not schema_ready then
    assert(bus:setup())
    schema_ready = true
  end
  return bus
end

function world.sleep(seconds)
  require("socket").sleep(seconds)
end

--- Worker options for tests: fast polling, immediate retries.
function world.options(domain, overrides)
  local o = {
    domain = domain,
    handlers = "spec.support.handlers",
    concurrency = 1,
    poll_interval = 0.1,
    visibility_timeout = 10,
    statement_timeout = 5,
    drain_timeout = 5,
    retry = {backoff = {0}},
  }
  for k, v in pairs(overrides or {}) do o[k] = v end
  return o
end

--- Runs worker until done() returns true (checked between ticks) or timeout
-- seconds pass; returns whether done() held.
function world.run(worker, done, timeout)
  local deadline = helper.clock() + (timeout or 10)
  local met = false
  assert(worker:run{
    tick_interval = 0.05,
    tick = function()
      if done() then
        met = true
        return false
      end
      return helper.clock() < deadline
    end,
  })
  return met
end

--- A worker with the test options, run until done(); returns the worker
-- (stopped) and whether done() held.
function world.work(bus, domain, done, overrides, timeout)
  local worker = assert(bus:worker(world.options(domain, overrides)))
  local met = world.run(worker, done, timeout)
  return worker, met
end

--- done() for world.run: every listed command has left PENDING/IN_PROGRESS.
function world.settled(bus, domain, ids)
  return function()
    for _, id in ipairs(ids) do
      local c = assert(bus:get_command(domain, id))
      if c.status == "PENDING" or c.status == "IN_PROGRESS" then return false end
    end
    return true
  end
end

--- The event types of a command's audit trail, oldest first.
function world.events(bus, domain, id)
  local types = {}
  for _, e in ipairs(assert(bus:audit(domain, id))) do types[#types + 1] = e.event_type end
  return types
end

--- The details of each audit event of the given type, oldest first.
function world.details(bus, domain, id, event_type)
  local found = {}
  for _, e in ipairs(assert(bus:audit(domain, id))) do
    if e.event_type == event_type then found[#found + 1] = e.details end
  end
  return found
end

--- Every message on a queue (read with a long vt, so each comes once).
function world.drain_queue(bus, name)
  local msgs = assert(assert(bus:queue(name)):read{vt = 300, qty = 100})
  local out = {}
  for i, m in ipairs(msgs) do out[i] = m.message end
  return out
end

function world.queue_length(bus, name)
  return assert(assert(bus:queue(name)):metrics()).queue_length
end

--- A random version-4 UUID, lower-case and hyphenated.
function world.uuid()
  local hex = "0123456789abcdef"
  local function digits(n)
    local t = {}
    for i = 1, n do
      local k = math.random(1, 16)
      t[i] = hex:sub(k, k)
    end
    return table.concat(t)
  end
  local variant = math.random(1, 4)
  return string.format("%s-%s-4%s-%s%s-%s", digits(8), digits(4), digits(3), ("89ab"):sub(variant, variant),
                       digits(3), digits(12))
end

world.UUID_PATTERN = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

--- The set of keys of a table, sorted (to check that a message has exactly
-- the fields the contract names).
function world.keys(t)
  local ks = {}
  for k in pairs(t) do ks[#ks + 1] = k end
  table.sort(ks)
  return ks
end

world.null = require("cjson").null

math.randomseed(os.time() + math.floor((helper.clock() % 1) * 1e6))

return world
