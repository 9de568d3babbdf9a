-- bus:await: waiting for a command's outcome without polling storms.
local helper = require "spec.helper"
local timing = require "spec.support.await_timing"

local sql = helper.sql

-- Runs a table-mode worker until the domain's commands are settled.
local function work_off(bus, domain, handlers)
  local worker = assert(bus:worker{domain = domain, handlers = handlers, poll_interval = 0.05})
  local q = assert(bus:queue(domain .. "__commands"))
  worker:run{tick_interval = 0.05, tick = function() return assert(q:metrics()).queue_length > 0 end}
  worker:close()
end

describe("await", function()
  local bus
  before_each(function() bus = helper.bus() assert(bus:setup()) end)
  after_each(function() bus:close() end)

  it("returns at once for a command that already finished", function()
    local domain = helper.unique("aw")
    local sent = assert(bus:send{domain = domain, type = "Ok"})
    work_off(bus, domain, {Ok = function() return {fine = true} end})
    local t0 = helper.clock()
    local cmd = assert(bus:await(domain, sent.command_id, {timeout = 5}))
    assert.equal("COMPLETED", cmd.status)
    assert.is_true(helper.clock() - t0 < 1)
  end)

  it("counts the troubleshooting queue and business-rule failures as outcomes", function()
    local commandbus = require "commandbus"
    local domain = helper.unique("aw")
    local broken = assert(bus:send{domain = domain, type = "Broken"})
    local refused = assert(bus:send{domain = domain, type = "Refused"})
    work_off(bus, domain, {
      Broken = function() error(commandbus.permanent("BROKEN", "no")) end,
      Refused = function() error(commandbus.business_rule("NO", "refused")) end,
    })
    assert.equal("IN_TROUBLESHOOTING_QUEUE", assert(bus:await(domain, broken.command_id, {timeout = 5})).status)
    assert.equal("FAILED", assert(bus:await(domain, refused.command_id, {timeout = 5})).status)
  end)

  it("says NOT_FOUND for an unknown command", function()
    local id = "01234567-89ab-7def-8123-456789abcdef"
    local cmd, err = bus:await(helper.unique("aw"), id, {timeout = 1})
    assert.is_nil(cmd)
    assert.equal("NOT_FOUND", err.code)
    assert.equal("unknown command `" .. id .. "`", err.message)
  end)

  it("times out with TIMEOUT", function()
    local domain = helper.unique("aw")
    local sent = assert(bus:send{domain = domain, type = "Never"})
    local cmd, err = bus:await(domain, sent.command_id, {timeout = 0.3})
    assert.is_nil(cmd)
    assert.equal("TIMEOUT", err.code)
  end)

  -- Completes the command as another tool would (psql, on its own
  -- connection), aiming for timing.AT s from now; returns a function that
  -- gives the wall-clock time at which it did.
  -- By the command's key (domain and id): by the id alone the update scans
  -- the whole command table, which the suite has filled by then, and the
  -- change lands that much later than planned.
  local function complete_behind_our_back(domain, id)
    return timing.change_at(helper.clock() + timing.AT,
      ("UPDATE commandbus.command SET status = 'COMPLETED' WHERE domain = '%s' AND command_id = '%s' RETURNING 1")
        :format(domain, id))
  end

  it("wakes when another tool (psql) changes the command: the table's trigger notifies", function()
    -- While listening, the await reads only on its safety schedule (reads
    -- planned at 0.775, 1.575, 3.175, 6.375 s ...); the trigger's
    -- notification wakes it at the commit. A run is clear when no read was
    -- planned between the change and the wake (nor shortly before the
    -- change: a read may come late), on that schedule or on the quicker one
    -- without LISTEN (should the await have stopped listening): then only
    -- the notification explains the wake, and it must come soon after the
    -- change (a few milliseconds on an idle machine; 0.5 s leaves room for
    -- a loaded one).
    timing.until_clear(4, function()
      local domain = helper.unique("aw")
      local sent = assert(bus:send{domain = domain, type = "Manual"})
      local changed_at = complete_behind_our_back(domain, sent.command_id)
      local t0 = helper.clock()
      local cmd = assert(bus:await(domain, sent.command_id, {timeout = 30}))
      local woke = helper.clock() - t0
      assert.equal("COMPLETED", cmd.status)
      local changed = changed_at() - t0
      assert.is_true(woke > changed, ("woke at %.3f s, before the change at %.3f s"):format(woke, changed))
      local read = timing.poll_explaining(changed, woke)
      if read then
        return false, ("changed at %.3f s, woke at %.3f s: the read planned at %.3f s could have seen it")
          :format(changed, woke, read)
      end
      assert.is_true(woke - changed < 0.5, ("woke %.3f s after the change (at %.3f s)"):format(woke - changed, changed))
      return true
    end)
  end)

  it("without LISTEN, falls back to polling at 25 ms doubling up to 1 s", function()
    -- Without LISTEN the await reads at 0, 0.025, 0.075 ... 0.775, 1.575,
    -- 2.575, 3.575 s ... (timing.POLLING) and nothing else wakes it: it
    -- must wake with the first read planned at or after the change, not at
    -- the change. A run is clear when that read is planned well after the
    -- change (a wake at the change would come before it), the previous one
    -- well before it (it cannot have come late enough to see it), and no
    -- safety read is planned near (a wake on that schedule would look alike).
    timing.until_clear(5, function()
      local domain = helper.unique("aw")
      local sent = assert(bus:send{domain = domain, type = "Manual"})
      local changed_at = complete_behind_our_back(domain, sent.command_id)
      local t0 = helper.clock()
      local cmd = assert(bus:await(domain, sent.command_id, {timeout = 30, listen = false}))
      local woke = helper.clock() - t0
      assert.equal("COMPLETED", cmd.status)
      local changed = changed_at() - t0
      local before, after = timing.reads_around(timing.POLLING, changed)
      local run = ("changed at %.3f s, woke at %.3f s"):format(changed, woke)
      if changed - before < timing.LATE then
        return false, ("%s: the read planned at %.3f s might have come after the change"):format(run, before)
      end
      if after - changed < timing.APART then
        return false, ("%s: the read planned at %.3f s comes too soon after the change"):format(run, after)
      end
      local safety = timing.read_between(timing.SAFETY, changed - timing.LATE, after + timing.SLACK)
      if safety then
        return false, ("%s: the safety read planned at %.3f s is near"):format(run, safety)
      end
      -- A read never comes before its planned time: a wake before `after`
      -- is not a poll; one after `after` + SLACK is not this read.
      assert.is_true(woke >= after and woke < after + timing.SLACK,
        ("%s: not with the read planned at %.3f s"):format(run, after))
      return true
    end)
    assert.has_error(function() bus:await(helper.unique("aw"), "01234567-89ab-7def-8123-456789abcdef", {listen = "no"}) end)
  end)

  it("wakes a waiter in another process when the command completes here", function()
    local domain = helper.unique("aw")
    local sent = assert(bus:send{domain = domain, type = "Ok"})
    local answer = helper.await_elsewhere("command", domain, sent.command_id)
    local completed_at
    work_off(bus, domain, {Ok = function() completed_at = helper.clock() return nil end})
    local woke, status = answer()
    assert.equal("COMPLETED", status)
    assert.is_true(tonumber(woke) - completed_at < 1, "woke " .. (tonumber(woke) - completed_at) .. " s after")
  end)
end)
