-- bus:await: waiting for a command's outcome without polling storms.
local helper = require "spec.helper"

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

  local function complete_behind_our_back(id, after)
    os.execute(("(sleep %g; psql -qAt %q -c \"UPDATE commandbus.command SET status = 'COMPLETED' WHERE command_id = '%s'\")"
                .. " >/dev/null 2>&1 &"):format(after, os.getenv("DATABASE_URL"), id))
  end

  it("wakes when another tool (psql) changes the command: the table's trigger notifies", function()
    local domain = helper.unique("aw")
    local sent = assert(bus:send{domain = domain, type = "Manual"})
    complete_behind_our_back(sent.command_id, 2.0)
    local t0 = helper.clock()
    local cmd = assert(bus:await(domain, sent.command_id, {timeout = 10}))
    assert.equal("COMPLETED", cmd.status)
    -- The safety poll reads at 1.575 s and 3.175 s: only the notification
    -- explains a wake before 2.8 s.
    assert.is_true(helper.clock() - t0 < 2.8, "woke after " .. (helper.clock() - t0) .. " s")
  end)

  it("without LISTEN, falls back to polling at 25 ms doubling up to 1 s", function()
    local domain = helper.unique("aw")
    local sent = assert(bus:send{domain = domain, type = "Manual"})
    complete_behind_our_back(sent.command_id, 2.0)
    local t0 = helper.clock()
    local cmd = assert(bus:await(domain, sent.command_id, {timeout = 10, listen = false}))
    assert.equal("COMPLETED", cmd.status)
    -- Reads at 1.575, 2.575, 3.575 s: a notification (about 2.0 s) or the
    -- 30 s safety schedule (1.575, 3.175 s) would wake it at another time.
    local took = helper.clock() - t0
    assert.is_true(took > 2.45 and took < 2.95, "woke after " .. took .. " s")
    assert.has_error(function() bus:await(domain, sent.command_id, {listen = "no"}) end)
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
