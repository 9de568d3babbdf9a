-- The troubleshooting queue: what an operator sees and can do
-- (docs/architecture.md, "Data contract": operator actions, replies, audit events).
local helper = require "spec.helper"
local world = require "spec.support.world"

describe("troubleshooting queue", function()
  local bus, tsq, domain, commands, replies

  before_each(function()
    bus = world.bus()
    tsq = bus:tsq()
    domain = world.domain()
    commands = domain .. "__commands"
    replies = domain .. "__replies"
  end)

  after_each(function() bus:close() end)

  -- Sends the commands and runs a worker until each has left PENDING and
  -- IN_PROGRESS; returns their ids.
  local function settle(specs)
    local ids = {}
    for i, spec in ipairs(specs) do
      spec.domain = domain
      ids[i] = assert(bus:send(spec)).command_id
    end
    local _, met = world.work(bus, domain, world.settled(bus, domain, ids))
    assert.is_true(met, "the commands did not settle in time")
    return ids
  end

  local function in_tsq(spec)
    local id = settle({spec})[1]
    assert.equal("IN_TROUBLESHOOTING_QUEUE", assert(bus:get_command(domain, id)).status)
    return id
  end

  describe("list", function()
    it("shows each command with its payload, data, error, attempts and the total", function()
      local corr = world.uuid()
      local ids = settle{
        {type = "Permanent", data = {order = 1}, reply_to = replies, correlation_id = corr},
        {type = "AlwaysTransient", data = {order = 2}, max_attempts = 2},
        {type = "Echo"},
      }
      local page = assert(tsq:list{domain = domain})
      assert.equal(2, page.total)
      assert.equal(2, #page.items)
      local by_id = {}
      for _, item in ipairs(page.items) do by_id[item.command_id] = item end

      local p = by_id[ids[1]]
      assert.equal("Permanent", p.type)
      assert.equal("IN_TROUBLESHOOTING_QUEUE", p.status)
      assert.equal(1, p.attempts)
      assert.equal(3, p.max_attempts)
      assert.equal("PERMANENT", p.last_error_type)
      assert.equal("BROKEN", p.last_error_code)
      assert.equal("cannot ever work", p.last_error_msg)
      assert.equal(corr, p.correlation_id)
      assert.equal(replies, p.reply_to)
      assert.same({order = 1}, p.data)
      assert.equal(ids[1], p.payload.command_id)
      assert.equal("Permanent", p.payload.command_type)
      assert.equal(domain, p.payload.domain)
      assert.equal(corr, p.payload.correlation_id)
      assert.equal(replies, p.payload.reply_to)
      assert.same({order = 1}, p.payload.data)

      local t = by_id[ids[2]]
      assert.equal(2, t.attempts)
      assert.equal("TRANSIENT", t.last_error_type)
      assert.equal("HANDLER_ERROR", t.last_error_code)
      assert.same({order = 2}, t.data)
      assert.is_nil(by_id[ids[3]]) -- completed commands are not listed
    end)

    it("filters by type and pages, keeping the total of the filter", function()
      settle{{type = "Permanent"}, {type = "Permanent"}, {type = "NoSuchHandler"}}
      local page = assert(tsq:list{domain = domain, type = "Permanent", limit = 1})
      assert.equal(2, page.total)
      assert.equal(1, #page.items)
      local second = assert(tsq:list{domain = domain, type = "Permanent", limit = 1, offset = 1})
      assert.equal(1, #second.items)
      assert.not_equal(page.items[1].command_id, second.items[1].command_id)
      local other = assert(tsq:list{domain = domain, type = "NoSuchHandler"})
      assert.equal(1, other.total)
      assert.equal("NO_HANDLER", other.items[1].last_error_code)
    end)

    it("is empty for a domain with no troubled commands", function()
      local page = assert(tsq:list{domain = domain})
      assert.equal(0, page.total)
      assert.same({}, page.items)
    end)
  end)

  describe("retry", function()
    it("sends the command again: PENDING, attempts 0, new msg_id, OPERATOR_RETRY audited", function()
      local id = in_tsq{type = "Permanent", data = {order = 9}, reply_to = replies}
      local old_msg = assert(bus:get_command(domain, id)).msg_id
      local new_msg = assert(tsq:retry(domain, id, {operator = "alice"}))
      assert.is_number(new_msg)
      assert.not_equal(old_msg, new_msg)
      local c = assert(bus:get_command(domain, id))
      assert.equal("PENDING", c.status)
      assert.equal(0, c.attempts)
      assert.equal(new_msg, c.msg_id)
      assert.same({operator = "alice", new_msg_id = new_msg}, world.details(bus, domain, id, "OPERATOR_RETRY")[1])
      assert.equal(0, assert(tsq:list{domain = domain}).total)
      -- The new message carries the archived payload; no reply for a retry.
      local msgs = assert(assert(bus:queue(commands)):read{vt = 0})
      assert.equal(1, #msgs)
      assert.equal(new_msg, msgs[1].msg_id)
      assert.equal(id, msgs[1].message.command_id)
      assert.same({order = 9}, msgs[1].message.data)
      assert.same({}, world.drain_queue(bus, replies))
    end)

    it("names the default operator when none is given", function()
      local id = in_tsq{type = "Permanent"}
      assert(tsq:retry(domain, id))
      assert.equal("operator", world.details(bus, domain, id, "OPERATOR_RETRY")[1].operator)
    end)

    it("lets a worker run the command again afterwards", function()
      local id = in_tsq{type = "Flaky", data = {succeed_on = 2}, max_attempts = 1}
      assert.equal("FLAKY", assert(bus:get_command(domain, id)).last_error_code)
      assert(tsq:retry(domain, id))
      -- attempts restart at 0, so the handler sees attempt 1 again: Flaky
      -- needs attempt 2 and max_attempts is 1, so it goes back to the TSQ.
      local _, met = world.work(bus, domain, world.settled(bus, domain, {id}))
      assert.is_true(met)
      assert.equal("IN_TROUBLESHOOTING_QUEUE", assert(bus:get_command(domain, id)).status)
      assert.equal(1, assert(bus:get_command(domain, id)).attempts)

      local ok_id = in_tsq{type = "Permanent"}
      assert(tsq:retry(domain, ok_id))
      local _, met2 = world.work(bus, domain, world.settled(bus, domain, {ok_id}),
                                  {handlers = {Permanent = function(cmd) return {fixed = cmd.attempt} end}})
      assert.is_true(met2)
      local c = assert(bus:get_command(domain, ok_id))
      assert.equal("COMPLETED", c.status)
      assert.equal(1, c.attempts)
      local events = world.events(bus, domain, ok_id)
      assert.same({"SENT", "RECEIVED", "MOVED_TO_TSQ", "OPERATOR_RETRY", "RECEIVED", "COMPLETED"}, events)
    end)
  end)

  describe("cancel", function()
    it("ends CANCELED, replies CANCELED with the reason and audits OPERATOR_CANCEL", function()
      local corr = world.uuid()
      local id = in_tsq{type = "Permanent", reply_to = replies, correlation_id = corr}
      assert.is_true(assert(tsq:cancel(domain, id, "customer withdrew", {operator = "bob"})))
      assert.equal("CANCELED", assert(bus:get_command(domain, id)).status)
      local msgs = world.drain_queue(bus, replies)
      assert.equal(1, #msgs)
      assert.same({"command_id", "correlation_id", "outcome", "reason"}, world.keys(msgs[1]))
      assert.equal(id, msgs[1].command_id)
      assert.equal(corr, msgs[1].correlation_id)
      assert.equal("CANCELED", msgs[1].outcome)
      assert.equal("customer withdrew", msgs[1].reason)
      assert.same({operator = "bob", reason = "customer withdrew", reply_to = replies},
                  world.details(bus, domain, id, "OPERATOR_CANCEL")[1])
      assert.equal(0, assert(tsq:list{domain = domain}).total)
    end)

    it("sends no reply for a command without reply_to", function()
      local id = in_tsq{type = "Permanent"}
      assert(tsq:cancel(domain, id, "no"))
      assert.equal("CANCELED", assert(bus:get_command(domain, id)).status)
      assert.equal(world.null, world.details(bus, domain, id, "OPERATOR_CANCEL")[1].reply_to)
    end)
  end)

  describe("complete", function()
    it("ends COMPLETED, replies SUCCESS with the operator's result and audits OPERATOR_COMPLETE", function()
      local corr = world.uuid()
      local id = in_tsq{type = "Permanent", reply_to = replies, correlation_id = corr}
      assert.is_true(assert(tsq:complete(domain, id, {booked = "by hand", n = 3}, {operator = "carol"})))
      assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
      local msgs = world.drain_queue(bus, replies)
      assert.equal(1, #msgs)
      assert.same({"command_id", "correlation_id", "outcome", "result"}, world.keys(msgs[1]))
      assert.equal(id, msgs[1].command_id)
      assert.equal(corr, msgs[1].correlation_id)
      assert.equal("SUCCESS", msgs[1].outcome)
      assert.same({booked = "by hand", n = 3}, msgs[1].result)
      assert.same({operator = "carol", has_result_data = true, reply_to = replies},
                  world.details(bus, domain, id, "OPERATOR_COMPLETE")[1])
    end)

    it("completes without a result: has_result_data false and a null result", function()
      local id = in_tsq{type = "Permanent", reply_to = replies}
      assert(tsq:complete(domain, id))
      local reply = world.drain_queue(bus, replies)[1]
      assert.equal("SUCCESS", reply.outcome)
      assert.is_true(reply.result == nil or reply.result == world.null)
      assert.is_false(world.details(bus, domain, id, "OPERATOR_COMPLETE")[1].has_result_data)
    end)
  end)

  describe("refuses", function()
    local actions = {
      retry = function(t, d, id) return t:retry(d, id) end,
      cancel = function(t, d, id) return t:cancel(d, id, "why") end,
      complete = function(t, d, id) return t:complete(d, id, {x = 1}) end,
    }

    for name, act in pairs(actions) do
      it(name .. " of a PENDING command with INVALID_STATE and changes nothing", function()
        local id = assert(bus:send{domain = domain, type = "Echo", reply_to = replies}).command_id
        local res, err = act(tsq, domain, id)
        assert.is_nil(res)
        assert.equal("INVALID_STATE", err.code)
        assert.equal("PENDING", assert(bus:get_command(domain, id)).status)
        assert.same({"SENT"}, world.events(bus, domain, id))
        assert.same({}, world.drain_queue(bus, replies))
      end)

      it(name .. " of a COMPLETED command with INVALID_STATE", function()
        local id = settle({{type = "Echo"}})[1]
        local res, err = act(tsq, domain, id)
        assert.is_nil(res)
        assert.equal("INVALID_STATE", err.code)
        assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
      end)

      it(name .. " of a command the operator already canceled with INVALID_STATE", function()
        local id = in_tsq{type = "Permanent", reply_to = replies}
        assert(tsq:cancel(domain, id, "first decision"))
        world.drain_queue(bus, replies)
        local res, err = act(tsq, domain, id)
        assert.is_nil(res)
        assert.equal("INVALID_STATE", err.code)
        assert.equal("CANCELED", assert(bus:get_command(domain, id)).status)
        assert.same({}, world.drain_queue(bus, replies))
      end)

      it(name .. " of an unknown command with NOT_FOUND", function()
        local res, err = act(tsq, domain, world.uuid())
        assert.is_nil(res)
        assert.equal("NOT_FOUND", err.code)
      end)

      it(name .. " of an id that is not a UUID with INVALID_ARGUMENT", function()
        local res, err = act(tsq, domain, "nope")
        assert.is_nil(res)
        assert.equal("INVALID_ARGUMENT", err.code)
      end)
    end
  end)
end)
