-- Schedules: commands sent at due times by whichever workers run.
local helper = require "spec.helper"
local world = require "spec.support.world"

local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"

local function rows(sql)
  local out = {}
  for line in helper.sql(sql):gmatch("[^\n]+") do out[#out + 1] = line end
  return out
end

local function count(sql)
  return tonumber(helper.sql(sql):match("%d+"))
end

-- Runs `n` worker processes of the domain for `seconds`, all at once.
local function run_processes(domain, n, seconds)
  local cmds = {}
  for i = 1, n do
    cmds[i] = ("%s spec/support/upkeep_process.lua %s %s 60 >/dev/null 2>&1"):format(lua, domain, seconds)
  end
  os.execute("(" .. table.concat(cmds, " & ") .. " & wait)")
end

describe("schedules", function()
  local bus
  before_each(function() bus = world.bus() end)
  after_each(function() bus:close() end)

  it("are defined, listed, paused, resumed and removed", function()
    local domain = world.domain()
    local name = domain .. "_report"
    local s = assert(bus:schedule{name = name, domain = domain, type = "Echo", data = {kind = "daily"},
                                  cron = "30 9 * * mon-fri", timezone = "Asia/Tokyo"})
    assert.equal(name, s.name)
    assert.equal("30 9 * * mon-fri", s.cron)
    assert.equal("skip", s.missed)
    assert.same({kind = "daily"}, s.data)
    -- 09:30 in Tokyo is 00:30 UTC.
    assert.equal("00:30:00", helper.sql(("SELECT to_char(next_due_at AT TIME ZONE 'UTC', 'HH24:MI:SS')"
      .. " FROM commandbus.schedule WHERE name = '%s'"):format(name)):match("[%d:]+"))
    assert.equal(1, #assert(bus:list_schedules{domain = domain}))
    assert(bus:pause_schedule(name))
    assert.is_true(assert(bus:list_schedules{domain = domain})[1].paused)
    assert(bus:resume_schedule(name))
    assert.is_false(assert(bus:list_schedules{domain = domain})[1].paused)
    assert.is_true(bus:unschedule(name))
    assert.is_false(bus:unschedule(name))
    local _, err = bus:pause_schedule(name)
    assert.equal("NOT_FOUND", err.code)
  end)

  it("refuses what cannot be due: bad cron fields, impossible dates, unknown zones", function()
    local domain = world.domain()
    local function refused(spec)
      spec.name, spec.domain, spec.type = domain .. "_x", domain, "Echo"
      local s, err = bus:schedule(spec)
      assert.is_nil(s)
      assert.equal("INVALID_ARGUMENT", err.code)
      return err.message
    end
    assert.matches("minute field", refused{cron = "61 * * * *"})
    assert.matches("5 fields", refused{cron = "* * * *"})
    assert.matches("never due", refused{cron = "0 0 30 2 *"})
    assert.matches("time zone", refused{cron = "@daily", timezone = "Nowhere/Special"})
    assert.has_error(function() bus:schedule{name = "x", domain = domain, type = "Echo"} end)
    assert.has_error(function() bus:schedule{name = "x", domain = domain, type = "Echo", every = 5, cron = "@daily"} end)
  end)

  it("reads days of month and days of week as standard cron: either one when both are restricted", function()
    local domain = world.domain()
    local name = domain .. "_friday13"
    assert(bus:schedule{name = name, domain = domain, type = "Echo", cron = "0 12 13 * fri"})
    local days = rows(("SELECT to_char(t, 'DD Dy') FROM commandbus.schedule s,"
      .. " commandbus.schedule_times(s, now(), now() + interval '60 days', false, 100) t WHERE s.name = '%s'"):format(name))
    assert.is_true(#days >= 9)
    for _, d in ipairs(days) do assert.is_true(d:match("^13") ~= nil or d:match("Fri$") ~= nil, d) end
    assert(bus:schedule{name = name, domain = domain, type = "Echo", cron = "0 12 */2 * *"})
    for _, d in ipairs(rows(("SELECT extract(day FROM t AT TIME ZONE 'UTC') FROM commandbus.schedule s,"
      .. " commandbus.schedule_times(s, now(), now() + interval '40 days', false, 100) t WHERE s.name = '%s'"):format(name))) do
      assert.equal(1, tonumber(d) % 2)
    end
  end)

  it("a schedule due while three worker processes run sends one command per due time", function()
    local domain = world.domain()
    local name = domain .. "_tick"
    assert(bus:schedule{name = name, domain = domain, type = "Echo", data = {from = "schedule"}, every = 1})
    run_processes(domain, 3, 4)
    local runs = count(("SELECT count(*) FROM commandbus.schedule_run WHERE name = '%s'"):format(name))
    assert.is_true(runs >= 2, "due times sent: " .. runs)
    -- One command per due time, each run once.
    assert.equal(runs, count(("SELECT count(*) FROM commandbus.command WHERE domain = '%s' AND command_type = 'Echo'"):format(domain)))
    assert.equal(runs, count(("SELECT count(DISTINCT r.command_id) FROM commandbus.schedule_run r JOIN commandbus.command c"
      .. " ON c.command_id = r.command_id WHERE r.name = '%s'"):format(name)))
    assert.equal(0, count(("SELECT count(*) FROM commandbus.audit WHERE domain = '%s' AND event_type = 'RECEIVED'"
      .. " GROUP BY command_id HAVING count(*) > 1"):format(domain)) or 0)
    -- Consecutive due times, one second apart: none skipped, none twice.
    local span = count(("SELECT round(extract(epoch FROM max(due_at) - min(due_at)))::int + 1 FROM commandbus.schedule_run"
      .. " WHERE name = '%s'"):format(name))
    assert.equal(runs, span)
  end)

  it("catch_up sends each due time missed during a pause, once; skip sends one for all of them", function()
    local domain = world.domain()
    local caught, skipped = domain .. "_caught", domain .. "_skipped"
    assert(bus:schedule{name = caught, domain = domain, type = "Echo", every = 1, missed = "catch_up"})
    assert(bus:schedule{name = skipped, domain = domain, type = "Nothing", every = 1, missed = "skip"})
    assert(bus:pause_schedule(caught))
    assert(bus:pause_schedule(skipped))
    world.sleep(3.2)
    assert(bus:resume_schedule(caught))
    assert(bus:resume_schedule(skipped))
    local worker = assert(bus:worker(world.options(domain)))
    world.run(worker, function() return worker:health().scheduled >= 4 end, 10)
    worker:close()
    local function sent(name)
      return count(("SELECT count(*) FROM commandbus.schedule_run WHERE name = '%s'"):format(name))
    end
    -- The first pass after resuming: three or four missed times each, or one.
    assert.is_true(sent(caught) >= 3, "caught up: " .. sent(caught))
    assert.is_true(sent(skipped) <= 2, "skipped: " .. sent(skipped))
    assert.is_true(sent(caught) >= sent(skipped) + 2)
    assert.equal(sent(caught), count(("SELECT count(*) FROM commandbus.command WHERE domain = '%s' AND command_type = 'Echo'"):format(domain)))
  end)
end)
