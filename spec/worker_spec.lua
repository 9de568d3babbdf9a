-- The worker against a real PostgreSQL: one spec per path through a command's
-- life (docs/architecture.md, "Data contract": the worker, replies, audit events).
local commandbus = require "commandbus"
local helper = require "spec.helper"
local world = require "spec.support.world"

local ZERO_UUID = "00000000-0000-0000-0000-000000000000"

describe("worker", function()
  local bus, domain, commands, replies

  before_each(function()
    bus = world.bus()
    domain = world.domain()
    commands = domain .. "__commands"
    replies = domain .. "__replies"
  end)

  after_each(function() bus:close() end)

  local function send(spec)
    spec.domain = domain
    return assert(bus:send(spec)).command_id
  end

  local function work_until_settled(ids, overrides, timeout)
    local worker, met = world.work(bus, domain, world.settled(bus, domain, ids), overrides, timeout)
    assert.is_true(met, "the commands did not settle in time")
    return worker
  end

  describe("on success", function()
    it("completes the command and replies SUCCESS with the handler's result", function()
      local corr = world.uuid()
      local id = send{type = "Echo", data = {amount = 12, note = "hi"}, reply_to = replies, correlation_id = corr}
      work_until_settled({id})

      local c = assert(bus:get_command(domain, id))
      assert.equal("COMPLETED", c.status)
      assert.equal(1, c.attempts)
      assert.is_nil(c.last_error_code)

      local msgs = world.drain_queue(bus, replies)
      assert.equal(1, #msgs)
      local reply = msgs[1]
      assert.same({"command_id", "correlation_id", "outcome", "result"}, world.keys(reply))
      assert.equal(id, reply.command_id)
      assert.equal(corr, reply.correlation_id)
      assert.equal("SUCCESS", reply.outcome)
      assert.same({echo = {amount = 12, note = "hi"}, attempt = 1}, reply.result)
      assert.equal(0, world.queue_length(bus, commands)) -- the message was deleted
    end)

    it("audits SENT, RECEIVED and COMPLETED with msg_id, reply_to and has_result", function()
      local id = send{type = "Echo", reply_to = replies}
      local msg_id = assert(bus:get_command(domain, id)).msg_id
      work_until_settled({id})
      assert.same({"SENT", "RECEIVED", "COMPLETED"}, world.events(bus, domain, id))
      local received = world.details(bus, domain, id, "RECEIVED")[1]
      assert.same({msg_id = msg_id, attempt = 1, max_attempts = 3}, received)
      local completed = world.details(bus, domain, id, "COMPLETED")[1]
      assert.same({msg_id = msg_id, reply_to = replies, has_result = true}, completed)
    end)

    it("replies SUCCESS with a null result for a handler that returns nothing", function()
      local id = send{type = "Nothing", reply_to = replies}
      work_until_settled({id})
      local reply = world.drain_queue(bus, replies)[1]
      assert.equal("SUCCESS", reply.outcome)
      assert.is_true(reply.result == nil or reply.result == world.null)
      assert.is_false(world.details(bus, domain, id, "COMPLETED")[1].has_result)
    end)

    it("sends no reply for a command without reply_to", function()
      local id = send{type = "Echo"}
      work_until_settled({id})
      assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
      assert.equal(world.null, world.details(bus, domain, id, "COMPLETED")[1].reply_to)
    end)

    it("gives the handler the command's fields", function()
      local seen
      local corr = world.uuid()
      local id = send{type = "Look", data = {k = "v"}, reply_to = replies, correlation_id = corr, max_attempts = 4}
      local msg_id = assert(bus:get_command(domain, id)).msg_id
      local worker = assert(bus:worker(world.options(domain, {handlers = {
        Look = function(cmd, ctx)
          seen = cmd
          ctx:stop_worker()
        end,
      }})))
      assert(worker:run())
      assert.equal(id, seen.id)
      assert.equal("Look", seen.type)
      assert.same({k = "v"}, seen.data)
      assert.equal(1, seen.attempt)
      assert.equal(4, seen.max_attempts)
      assert.equal(corr, seen.correlation_id)
      assert.equal(replies, seen.reply_to)
      assert.equal(msg_id, seen.msg_id)
    end)
  end)

  describe("on a transient failure", function()
    it("retries and then completes: attempts 2, FAILED audited before COMPLETED", function()
      local id = send{type = "Flaky", data = {succeed_on = 2}, reply_to = replies}
      work_until_settled({id})
      local c = assert(bus:get_command(domain, id))
      assert.equal("COMPLETED", c.status)
      assert.equal(2, c.attempts)
      assert.same({"SENT", "RECEIVED", "FAILED", "RECEIVED", "COMPLETED"}, world.events(bus, domain, id))
      local failed = world.details(bus, domain, id, "FAILED")[1]
      assert.equal(1, failed.attempt)
      assert.equal(3, failed.max_attempts)
      assert.equal("TRANSIENT", failed.error_type)
      assert.equal("FLAKY", failed.error_code)
      assert.matches("not yet", failed.error_msg)
      assert.equal(c.msg_id, failed.msg_id)
      local msgs = world.drain_queue(bus, replies)
      assert.equal(1, #msgs)
      assert.same({attempt = 2}, msgs[1].result)
    end)

    it("keeps the command IN_PROGRESS with its error until the backoff passes", function()
      local id = send{type = "Flaky", data = {succeed_on = 2}}
      local _, met = world.work(bus, domain, function()
        return #world.details(bus, domain, id, "FAILED") > 0
      end, {retry = {backoff = {30}}})
      assert.is_true(met)
      local c = assert(bus:get_command(domain, id))
      assert.equal("IN_PROGRESS", c.status)
      assert.equal(1, c.attempts)
      assert.equal("TRANSIENT", c.last_error_type)
      assert.equal("FLAKY", c.last_error_code)
      -- The message waits out the backoff: invisible, not gone.
      assert.equal(1, world.queue_length(bus, commands))
      assert.same({}, assert(assert(bus:queue(commands)):read{}))
    end)

    it("counts a plain Lua error as transient with code HANDLER_ERROR", function()
      local id = send{type = "AlwaysTransient", max_attempts = 2}
      work_until_settled({id})
      local c = assert(bus:get_command(domain, id))
      assert.equal("HANDLER_ERROR", c.last_error_code)
      assert.matches("plain Lua error counts as transient", c.last_error_msg)
    end)
  end)

  describe("when retries run out", function()
    it("moves the command to the TSQ with reason EXHAUSTED, archives the message and sends no reply", function()
      local id = send{type = "AlwaysTransient", max_attempts = 2, reply_to = replies}
      work_until_settled({id})
      local c = assert(bus:get_command(domain, id))
      assert.equal("IN_TROUBLESHOOTING_QUEUE", c.status)
      assert.equal(2, c.attempts)
      assert.equal("TRANSIENT", c.last_error_type)
      assert.equal("HANDLER_ERROR", c.last_error_code)
      -- The last failure is recorded by MOVED_TO_TSQ alone, as rcmd does.
      assert.same({"SENT", "RECEIVED", "FAILED", "RECEIVED", "MOVED_TO_TSQ"}, world.events(bus, domain, id))
      local moved = world.details(bus, domain, id, "MOVED_TO_TSQ")[1]
      assert.same({"attempt", "error_code", "error_msg", "error_type", "max_attempts", "msg_id", "reason"},
                  world.keys(moved))
      assert.equal("EXHAUSTED", moved.reason)
      assert.equal(2, moved.attempt)
      assert.equal(2, moved.max_attempts)
      assert.equal("TRANSIENT", moved.error_type)
      assert.equal("HANDLER_ERROR", moved.error_code)
      assert.equal(c.msg_id, moved.msg_id)
      assert.is_string(moved.error_msg)
      -- Archived: gone from the queue, its payload kept for the operator.
      assert.equal(0, world.queue_length(bus, commands))
      local tsq = assert(bus:tsq():list{domain = domain})
      assert.equal(1, tsq.total)
      assert.equal(id, tsq.items[1].payload.command_id)
      assert.same({}, world.drain_queue(bus, replies))
    end)

    it("decides exhaustion by the command row's own max_attempts", function()
      local once = send{type = "AlwaysTransient", max_attempts = 1}
      local thrice = send{type = "AlwaysTransient"}
      work_until_settled({once, thrice})
      assert.equal(1, assert(bus:get_command(domain, once)).attempts)
      assert.equal(3, assert(bus:get_command(domain, thrice)).attempts)
    end)
  end)

  describe("on a permanent failure", function()
    it("moves the command to the TSQ at once with its error details, one MOVED_TO_TSQ event and no reply", function()
      local id = send{type = "Permanent", reply_to = replies}
      work_until_settled({id})
      local c = assert(bus:get_command(domain, id))
      assert.equal("IN_TROUBLESHOOTING_QUEUE", c.status)
      assert.equal(1, c.attempts)
      assert.equal("PERMANENT", c.last_error_type)
      assert.equal("BROKEN", c.last_error_code)
      assert.equal("cannot ever work", c.last_error_msg)
      assert.same({"SENT", "RECEIVED", "MOVED_TO_TSQ"}, world.events(bus, domain, id))
      local moved = world.details(bus, domain, id, "MOVED_TO_TSQ")
      assert.equal(1, #moved)
      assert.same({"attempt", "error_code", "error_details", "error_msg", "msg_id"}, world.keys(moved[1]))
      assert.equal(1, moved[1].attempt)
      assert.equal("BROKEN", moved[1].error_code)
      assert.equal("cannot ever work", moved[1].error_msg)
      assert.same({hint = "fix the data"}, moved[1].error_details)
      assert.equal(0, world.queue_length(bus, commands))
      assert.same({}, world.drain_queue(bus, replies))
    end)
  end)

  describe("with data lua-cjson cannot decode", function()
    -- Another producer (rcmd, psql) may store data nested deeper than
    -- lua-cjson's decoder goes (1000 levels); PostgreSQL takes it. The
    -- handler used to run on {} in its place.
    local deep = '{"a": ' .. ("["):rep(1200) .. ("]"):rep(1200) .. '}'

    local function send_undecodable(type)
      local id = send{type = type, data = {amount = 1}, reply_to = replies}
      local msg_id = assert(bus:get_command(domain, id)).msg_id
      helper.sql(("UPDATE pgmq.q_%s SET message = jsonb_set(message, '{data}', '%s') WHERE msg_id = %s"):format(
        commands, deep, msg_id))
      return id
    end

    local function expect_set_aside(id)
      local c = assert(bus:get_command(domain, id))
      assert.equal("IN_TROUBLESHOOTING_QUEUE", c.status)
      assert.equal(1, c.attempts)
      assert.equal("PERMANENT", c.last_error_type)
      assert.equal("DATA_UNDECODABLE", c.last_error_code)
      assert.matches("^the command's data cannot be decoded: .*nested", c.last_error_msg)
      assert.same({"SENT", "RECEIVED", "MOVED_TO_TSQ"}, world.events(bus, domain, id))
      assert.equal("DATA_UNDECODABLE", world.details(bus, domain, id, "MOVED_TO_TSQ")[1].error_code)
      assert.equal(0, world.queue_length(bus, commands))
      assert.same({}, world.drain_queue(bus, replies))
    end

    it("moves the command to the TSQ with code DATA_UNDECODABLE, the handler not run", function()
      local id = send_undecodable("Echo")
      local ok = send{type = "Echo", data = {amount = 2}}
      work_until_settled({id, ok})
      expect_set_aside(id)
      assert.equal("COMPLETED", assert(bus:get_command(domain, ok)).status) -- the worker went on
    end)

    it("does the same for table-mode handlers", function()
      local ran = 0
      local id = send_undecodable("Count")
      work_until_settled({id}, {handlers = {Count = function() ran = ran + 1 end}})
      expect_set_aside(id)
      assert.equal(0, ran)
    end)
  end)

  describe("with an error value that raises when it is read", function()
    -- A handler may raise an object whose metatable raises on a read (a
    -- strict object's __index, a failing __tostring). The worker read it
    -- outside any protected call: a lane's Lua state panicked and the
    -- worker process aborted, its command left IN_PROGRESS.
    -- What the command's error says: a value that cannot be read at all, or
    -- one whose text could not be made.
    local says = {StrictError = "^the handler raised an error value that cannot be read: .*",
                  BadTostring = "^table %(its __tostring raised: .*%)$",
                  Strict = "^the handler raised an error value that cannot be read: .*"}

    local function expect_handler_error(id, type)
      local c = assert(bus:get_command(domain, id))
      assert.equal("IN_TROUBLESHOOTING_QUEUE", c.status)
      assert.equal("TRANSIENT", c.last_error_type)
      assert.equal("HANDLER_ERROR", c.last_error_code)
      assert.matches(says[type], c.last_error_msg)
    end

    for _, type in ipairs{"StrictError", "BadTostring"} do
      it("records a transient HANDLER_ERROR (" .. type .. "), the worker process still running", function()
        local id = send{type = type, max_attempts = 1}
        local ok_id = send{type = "Echo"}
        local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
        -- In its own process, which runs until nothing of the domain is open.
        os.execute(("timeout 60 %s spec/support/worker_process.lua %s 1 10 >/dev/null 2>&1"):format(lua, domain))
        expect_handler_error(id, type)
        assert.equal("COMPLETED", assert(bus:get_command(domain, ok_id)).status)
      end)
    end

    it("does the same for table-mode handlers", function()
      local strict = {__index = function(_, k) error("no field " .. tostring(k)) end}
      local id = send{type = "Strict", max_attempts = 1}
      work_until_settled({id}, {handlers = {Strict = function() error(setmetatable({}, strict)) end}})
      expect_handler_error(id, "Strict")
    end)
  end)

  describe("on a business-rule failure", function()
    it("ends FAILED, archives the message and replies FAILED with code, message and details", function()
      local corr = world.uuid()
      local id = send{type = "Refuse", data = {balance = 5}, reply_to = replies, correlation_id = corr}
      work_until_settled({id})
      local c = assert(bus:get_command(domain, id))
      assert.equal("FAILED", c.status)
      assert.equal(1, c.attempts)
      assert.equal("BUSINESS_RULE", c.last_error_type)
      assert.equal("NO_FUNDS", c.last_error_code)
      assert.equal("balance too low", c.last_error_msg)
      assert.equal(0, world.queue_length(bus, commands))
      assert.equal(0, assert(bus:tsq():list{domain = domain}).total)

      local msgs = world.drain_queue(bus, replies)
      assert.equal(1, #msgs)
      local reply = msgs[1]
      assert.same({"command_id", "correlation_id", "error_code", "error_message", "outcome", "result"},
                  world.keys(reply))
      assert.equal(id, reply.command_id)
      assert.equal(corr, reply.correlation_id)
      assert.equal("FAILED", reply.outcome)
      assert.equal("NO_FUNDS", reply.error_code)
      assert.equal("balance too low", reply.error_message)
      assert.same({error_code = "NO_FUNDS", error_message = "balance too low", error_details = {balance = 5}},
                  reply.result)

      assert.same({"SENT", "RECEIVED", "BUSINESS_RULE_FAILED"}, world.events(bus, domain, id))
      local failed = world.details(bus, domain, id, "BUSINESS_RULE_FAILED")[1]
      assert.same({msg_id = c.msg_id, attempt = 1, error_code = "NO_FUNDS", error_msg = "balance too low",
                   error_details = {balance = 5}}, failed)
    end)
  end)

  describe("with no handler for the type", function()
    it("moves the command to the TSQ with code NO_HANDLER", function()
      local id = send{type = "NobodyHandlesThis", reply_to = replies}
      work_until_settled({id})
      local c = assert(bus:get_command(domain, id))
      assert.equal("IN_TROUBLESHOOTING_QUEUE", c.status)
      assert.equal("PERMANENT", c.last_error_type)
      assert.equal("NO_HANDLER", c.last_error_code)
      assert.matches("NobodyHandlesThis", c.last_error_msg)
      assert.equal(1, c.attempts)
      assert.same({}, world.drain_queue(bus, replies))
    end)

    it("does the same for table-mode handlers", function()
      local id = send{type = "Missing"}
      work_until_settled({id}, {handlers = {Echo = function() return {} end}})
      assert.equal("NO_HANDLER", assert(bus:get_command(domain, id)).last_error_code)
    end)

    it("does the same for a long type whose text would be cut inside a character", function()
      -- The message quotes the type; cut at a fixed size in the middle of a
      -- two-byte character, it was not UTF-8, PostgreSQL refused the
      -- acknowledgement, and the command came back after every visibility
      -- timeout instead of reaching the TSQ.
      local type = string.rep("x", 225) .. string.rep("\195\169", 20) -- é
      local id = send{type = type}
      work_until_settled({id}, {handlers = {Echo = function() return {} end}}, 5)
      local c = assert(bus:get_command(domain, id))
      assert.equal("IN_TROUBLESHOOTING_QUEUE", c.status)
      assert.equal("NO_HANDLER", c.last_error_code)
      assert.matches("^no handler for command type `x+", c.last_error_msg)
    end)
  end)

  describe("with poison messages", function()
    -- Each crafted message goes straight onto the domain's queue; the worker
    -- must archive it with a MESSAGE_REJECTED audit and keep going.
    local function rejected_for(audit_id)
      return function()
        return #world.details(bus, domain, audit_id, "MESSAGE_REJECTED") > 0
      end
    end

    local function expect_set_aside(message, audit_id, reason)
      local q = assert(bus:queue(commands))
      assert(q:create())
      local msg_id = assert(q:send(message))
      local worker, met = world.work(bus, domain, rejected_for(audit_id))
      assert.is_true(met, "the message was not set aside")
      local details = world.details(bus, domain, audit_id, "MESSAGE_REJECTED")
      assert.equal(1, #details)
      assert.same({msg_id = msg_id, reason = reason, queue = commands}, details[1])
      assert.equal(0, world.queue_length(bus, commands))
      assert.equal(1, worker:health().poison)
      -- A normal command sent afterwards still completes.
      local id = send{type = "Echo"}
      work_until_settled({id})
      assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
    end

    it("archives a message that is not an object (NOT_AN_OBJECT)", function()
      expect_set_aside({1, 2, 3}, ZERO_UUID, "NOT_AN_OBJECT")
    end)

    it("archives a message without a command_id (INVALID_COMMAND_ID)", function()
      expect_set_aside({domain = domain, command_type = "Echo", data = {}}, ZERO_UUID, "INVALID_COMMAND_ID")
    end)

    it("archives a message whose command_id is not a UUID (INVALID_COMMAND_ID)", function()
      expect_set_aside({domain = domain, command_type = "Echo", command_id = "order-42", data = {}}, ZERO_UUID,
                       "INVALID_COMMAND_ID")
    end)

    it("reads a command_id only as a canonical UUID, in either case (commandbus.message_command_id)", function()
      -- The receive statement pairs messages with commands through this
      -- function; whatever it refuses is set aside as INVALID_COMMAND_ID.
      local id = "0190a3b2-1c2d-7e3f-8a9b-0c1d2e3f4a5b"
      local cases = {
        {id, id}, {id:upper(), id},
        {"{" .. id .. "}", ""}, {id:gsub("-", ""), ""}, {id:sub(1, 35), ""}, {id .. "b", ""},
        {string.rep("-", 36), ""}, {id:sub(1, 28) .. "-" .. id:sub(30), ""}, {id:sub(1, 35) .. "g", ""},
        {id:sub(1, 23) .. "_" .. id:sub(25), ""}, {id:sub(1, 35) .. "%", ""}, {" " .. id:sub(2), ""},
        {id:sub(1, 35) .. "\\n", ""}, {id:sub(1, 35) .. "\\u00e9", ""},
      }
      for _, case in ipairs(cases) do
        local message = ('{"command_id": "%s"}'):format(case[1])
        local got = helper.sql(("SELECT commandbus.message_command_id('%s'::jsonb)"):format(message))
        assert.equal(case[2], got:gsub("\n$", ""), message)
      end
      for _, message in ipairs{'{"command_id": 12}', '{"command_id": null}', '{}', '[1]', '"x"', 'null'} do
        local got = helper.sql(("SELECT commandbus.message_command_id('%s'::jsonb)"):format(message))
        assert.equal("", got:gsub("\n$", ""), message)
      end
    end)

    it("archives a message for a command that has no row (UNKNOWN_COMMAND)", function()
      local id = world.uuid()
      expect_set_aside({domain = domain, command_type = "Echo", command_id = id, data = {}}, id, "UNKNOWN_COMMAND")
    end)

    it("archives a message for a command already COMPLETED (COMMAND_ALREADY_DONE) without touching it", function()
      local id = send{type = "Echo", reply_to = replies}
      work_until_settled({id})
      assert.equal(1, #world.drain_queue(bus, replies))
      local before = assert(bus:get_command(domain, id))
      expect_set_aside({domain = domain, command_type = "Echo", command_id = id, data = {}}, id,
                       "COMMAND_ALREADY_DONE")
      local after = assert(bus:get_command(domain, id))
      assert.equal("COMPLETED", after.status)
      assert.equal(before.attempts, after.attempts)
      assert.equal(1, #world.details(bus, domain, id, "COMPLETED"))
      assert.same({}, world.drain_queue(bus, replies))
    end)

    it("archives a second message for a PENDING command fetched with the first (DUPLICATE_MESSAGE)", function()
      local id = send{type = "Echo", data = {n = 1}, reply_to = replies}
      local q = assert(bus:queue(commands))
      assert(q:send({domain = domain, command_type = "Echo", command_id = id, data = {n = 2}, reply_to = replies}))
      local settled = world.settled(bus, domain, {id})
      local _, met = world.work(bus, domain, function()
        return settled() and #world.details(bus, domain, id, "MESSAGE_REJECTED") > 0
      end)
      assert.is_true(met)
      local c = assert(bus:get_command(domain, id))
      assert.equal("COMPLETED", c.status)
      assert.equal(1, c.attempts)
      assert.equal("DUPLICATE_MESSAGE", world.details(bus, domain, id, "MESSAGE_REJECTED")[1].reason)
      local msgs = world.drain_queue(bus, replies)
      assert.equal(1, #msgs)
      assert.same({n = 1}, msgs[1].result.echo)
      assert.equal(0, world.queue_length(bus, commands))
    end)

    it("does not run the handler again for a second message that arrives while it runs", function()
      -- FINDING (core/src/worker.c, receive_sql): the receive statement
      -- accepts any message whose command is PENDING or IN_PROGRESS; it does
      -- not compare the message's msg_id with the command row's msg_id. A
      -- second message fetched while the first delivery's handler runs is
      -- RECEIVED again (attempts 2) and the handler runs a second time with
      -- the second message's data. Only a duplicate fetched in the same
      -- round is set aside (DUPLICATE_MESSAGE, previous spec). The guarded
      -- acknowledgement keeps the outcome single (one COMPLETED, one reply).
      local id = send{type = "Dup", data = {n = 1}}
      local q = assert(bus:queue(commands))
      local runs = 0
      local worker = assert(bus:worker(world.options(domain, {handlers = {
        Dup = function(cmd)
          runs = runs + 1
          if runs == 1 then
            assert(q:send({domain = domain, command_type = "Dup", command_id = id, data = {n = 2}}))
            world.sleep(0.5) -- several polls: the worker fetches the second message meanwhile
          end
          return {n = cmd.data.n}
        end,
      }})))
      world.run(worker, function()
        return #world.details(bus, domain, id, "MESSAGE_REJECTED") > 0 or runs > 1
      end, 3)
      assert.equal(1, runs)
      assert.equal(1, assert(bus:get_command(domain, id)).attempts)
    end)

    it("sets several poison messages aside in one go and handles the good ones among them", function()
      local q = assert(bus:queue(commands))
      assert(q:create())
      assert(q:send({1}))
      local good = send{type = "Echo"}
      assert(q:send({command_id = "bad"}))
      local settled = world.settled(bus, domain, {good})
      local worker, met = world.work(bus, domain, function()
        return settled() and #world.details(bus, domain, ZERO_UUID, "MESSAGE_REJECTED") == 2
      end)
      assert.is_true(met)
      assert.equal(2, worker:health().poison)
      assert.equal("COMPLETED", assert(bus:get_command(domain, good)).status)
      assert.equal(0, world.queue_length(bus, commands))
    end)
  end)

  describe("after an operator decision", function()
    it("rejects a second message for a command the operator canceled: no second reply, status stays", function()
      local id = send{type = "Permanent", reply_to = replies}
      work_until_settled({id})
      assert(bus:tsq():cancel(domain, id, "not needed"))
      local first = world.drain_queue(bus, replies)
      assert.equal(1, #first)
      assert.equal("CANCELED", first[1].outcome)

      local q = assert(bus:queue(commands))
      local msg_id = assert(q:send({domain = domain, command_type = "Permanent", command_id = id, data = {}}))
      local _, met = world.work(bus, domain, function()
        return #world.details(bus, domain, id, "MESSAGE_REJECTED") > 0
      end)
      assert.is_true(met)
      assert.same({msg_id = msg_id, reason = "COMMAND_ALREADY_DONE", queue = commands},
                  world.details(bus, domain, id, "MESSAGE_REJECTED")[1])
      assert.equal("CANCELED", assert(bus:get_command(domain, id)).status)
      assert.same({}, world.drain_queue(bus, replies))
    end)

    it("a stale outcome from an earlier delivery is ignored once the command was received again", function()
      -- The message's visibility timeout (1 s) runs out while the first
      -- delivery's handler still runs, so the command is received again
      -- (attempt 2). The first delivery then fails permanently: that late
      -- outcome belongs to attempt 1 and must not move the command anywhere.
      -- The second delivery succeeds: one COMPLETED, one SUCCESS reply.
      local id = send{type = "Race", reply_to = replies}
      local calls = 0
      local worker = assert(bus:worker(world.options(domain, {
        visibility_timeout = 1,
        statement_timeout = 0.5,
        handlers = {
          Race = function(cmd, ctx)
            calls = calls + 1
            local deadline = helper.clock() + 8
            if cmd.attempt == 1 then
              while assert(bus:get_command(domain, id)).attempts < 2 and helper.clock() < deadline do
                world.sleep(0.05)
              end
              error(commandbus.permanent("RACE", "first delivery fails, too late"))
            end
            ctx:stop_worker()
            return {late = false}
          end,
        },
      })))
      assert(worker:run())
      assert.equal(2, calls)
      local c = assert(bus:get_command(domain, id))
      assert.equal("COMPLETED", c.status)
      assert.equal(1, #world.details(bus, domain, id, "COMPLETED"))
      assert.equal(0, #world.details(bus, domain, id, "MOVED_TO_TSQ"))
      local msgs = world.drain_queue(bus, replies)
      assert.equal(1, #msgs)
      assert.equal("SUCCESS", msgs[1].outcome)
    end)
  end)

  describe("visibility", function()
    it("extend_visibility from a handler keeps the message hidden past the visibility timeout", function()
      local id = send{type = "Long"}
      local seen_while_extended
      local worker = assert(bus:worker(world.options(domain, {
        visibility_timeout = 1,
        statement_timeout = 0.5,
        handlers = {
          Long = function(cmd, ctx)
            assert(ctx:extend_visibility(30))
            world.sleep(1.5) -- past the 1 s visibility timeout
            seen_while_extended = assert(assert(bus:queue(commands)):read{vt = 0})
            ctx:stop_worker()
            return {attempt = cmd.attempt}
          end,
        },
      })))
      assert(worker:run())
      assert.same({}, seen_while_extended)
      local c = assert(bus:get_command(domain, id))
      assert.equal("COMPLETED", c.status)
      assert.equal(1, c.attempts)
    end)

    it("a handler that extends its visibility does not make the worker take more than its lanes can run", function()
      -- The worker sizes what it takes by the handlers' measured time. That
      -- time was read from the stuck clock, which extend_visibility moves
      -- forward: past the visibility timeout it came out negative, the worker
      -- took all it could, and commands that waited in the lane for most of
      -- the visibility timeout were let go for redelivery, each costing an
      -- attempt.
      local ids = {}
      for i = 1, 30 do ids[i] = send{type = "Extends"} end
      local worker, met = world.work(bus, domain, world.settled(bus, domain, ids), {
        visibility_timeout = 2,
        statement_timeout = 1,
        handlers = {
          Extends = function(_, ctx)
            assert(ctx:extend_visibility(60))
            world.sleep(0.15)
            return {}
          end,
        },
      }, 30)
      assert.is_true(met, "the commands did not settle in time")
      for _, id in ipairs(ids) do
        local c = assert(bus:get_command(domain, id))
        assert.equal("COMPLETED", c.status)
        assert.equal(1, c.attempts)
      end
      assert.equal(30, worker:health().successes)
    end)

    it("a handler's context kept past its return raises when used, and the command is a plain table", function()
      local corr = world.uuid()
      local id = send{type = "Keep", data = {n = 1}, correlation_id = corr}
      local kept, keys, cmd_seen
      local worker = assert(bus:worker(world.options(domain, {
        handlers = {
          Keep = function(cmd, ctx)
            kept, cmd_seen, keys = ctx, cmd, {}
            for k in pairs(cmd) do keys[#keys + 1] = k end
            table.sort(keys)
            ctx:stop_worker()
          end,
        },
      })))
      assert(worker:run())
      assert.same({"attempt", "correlation_id", "data", "id", "max_attempts", "msg_id", "type"}, keys)
      assert.same({n = 1}, cmd_seen.data)
      assert.equal(id, cmd_seen.id)
      assert.equal(corr, cmd_seen.correlation_id)
      local ok, err = pcall(kept.extend_visibility, kept, 5)
      assert.is_false(ok)
      assert.matches("no longer valid", tostring(err))
      assert.has_error(function() kept:stop_worker() end)
      assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
    end)

    it("extend_visibility works from module handlers in lane threads", function()
      local id = send{type = "Extend", reply_to = replies}
      work_until_settled({id})
      assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
      assert.same({extended = true}, world.drain_queue(bus, replies)[1].result)
    end)

    it("extend_visibility refuses seconds that are not positive and raises for a wrong type", function()
      local id = send{type = "Bad"}
      local refused, raised
      local worker = assert(bus:worker(world.options(domain, {handlers = {
        Bad = function(_, ctx)
          refused = select(2, ctx:extend_visibility(0))
          raised = not pcall(ctx.extend_visibility, ctx, "5")
          ctx:stop_worker()
        end,
      }})))
      assert(worker:run())
      assert.equal("INVALID_ARGUMENT", refused.code)
      assert.is_true(raised)
      assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
    end)
  end)

  describe("stop", function()
    it("drains handlers in flight: run() returns after they finish and their commands are COMPLETED", function()
      -- Lanes are chosen by a hash of the correlation id, so the two commands
      -- may share a lane and run one after the other; either way both were
      -- fetched before the stop, and the drain must finish both.
      local ids = {send{type = "Slow", data = {seconds = 1}}, send{type = "Slow", data = {seconds = 1}}}
      local worker = assert(bus:worker(world.options(domain, {concurrency = 2})))
      local started = helper.clock()
      local stopped_at
      assert(worker:run{
        tick_interval = 0.05,
        tick = function()
          -- Ticks go on while the worker drains: keep the first stop time.
          if stopped_at or worker:in_flight() >= 1 then
            stopped_at = stopped_at or helper.clock()
            return false
          end
          return helper.clock() - started < 5
        end,
      })
      local returned_at = helper.clock()
      assert.is_number(stopped_at, "no handler started")
      assert.is_true(returned_at - stopped_at >= 0.8, ("run() returned %.3f s after the stop, %.3f s after the start"):format(returned_at - stopped_at, returned_at - started))
      assert.is_true(returned_at - started < 4.5)
      for _, id in ipairs(ids) do
        local c = assert(bus:get_command(domain, id))
        assert.equal("COMPLETED", c.status)
        assert.equal(1, c.attempts)
      end
      assert.equal(0, world.queue_length(bus, commands))
      assert.equal("stopped", worker:health().state)
      assert.equal(0, worker:in_flight())
    end)

    it("worker:stop() from a table-mode handler stops the worker", function()
      local id = send{type = "Stop"}
      local worker
      worker = assert(bus:worker(world.options(domain, {handlers = {
        Stop = function()
          worker:stop()
          return {stopped = true}
        end,
      }})))
      assert(worker:run())
      assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
      assert.equal("stopped", worker:health().state)
    end)

    it("a worker can be closed as soon as run() returns", function()
      -- BUG (core/src/worker.c): maybe_finalize() calls uv_close() on the
      -- worker's timers (and signal handles), which live inside the cb_worker,
      -- and sets the state to STOPPED in the same breath; run() returns, and
      -- worker:close() -> cb_worker_free() frees the struct before the loop
      -- thread's next uv_run iteration finishes closing those handles:
      -- use-after-free (SIGSEGV in uv_run, or libuv's assertion
      -- `handle->flags & UV_HANDLE_CLOSING` in uv__finish_close). Running
      -- this loop aborts the whole busted process, under both interpreters.
      -- The other specs let the garbage collector close their workers.
      for _ = 1, 200 do
        local worker = assert(bus:worker(world.options(domain, {handlers = {}})))
        assert(worker:run{tick_interval = 0.01, tick = function() return false end})
        worker:close()
      end
    end)

    it("a worker runs only once", function()
      local worker = assert(bus:worker(world.options(domain)))
      assert(worker:run{tick = function() return false end})
      local again, err = worker:run()
      assert.is_nil(again)
      assert.equal("INVALID_STATE", err.code)
    end)
  end)

  describe("options", function()
    it("refuses statement_timeout not shorter than visibility_timeout, naming both", function()
      for _, pair in ipairs({{30, 30}, {40, 30}}) do
        local worker, err = bus:worker{domain = domain, handlers = "spec.support.handlers",
                                       statement_timeout = pair[1], visibility_timeout = pair[2]}
        assert.is_nil(worker)
        assert.equal("INVALID_ARGUMENT", err.code)
        assert.matches("statement_timeout", err.message)
        assert.matches("visibility_timeout", err.message)
      end
      assert(bus:worker{domain = domain, handlers = "spec.support.handlers",
                        statement_timeout = 2, visibility_timeout = 3}):close()
    end)

    it("refuses an invalid domain and raises on wrongly typed options", function()
      local worker, err = bus:worker{domain = "Bad-Domain", handlers = "spec.support.handlers"}
      assert.is_nil(worker)
      assert.equal("INVALID_ARGUMENT", err.code)
      assert.has_error(function() bus:worker{domain = domain, handlers = 5} end)
      assert.equal("INVALID_ARGUMENT", select(2, bus:worker{domain = domain, handlers = {}, concurrency = -1}).code)
      assert.has_error(function() bus:worker{domain = domain, handlers = {}, retry = {backoff = {"x"}}} end)
    end)
  end)

  describe("table-mode handlers", function()
    it("run on the thread and Lua state that called run()", function()
      local id = send{type = "Here"}
      local caller_thread = coroutine.running()
      local touched, same_thread = false, nil
      local worker = assert(bus:worker(world.options(domain, {handlers = {
        Here = function(_, ctx)
          touched = true -- an upvalue: only the caller's Lua state can see it
          same_thread = coroutine.running() == caller_thread
          ctx:stop_worker()
        end,
      }})))
      assert(worker:run())
      assert.is_true(touched)
      assert.is_true(same_thread)
      assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
    end)
  end)

  describe("health", function()
    it("counts successes, failures, consecutive failures and poison", function()
      local q = assert(bus:queue(commands))
      assert(q:create())
      local ids = assert(bus:send_batch{domain = domain, commands = {
        {type = "Echo"}, {type = "Permanent"}, {type = "Refuse", data = {balance = 1}},
      }})
      assert(q:send({"poison"}))
      local list = {}
      for i, r in ipairs(ids) do list[i] = r.command_id end
      local fresh = assert(bus:worker(world.options(domain)))
      local h0 = fresh:health()
      assert.equal(0, h0.successes)
      assert.equal(0, h0.in_flight)
      assert.is_nil(h0.last_success_at)
      fresh:close()

      local settled = world.settled(bus, domain, list)
      local worker, met = world.work(bus, domain, function()
        return settled() and #world.details(bus, domain, ZERO_UUID, "MESSAGE_REJECTED") == 1
      end)
      assert.is_true(met)
      local h = worker:health()
      assert.equal("stopped", h.state)
      assert.equal(1, h.successes)
      assert.equal(2, h.failures)
      assert.equal(2, h.consecutive_failures) -- one lane: Echo, then two failures in send order
      assert.equal(1, h.poison)
      assert.equal(0, h.stuck)
      assert.equal(0, h.in_flight)
      assert.is_number(h.last_success_at)
      assert.is_true(math.abs(h.last_success_at - os.time()) < 60)
    end)

    it("held counts the commands received and not yet acknowledged; in_flight those whose handler runs", function()
      local ids = {}
      for i = 1, 3 do ids[i] = send{type = "Slow", data = {seconds = 0.3}} end
      local worker = assert(bus:worker(world.options(domain)))
      assert.equal(0, worker:health().held)
      local settled = world.settled(bus, domain, ids)
      local started = helper.clock()
      local most_held, most_running = 0, 0
      assert(worker:run{tick_interval = 0.02, tick = function()
        local h = assert(worker:health())
        most_held = math.max(most_held, h.held)
        most_running = math.max(most_running, h.in_flight)
        return not settled() and helper.clock() - started < 10
      end})
      assert.is_true(settled())
      -- One lane: one handler at a time, while the worker holds more (its
      -- first fetch takes two commands for the lane).
      assert.equal(1, most_running)
      assert.is_true(most_held >= 2, ("held at most %d"):format(most_held))
      local h = worker:health()
      assert.equal(0, h.held)
      assert.equal(0, h.in_flight)
    end)

    it("a success resets consecutive failures", function()
      local ids = {}
      for i, r in ipairs(assert(bus:send_batch{domain = domain, commands = {
        {type = "Permanent"}, {type = "Echo"},
      }})) do ids[i] = r.command_id end
      local worker = work_until_settled(ids)
      local h = worker:health()
      assert.equal(1, h.failures)
      assert.equal(1, h.successes)
      assert.equal(0, h.consecutive_failures)
    end)
  end)
end)

describe("worker handler modules", function()
  it("work without requiring commandbus themselves (data decoded, result encoded)", function()
    local bus = helper.bus()
    local domain = helper.unique("plain")
    local sent = assert(bus:send{domain = domain, type = "Double", data = {n = 21}, reply_to = domain .. "__r"})
    local q = assert(bus:queue(domain .. "__commands"))
    local worker = assert(bus:worker{domain = domain, handlers = "spec.support.plain_handlers", poll_interval = 0.05})
    worker:run{tick_interval = 0.05, tick = function() return assert(q:metrics()).queue_length > 0 end}
    worker:close()
    assert.equal("COMPLETED", assert(bus:get_command(domain, sent.command_id)).status)
    local replies = assert(assert(bus:queue(domain .. "__r")):read{qty = 1})
    assert.equal(42, replies[1].message.result.twice)
    bus:close()
  end)
end)
