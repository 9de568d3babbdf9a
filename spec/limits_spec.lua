-- Rate and concurrency limits per command type, across worker processes.
local helper = require "spec.helper"
local world = require "spec.support.world"

local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"

local function count(sql)
  return tonumber(helper.sql(sql):match("%d+"))
end

-- Two worker processes of concurrency 4 that run until nothing is left.
local function two_processes(domain, log)
  local cmd = ("LIMIT_LOG=%s %s spec/support/worker_process.lua %s 4 10 spec.support.limit_handlers >/dev/null 2>&1")
    :format(log, lua, domain)
  os.execute(("(%s & %s & wait)"):format(cmd, cmd))
end

describe("limits", function()
  local bus
  before_each(function() bus = world.bus() end)
  after_each(function() bus:close() end)

  it("are set, listed and removed per command type", function()
    local domain = world.domain()
    assert(bus:set_limit{domain = domain, type = "Charge", per_second = 10, concurrency = 2})
    assert.same({{type = "Charge", per_second = 10, concurrency = 2, in_flight = 0}}, assert(bus:limits(domain)))
    assert(bus:set_limit{domain = domain, type = "Charge", per_second = 5})
    assert.same({{type = "Charge", per_second = 5, in_flight = 0}}, assert(bus:limits(domain)))
    assert(bus:set_limit{domain = domain, type = "Charge"})
    assert.same({}, assert(bus:limits(domain)))
    local ok, err = bus:set_limit{domain = domain, type = "Charge", per_second = -1}
    assert.is_nil(ok)
    assert.equal("INVALID_ARGUMENT", err.code)
    assert.has_error(function() bus:set_limit{domain = domain, type = "Charge", per_second = "fast"} end)
  end)

  it("a rate limit holds across two processes; waiting commands are not attempts and write no audit", function()
    local domain = world.domain()
    local per_second, n = 5, 30
    assert(bus:set_limit{domain = domain, type = "Limited", per_second = per_second})
    local commands = {}
    for i = 1, n do commands[i] = {type = "Limited", data = {i = i}} end
    assert(bus:send_batch{domain = domain, commands = commands})
    local log = os.tmpname()
    two_processes(domain, log)
    os.remove(log)
    assert.equal(n, count(("SELECT count(*) FROM commandbus.command WHERE domain = '%s' AND status = 'COMPLETED'"
      .. " AND attempts = 1"):format(domain)))
    assert.equal(n, count(("SELECT count(*) FROM commandbus.audit WHERE domain = '%s' AND event_type = 'RECEIVED'"):format(domain)))
    -- Handled per second window, from the audit rows.
    local busiest = count(("SELECT max(c) FROM (SELECT count(*) AS c FROM commandbus.audit WHERE domain = '%s'"
      .. " AND event_type = 'RECEIVED' GROUP BY date_trunc('second', ts)) x"):format(domain))
    assert.equal(per_second, busiest)
    local seconds = count(("SELECT count(DISTINCT date_trunc('second', ts)) FROM commandbus.audit WHERE domain = '%s'"
      .. " AND event_type = 'RECEIVED'"):format(domain))
    assert.is_true(seconds >= n / per_second, "windows used: " .. seconds)
  end)

  it("a concurrency limit holds across two processes", function()
    local domain = world.domain()
    assert(bus:set_limit{domain = domain, type = "Slow", concurrency = 2})
    local commands = {}
    for i = 1, 12 do commands[i] = {type = "Slow", data = {i = i}} end
    assert(bus:send_batch{domain = domain, commands = commands})
    local log = os.tmpname()
    two_processes(domain, log)
    local runs = {}
    for line in io.lines(log) do
      local s, e = line:match("(%S+) (%S+)")
      runs[#runs + 1] = {tonumber(s), tonumber(e)}
    end
    os.remove(log)
    assert.equal(12, #runs)
    local most = 0
    for _, r in ipairs(runs) do -- how many ran at the moment each one started
      local at = 0
      for _, o in ipairs(runs) do
        if o[1] <= r[1] and r[1] < o[2] then at = at + 1 end
      end
      most = math.max(most, at)
    end
    assert.equal(2, most)
  end)
end)
