-- Sending commands and reading them back (docs/architecture.md, "Data
-- contract": the command message, the tables, the SENT audit event).
local commandbus = require "commandbus"
local helper = require "spec.helper"
local world = require "spec.support.world"
local cjson = require "cjson"

describe("send", function()
  local bus, domain, commands

  before_each(function()
    bus = world.bus()
    domain = world.domain()
    commands = domain .. "__commands"
  end)

  after_each(function() bus:close() end)

  it("writes a PENDING command row with no attempts and the policy's max_attempts", function()
    local sent = assert(bus:send{domain = domain, type = "Echo", data = {n = 1}})
    local c = assert(bus:get_command(domain, sent.command_id))
    assert.equal(sent.command_id, c.command_id)
    assert.equal(domain, c.domain)
    assert.equal("Echo", c.type)
    assert.equal("PENDING", c.status)
    assert.equal(0, c.attempts)
    assert.equal(3, c.max_attempts)
    assert.equal(sent.msg_id, c.msg_id)
    assert.equal(commands, c.queue_name)
    assert.is_nil(c.reply_to)
    assert.is_nil(c.batch_id)
    assert.is_nil(c.last_error_code)
  end)

  it("takes a command's fields through its metatable, each string alive for the whole call", function()
    -- A command table whose __index makes its fields (a class-like object):
    -- the strings it hands out are referenced by nothing else, and the
    -- collector running while the call reads the rest must not free them.
    local function command(i)
      return setmetatable({}, {__index = function(_, k)
        if k == "type" then return ("Type%d_"):format(i) .. ("x"):rep(40) end
        if k == "domain" then return domain end
        if k == "data" then
          collectgarbage("collect")
          local fresh = {}
          for j = 1, 200 do fresh[j] = ("other%d_"):format(j) .. ("y"):rep(40) end
          return {i = i, n = #fresh}
        end
      end})
    end
    local function type_of(id) return assert(bus:get_command(domain, id)).type end
    local one = assert(bus:send(command(0)))
    assert.equal("Type0_" .. ("x"):rep(40), type_of(one.command_id))
    local list = {}
    for i = 1, 20 do list[i] = command(i) end
    local many = assert(bus:send_batch{domain = domain, commands = list})
    for i, r in ipairs(many) do assert.equal(("Type%d_"):format(i) .. ("x"):rep(40), type_of(r.command_id)) end
    local batch = assert(bus:create_batch{domain = domain, name = "metatables", commands = {command(1), command(2)}})
    assert.equal("Type2_" .. ("x"):rep(40), type_of(batch.commands[2].command_id))
  end)

  it("queues a message in rcmd's format, without reply_to when none was given", function()
    local sent = assert(bus:send{domain = domain, type = "Echo", data = {order = 7, items = {"a"}}})
    local msgs = assert(assert(bus:queue(commands)):read{vt = 300, qty = 10})
    assert.equal(1, #msgs)
    assert.equal(sent.msg_id, msgs[1].msg_id)
    local m = msgs[1].message
    assert.same({"command_id", "command_type", "correlation_id", "data", "domain"}, world.keys(m))
    assert.equal(domain, m.domain)
    assert.equal("Echo", m.command_type)
    assert.equal(sent.command_id, m.command_id)
    assert.matches(world.UUID_PATTERN, m.correlation_id)
    assert.same({order = 7, items = {"a"}}, m.data)
  end)

  it("puts reply_to in the message, the row and the audit when it is given", function()
    local replies = domain .. "__replies"
    local sent = assert(bus:send{domain = domain, type = "Echo", reply_to = replies})
    local m = world.drain_queue(bus, commands)[1]
    assert.equal(replies, m.reply_to)
    assert.equal(replies, assert(bus:get_command(domain, sent.command_id)).reply_to)
    assert.equal(replies, world.details(bus, domain, sent.command_id, "SENT")[1].reply_to)
    -- The reply queue exists at once: reading it works and finds nothing.
    assert.equal(0, world.queue_length(bus, replies))
  end)

  it("sends an empty object as data when none is given", function()
    assert(bus:send{domain = domain, type = "Echo"})
    local m = world.drain_queue(bus, commands)[1]
    assert.same({}, m.data)
  end)

  it("audits SENT with the command type, correlation id, reply_to, msg_id and batch_id", function()
    local sent = assert(bus:send{domain = domain, type = "Echo"})
    local audit = assert(bus:audit(domain, sent.command_id))
    assert.equal(1, #audit)
    assert.equal("SENT", audit[1].event_type)
    assert.is_string(audit[1].ts)
    local d = audit[1].details
    assert.equal("Echo", d.command_type)
    assert.equal(sent.msg_id, d.msg_id)
    assert.equal(assert(bus:get_command(domain, sent.command_id)).correlation_id, d.correlation_id)
    assert.equal(world.null, d.reply_to)
    assert.equal(world.null, d.batch_id)
  end)

  it("generates lower-case UUIDs for the command id and the correlation id", function()
    local sent = assert(bus:send{domain = domain, type = "Echo"})
    assert.matches(world.UUID_PATTERN, sent.command_id)
    assert.equal(sent.command_id:lower(), sent.command_id)
    local c = assert(bus:get_command(domain, sent.command_id))
    assert.matches(world.UUID_PATTERN, c.correlation_id)
    assert.equal(c.correlation_id:lower(), c.correlation_id)
    assert.not_equal(sent.command_id, c.correlation_id)
    local other = assert(bus:send{domain = domain, type = "Echo"})
    assert.not_equal(sent.command_id, other.command_id)
  end)

  it("keeps a given id, normalised to lower case", function()
    local id = world.uuid():upper()
    local sent = assert(bus:send{domain = domain, type = "Echo", id = id})
    assert.equal(id:lower(), sent.command_id)
    assert.equal(id:lower(), assert(bus:get_command(domain, id)).command_id)
  end)

  it("keeps a given correlation_id the same in the message, the row and the audit", function()
    local corr = world.uuid()
    local sent = assert(bus:send{domain = domain, type = "Echo", correlation_id = corr})
    assert.equal(corr, world.drain_queue(bus, commands)[1].correlation_id)
    assert.equal(corr, assert(bus:get_command(domain, sent.command_id)).correlation_id)
    assert.equal(corr, world.details(bus, domain, sent.command_id, "SENT")[1].correlation_id)
  end)

  it("keeps max_attempts given per command", function()
    local sent = assert(bus:send{domain = domain, type = "Echo", max_attempts = 7})
    assert.equal(7, assert(bus:get_command(domain, sent.command_id)).max_attempts)
  end)

  it("with a delay keeps the message invisible", function()
    assert(bus:send{domain = domain, type = "Echo", delay = 30})
    assert.same({}, assert(assert(bus:queue(commands)):read{}))
    assert.equal(1, world.queue_length(bus, commands))
  end)

  it("refuses a duplicate (domain, id) with DUPLICATE_COMMAND and writes nothing", function()
    local id = world.uuid()
    local first = assert(bus:send{domain = domain, type = "Echo", id = id, data = {n = 1}})
    local again, err = bus:send{domain = domain, type = "Other", id = id, data = {n = 2}}
    assert.is_nil(again)
    assert.equal("DUPLICATE_COMMAND", err.code)
    assert.equal(1, world.queue_length(bus, commands))
    local c = assert(bus:get_command(domain, id))
    assert.equal("Echo", c.type)
    assert.equal(first.msg_id, c.msg_id)
    assert.same({"SENT"}, world.events(bus, domain, id))
  end)

  it("with notify_after_commit writes the same row, message and SENT audit (the notify goes after)", function()
    local after = helper.bus{notify_after_commit = true}
    local sent = assert(after:send{domain = domain, type = "Echo", data = {n = 2}})
    local batch = assert(after:send_batch{domain = domain, commands = {{type = "Echo"}, {type = "Echo"}}})
    after:close()
    local c = assert(bus:get_command(domain, sent.command_id))
    assert.equal("PENDING", c.status)
    assert.equal(sent.msg_id, c.msg_id)
    assert.same({"SENT"}, world.events(bus, domain, sent.command_id))
    assert.same({"SENT"}, world.events(bus, domain, batch[2].command_id))
    local msgs = world.drain_queue(bus, commands)
    assert.equal(3, #msgs)
    assert.same({n = 2}, msgs[1].data)
    assert.has_error(function() helper.bus{notify_after_commit = "yes"} end)
  end)

  it("accepts the same id in another domain", function()
    local id = world.uuid()
    assert(bus:send{domain = domain, type = "Echo", id = id})
    local other = world.domain()
    assert(bus:send{domain = other, type = "Echo", id = id})
    assert.equal(other, assert(bus:get_command(other, id)).domain)
  end)
end)

describe("send_batch", function()
  local bus, domain, commands

  before_each(function()
    bus = world.bus()
    domain = world.domain()
    commands = domain .. "__commands"
  end)

  after_each(function() bus:close() end)

  it("sends every command in order, one result each", function()
    local res = assert(bus:send_batch{domain = domain, commands = {
      {type = "A", data = {n = 1}}, {type = "B", data = {n = 2}}, {type = "C", data = {n = 3}},
    }})
    assert.equal(3, #res)
    assert.is_true(res[1].msg_id < res[2].msg_id and res[2].msg_id < res[3].msg_id)
    local msgs = world.drain_queue(bus, commands)
    for i, t in ipairs({"A", "B", "C"}) do
      assert.equal(t, msgs[i].command_type)
      assert.equal(res[i].command_id, msgs[i].command_id)
      assert.equal(i, msgs[i].data.n)
      assert.same({"SENT"}, world.events(bus, domain, res[i].command_id))
    end
  end)

  -- send_batch and send write through different statements (core/src/bus.c):
  -- what each leaves behind must be the same, row for row.
  it("writes the same command rows, messages and SENT audit rows as send", function()
    local single, batched = world.domain(), domain
    local function specs()
      return {
        {type = "A", data = {n = 1}, correlation_id = "0190a5d0-0000-7000-8000-000000000001"},
        {type = "B", correlation_id = "0190a5d0-0000-7000-8000-000000000002"},
        {type = "C", data = {s = "x\"y\\z", list = {1, 2.5, true}}, reply_to = "rows__replies",
         correlation_id = "0190a5d0-0000-7000-8000-000000000003"},
        {type = "D", data = {}, priority = 5, max_attempts = 7, correlation_id = "0190a5d0-0000-7000-8000-000000000004"},
        {type = "E", data = {n = 2}, priority = -3, reply_to = "rows__replies", batch_id = world.uuid(),
         correlation_id = "0190a5d0-0000-7000-8000-000000000005"},
      }
    end
    local sent = {}
    for i, spec in ipairs(specs()) do
      spec.domain = single
      sent[i] = assert(bus:send(spec))
    end
    local res = assert(bus:send_batch{domain = batched, commands = specs()})
    -- Each command's rows, its ids and times left out (but checked to agree).
    local function rows(d)
      return cjson.decode(helper.sql(([[
        SELECT json_agg(json_build_object(
          'row', to_jsonb(c) - 'domain' - 'command_id' - 'msg_id' - 'created_at' - 'updated_at' - 'batch_id'
                 || jsonb_build_object('queue_name', c.queue_name = '%s__commands', 'batch', c.batch_id IS NOT NULL),
          'message', q.message - 'command_id' - 'domain',
          'message_ids', q.message->>'command_id' = c.command_id::text AND q.message->>'domain' = c.domain,
          'queued', jsonb_build_object('read_ct', q.read_ct, 'headers', q.headers, 'visible', q.vt <= clock_timestamp()),
          'audit', (SELECT json_agg(json_build_object('event', a.event_type, 'ts', a.ts = c.created_at,
                      'details', a.details_json - 'msg_id' - 'batch_id',
                      'ids', (a.details_json->>'msg_id')::bigint = c.msg_id
                             AND (a.details_json->'batch_id' = 'null' AND c.batch_id IS NULL
                                  OR a.details_json->>'batch_id' = c.batch_id::text)) ORDER BY a.audit_id)
                    FROM commandbus.audit a WHERE a.domain = c.domain AND a.command_id = c.command_id))
          ORDER BY c.msg_id)
        FROM commandbus.command c JOIN pgmq.q_%s__commands q ON q.msg_id = c.msg_id WHERE c.domain = '%s']]):format(d, d, d)))
    end
    local want, got = rows(single), rows(batched)
    assert.equal(5, #got)
    assert.same(want, got)
    for i, r in ipairs(got) do
      assert.is_true(r.message_ids)
      assert.is_true(r.audit[1].ids)
      assert.equal(i, ({A = 1, B = 2, C = 3, D = 4, E = 5})[r.row.command_type])
    end
    -- In the order of the call: message ids and audit ids.
    local order = helper.sql(([[
      SELECT bool_and(ok) FROM (SELECT c.msg_id > lag(c.msg_id) OVER w AND a.audit_id > lag(a.audit_id) OVER w AS ok
      FROM commandbus.command c JOIN commandbus.audit a USING (domain, command_id)
      WHERE c.domain = '%s' WINDOW w AS (ORDER BY c.command_type)) t]]):format(batched))
    assert.equal("t", order:match("%a+"))
    for i, r in ipairs(res) do assert.equal(sent[i].msg_id ~= nil, r.msg_id ~= nil) end
    assert.is_true(bus:queue(single .. "__commands"):drop())
  end)

  it("reports a command that already exists as a duplicate and writes the rest", function()
    local id = world.uuid()
    assert(bus:send{domain = domain, type = "Old", id = id})
    local res = assert(bus:send_batch{domain = domain, commands = {
      {type = "A"}, {type = "New", id = id}, {type = "C"},
    }})
    assert.equal(3, #res)
    assert.is_number(res[1].msg_id)
    assert.is_nil(res[1].duplicate)
    assert.equal(id, res[2].command_id)
    assert.is_true(res[2].duplicate)
    assert.is_nil(res[2].msg_id)
    assert.is_number(res[3].msg_id)
    assert.equal(3, world.queue_length(bus, commands))
    assert.equal("Old", assert(bus:get_command(domain, id)).type)
    assert.same({"SENT"}, world.events(bus, domain, id))
    assert.equal("PENDING", assert(bus:get_command(domain, res[3].command_id)).status)
  end)

  it("reports the second of two commands with the same id in one batch as a duplicate", function()
    -- BUG: the batch fails as a whole with a DATABASE error (unique violation
    -- on the queue's msg_id): both input rows join the one inserted command
    -- row in send_sql (core/src/bus.c), so two messages get the same msg_id.
    local id = world.uuid()
    local res, err = bus:send_batch{domain = domain, commands = {{type = "A", id = id}, {type = "B", id = id}}}
    assert.is_nil(err)
    assert.is_number(res[1].msg_id)
    assert.is_true(res[2].duplicate)
    assert.equal(1, world.queue_length(bus, commands))
  end)

  it("returns an empty list for no commands", function()
    assert.same({}, assert(bus:send_batch{domain = domain, commands = {}}))
  end)

  it("writes nothing when one command is invalid", function()
    local res, err = bus:send_batch{domain = domain, commands = {{type = "A"}, {type = "B", id = "nope"}}}
    assert.is_nil(res)
    assert.equal("INVALID_ARGUMENT", err.code)
    assert.same({}, assert(bus:list_commands{domain = domain}))
  end)

  -- From 2,000 fresh commands send_batch starts the send before it has read
  -- them all, and hands them over as it reads (cb_bus_stream_start in
  -- core/src/bus.c): a bad command found after the first ones went must
  -- still write nothing, answer as it always did, and leave the bus usable.
  describe("of many commands", function()
    local N = 2500
    local function many()
      local list = {}
      for i = 1, N do list[i] = {type = "T", data = {n = i}} end
      return list
    end
    local function written()
      return tonumber(helper.sql(([[SELECT (SELECT count(*) FROM commandbus.command WHERE domain = '%s')
        + (SELECT count(*) FROM commandbus.audit WHERE domain = '%s')]]):format(domain, domain)):match("%d+"))
    end
    -- Nothing of the failed call is left under way on the bus's connections
    -- (a COPY waiting for commands would hold one and its transaction).
    local function still_usable()
      local busy = helper.sql(([[SELECT count(*) FROM pg_stat_activity
        WHERE application_name = 'spec_%s' AND state <> 'idle']]):format(domain))
      assert.equal(0, tonumber(busy:match("%d+")))
      assert.equal(N, #assert(bus:send_batch{domain = domain, commands = many()}))
      assert.equal(2 * N, written())
    end

    before_each(function()
      bus:close()
      bus = helper.bus{application_name = "spec_" .. domain}
    end)

    it("answers each command with the ids the database holds", function()
      local res = assert(bus:send_batch{domain = domain, commands = many()})
      assert.equal(N, #res)
      local want = {}
      for i, r in ipairs(res) do
        assert.is_nil(r.duplicate)
        if i > 1 then assert.is_true(r.msg_id > res[i - 1].msg_id) end
        want[i] = ("%s %d %d"):format(r.command_id, r.msg_id, i)
      end
      local got = helper.sql(([[SELECT string_agg(c.command_id || ' ' || c.msg_id || ' ' || (q.message->'data'->>'n'),
        ',' ORDER BY c.msg_id) FROM commandbus.command c JOIN pgmq.q_%s q ON q.msg_id = c.msg_id
        WHERE c.domain = '%s']]):format(commands, domain))
      assert.equal(table.concat(want, ","), got:match("^(.-)\n?$"))
      assert.equal(2 * N, written())
    end)

    it("raises for a bad command found late, writing nothing", function()
      local list = many()
      list[N - 100] = {type = 5}
      local ok, why = pcall(bus.send_batch, bus, {domain = domain, commands = list})
      assert.is_false(ok)
      assert.matches(("bad command #%d field 'type': string expected, got number"):format(N - 100), why, 1, true)
      assert.equal(0, written())
      still_usable()
    end)

    it("returns nil, err for a command found late that it cannot send, writing nothing", function()
      local list = many()
      list[N - 100] = {type = "T", id = "nope"}
      local res, err = bus:send_batch{domain = domain, commands = list}
      assert.is_nil(res)
      assert.equal("INVALID_ARGUMENT", err.code)
      assert.matches(("command #%d: id `nope` is not a UUID"):format(N - 100), err.message, 1, true)
      list[N - 100] = {type = "T", data = {f = print}}
      res, err = bus:send_batch{domain = domain, commands = list}
      assert.is_nil(res)
      assert.equal("INVALID_ARGUMENT", err.code)
      assert.matches(("cannot encode command #%d data as JSON"):format(N - 100), err.message, 1, true)
      assert.equal(0, written())
      still_usable()
    end)

    it("sends a command found late with its own id by statement, with the rest", function()
      local list = many()
      local id = world.uuid()
      list[N - 100] = {type = "T", id = id}
      local res = assert(bus:send_batch{domain = domain, commands = list})
      assert.equal(id, res[N - 100].command_id)
      assert.equal(2 * N, written())
    end)

    -- A streamed send holds a connection while the commands are read; with
    -- a pool of one, a command whose reading calls the bus must not wait
    -- for it (it would fail for want of a connection).
    it("reads commands that call the bus on a pool of one connection", function()
      bus:close()
      bus = helper.bus{pool_size = 1, application_name = "spec_" .. domain}
      local list = many()
      local nested
      list[N - 100] = setmetatable({type = "T"}, {__index = function(_, key)
        if key == "data" and not nested then nested = assert(bus:send{domain = domain, type = "Inner"}) end
      end})
      assert.equal(N, #assert(bus:send_batch{domain = domain, commands = list}))
      assert.is_string(nested.command_id)
      assert.equal(2 * (N + 1), written())
    end)
  end)

  -- Under Lua 5.4 send_batch pauses the collector while it runs
  -- (bindings/lua/commands.c): it must leave it as it found it, whether the
  -- call returns, returns nil, err or raises.
  it("leaves the garbage collector running or stopped as it found it", function()
    local known, running = pcall(collectgarbage, "isrunning")
    if not known then return pending("collectgarbage('isrunning') is Lua 5.2 and later") end
    assert.is_true(running)
    local ok, why = pcall(bus.send_batch, bus, {domain = domain, commands = {{type = "A"}, {data = {}}}})
    assert.is_false(ok)
    assert.matches("bad command #2: field 'type' is required", why, 1, true)
    assert.is_true(collectgarbage("isrunning"))
    local res, err = bus:send_batch{domain = domain, commands = {{type = "A"}, {type = "B", id = "nope"}}}
    assert.is_nil(res)
    assert.equal("INVALID_ARGUMENT", err.code)
    assert.is_true(collectgarbage("isrunning"))
    assert.equal(2, #assert(bus:send_batch{domain = domain, commands = {{type = "A"}, {type = "B"}}}))
    assert.is_true(collectgarbage("isrunning"))
    collectgarbage("stop")
    local sent = bus:send_batch{domain = domain, commands = {{type = "C"}}}
    local still_stopped = not collectgarbage("isrunning")
    collectgarbage("restart")
    assert.equal(1, #assert(sent))
    assert.is_true(still_stopped)
  end)
end)

describe("send with bad input", function()
  local bus, domain

  before_each(function()
    bus = world.bus()
    domain = world.domain()
  end)

  after_each(function() bus:close() end)

  local function refused(spec)
    local res, err = bus:send(spec)
    assert.is_nil(res)
    assert.equal("INVALID_ARGUMENT", err.code)
    return err
  end

  it("raises when the type is missing or not a string", function()
    assert.has_error(function() bus:send{domain = domain} end)
    assert.has_error(function() bus:send{domain = domain, type = 5} end)
    assert.has_error(function() bus:send_batch{domain = domain, commands = {{type = "A"}, {data = {}}}} end)
  end)

  it("raises when the domain is not a string or data is not a table", function()
    assert.has_error(function() bus:send{type = "Echo"} end)
    assert.has_error(function() bus:send{domain = domain, type = "Echo", data = "text"} end)
  end)

  it("returns INVALID_ARGUMENT, naming the range, for max_attempts or delay out of range", function()
    assert.matches("max_attempts' must be an integer from 1 to 1000", refused{domain = domain, type = "Echo",
                                                                            max_attempts = 0}.message)
    assert.matches("delay' must be a number from 0", refused{domain = domain, type = "Echo", delay = -1}.message)
  end)

  it("returns INVALID_ARGUMENT for an id that is not a UUID", function()
    assert.matches("not a UUID", refused{domain = domain, type = "Echo", id = "order-42"}.message)
    refused{domain = domain, type = "Echo", correlation_id = "x"}
    refused{domain = domain, type = "Echo", batch_id = "x"}
  end)

  it("returns INVALID_ARGUMENT for an invalid reply_to queue name", function()
    refused{domain = domain, type = "Echo", reply_to = "Bad Queue"}
    refused{domain = domain, type = "Echo", reply_to = "x; drop table y"}
  end)

  it("returns INVALID_ARGUMENT for an invalid domain", function()
    for _, bad in ipairs({"", "Orders", "a-b", "1abc", string.rep("a", 60)}) do
      local res, err = bus:send{domain = bad, type = "Echo"}
      assert.is_nil(res)
      assert.equal("INVALID_ARGUMENT", err.code)
    end
  end)

  it("writes nothing for refused input", function()
    refused{domain = domain, type = "Echo", id = "nope"}
    refused{domain = domain, type = "Echo", reply_to = "Bad"}
    assert.same({}, assert(bus:list_commands{domain = domain}))
  end)
end)

-- Command data is a JSON object by the contract shared with rcmd: a Lua list
-- (or any table lua-cjson writes as an array) is refused at once, on every
-- path that takes a command's data, and nothing is written.
describe("command data that is not a JSON object", function()
  local bus, domain

  before_each(function()
    bus = world.bus()
    domain = world.domain()
  end)

  after_each(function() bus:close() end)

  local lists = {{1, 2}, {"a"}, {[2] = "x"}, {{n = 1}}}

  -- The error raised (under Lua 5.4 with the caller's position in front).
  local function raised(message, err)
    local text = tostring(err):gsub("^[^:]*:%d+: ", "")
    assert.equal(message, text)
  end

  local function refused(call, message)
    for _, data in ipairs(lists) do
      local ok, err = pcall(call, data)
      assert.is_false(ok)
      raised(message, err)
    end
    assert.same({}, assert(bus:list_commands{domain = domain}))
  end

  it("send raises, naming the field", function()
    refused(function(data) return bus:send{domain = domain, type = "Echo", data = data} end,
            "bad command field 'data': JSON object expected, got a table that encodes as an array")
  end)

  it("request raises, naming the field", function()
    refused(function(data) return bus:request{domain = domain, type = "Echo", data = data, timeout = 0} end,
            "bad command field 'data': JSON object expected, got a table that encodes as an array")
  end)

  it("send_batch raises, naming the command's position, and writes none of the commands", function()
    refused(function(data)
      return bus:send_batch{domain = domain, commands = {{type = "Echo", data = {n = 1}}, {type = "Echo", data = data}}}
    end, "bad command #2 field 'data': JSON object expected, got a table that encodes as an array")
    -- Past the first piece of a streamed send (2,000 commands and more) too.
    local many = {}
    for i = 1, 3000 do many[i] = {type = "Echo", data = {i = i}} end
    many[2900].data = {1, 2}
    local ok, err = pcall(bus.send_batch, bus, {domain = domain, commands = many})
    assert.is_false(ok)
    raised("bad command #2900 field 'data': JSON object expected, got a table that encodes as an array", err)
    assert.same({}, assert(bus:list_commands{domain = domain}))
  end)

  it("create_batch raises, naming the command's position", function()
    refused(function(data)
      return bus:create_batch{domain = domain, commands = {{type = "Echo"}, {type = "Echo", data = data}}}
    end, "bad command #2 field 'data': JSON object expected, got a table that encodes as an array")
    assert.same({}, assert(bus:list_batches{domain = domain}))
  end)

  it("process_start raises for the first step's command, and writes no process", function()
    refused(function(data)
      return bus:process_start{domain = domain, type = "Saga", step = "one", reply_to = domain .. "__process_replies",
                               command = {type = "Echo", data = data}}
    end, "bad command field 'data': JSON object expected, got a table that encodes as an array")
    assert.same({}, assert(bus:list_processes{domain = domain}))
  end)

  it("schedule raises, naming the option, and writes no schedule", function()
    for _, data in ipairs(lists) do
      local ok, err = pcall(bus.schedule, bus, {name = domain, domain = domain, type = "Echo", every = 60, data = data})
      assert.is_false(ok)
      raised("bad option 'data': JSON object expected, got a table that encodes as an array", err)
    end
    assert.same({}, assert(bus:list_schedules{domain = domain}))
  end)

  it("still sends an empty table as the empty object", function()
    assert(bus:send{domain = domain, type = "Echo", data = {}})
    assert(bus:send_batch{domain = domain, commands = {{type = "Echo", data = {}}}})
    assert(bus:create_batch{domain = domain, commands = {{type = "Echo", data = {}}}})
    local stored = helper.sql(("SELECT string_agg((message->'data')::text, ' ' ORDER BY msg_id) FROM pgmq.q_%s__commands"):format(domain))
    assert.equal("{} {} {}", stored:match("^%s*(.-)%s*$"))
    local s = assert(bus:schedule{name = domain, domain = domain, type = "Echo", every = 60, data = {}})
    assert.equal("{}", helper.sql(("SELECT data::text FROM commandbus.schedule WHERE name = '%s'"):format(domain))
                         :match("^%s*(.-)%s*$"))
    assert.same({}, s.data)
    assert(bus:unschedule(domain))
  end)
end)

-- An options table may be a proxy (a config object) whose __index makes the
-- values it hands out: then nothing but the call holds those strings, and a
-- collection while the call reads its other options must not free them.
describe("options given through a metatable", function()
  local bus, domain

  before_each(function()
    bus = world.bus()
    domain = world.domain()
  end)

  after_each(function() bus:close() end)

  -- Long text made anew at each call (referenced by nothing else until then).
  local function text(prefix) return prefix .. "_" .. ("x"):rep(44) end

  -- A table whose fields come from `fields` through __index (a function
  -- there is called for a fresh string); reading field `last` collects
  -- garbage first and makes strings of the same size, which take the memory
  -- of anything freed.
  local function proxy(fields, last)
    return setmetatable({}, {__index = function(_, k)
      if k == last then
        collectgarbage("collect")
        local fresh = {}
        for j = 1, 200 do fresh[j] = ("other%03d_"):format(j) .. ("y"):rep(40) end
      end
      local v = fields[k]
      if type(v) == "function" then return v() end
      return v
    end})
  end

  it("list_commands keeps every filter alive until the query is made", function()
    assert(bus:send{domain = domain, type = text("Listed")})
    local list = assert(bus:list_commands(proxy({domain = domain, type = function() return text("Listed") end},
                                                "offset")))
    assert.equal(1, #list)
    assert.equal(text("Listed"), list[1].type)
  end)

  it("schedule keeps its name and type alive until the schedule is written", function()
    local s = assert(bus:schedule(proxy({
      name = function() return text(domain) end,
      domain = domain,
      type = function() return text("Tick") end,
      every = 60,
      data = {n = 1},
    }, "data")))
    assert.equal(text(domain), s.name)
    assert.equal(text("Tick"), s.type)
    assert(bus:unschedule(text(domain)))
  end)

  it("process_start keeps its type and step alive until the process is written", function()
    local id = assert(bus:process_start(proxy({
      domain = domain,
      type = function() return text("Saga") end,
      step = function() return text("step") end,
      reply_to = domain .. "__process_replies",
      state = {n = 1},
      command = {type = "Reserve"},
    }, "state")))
    local p = assert(bus:get_process(domain, id))
    assert.equal(text("Saga"), p.type)
    assert.equal(text("step"), p.current_step)
  end)

  it("connect keeps application_name alive until the connections are made", function()
    local name = function() return "app_" .. ("z"):rep(40) end
    local b = assert(commandbus.connect(os.getenv("DATABASE_URL"),
                                        proxy({application_name = name}, "notify_after_commit")))
    assert(b:list_commands{domain = domain})
    local seen = helper.sql(("SELECT count(*) FROM pg_stat_activity WHERE application_name = '%s'"):format(name()))
    b:close()
    assert.is_true(tonumber(seen:match("%d+")) > 0)
  end)
end)

describe("queries", function()
  local bus, domain

  before_each(function()
    bus = world.bus()
    domain = world.domain()
  end)

  after_each(function() bus:close() end)

  it("get_command returns NOT_FOUND for an unknown id and INVALID_ARGUMENT for a bad one", function()
    local c, err = bus:get_command(domain, world.uuid())
    assert.is_nil(c)
    assert.equal("NOT_FOUND", err.code)
    c, err = bus:get_command(domain, "nope")
    assert.is_nil(c)
    assert.equal("INVALID_ARGUMENT", err.code)
  end)

  it("get_command does not see a command of another domain", function()
    local sent = assert(bus:send{domain = domain, type = "Echo"})
    local c, err = bus:get_command(world.domain(), sent.command_id)
    assert.is_nil(c)
    assert.equal("NOT_FOUND", err.code)
  end)

  it("list_commands filters by type, correlation_id, status and batch, and pages", function()
    local corr = world.uuid()
    local a1 = assert(bus:send{domain = domain, type = "A", correlation_id = corr})
    local a2 = assert(bus:send{domain = domain, type = "A"})
    local b1 = assert(bus:send{domain = domain, type = "B", correlation_id = corr})
    local batch = assert(bus:create_batch{domain = domain, commands = {{type = "C"}}})
    assert(bus:send{domain = world.domain(), type = "A"}) -- another domain: never listed

    local function ids(filter)
      filter.domain = domain
      local out = {}
      for i, c in ipairs(assert(bus:list_commands(filter))) do out[i] = c.command_id end
      return out
    end

    assert.equal(4, #ids{})
    assert.same({a1.command_id, a2.command_id}, ids{type = "A"})
    assert.same({a1.command_id, b1.command_id}, ids{correlation_id = corr})
    assert.same({a1.command_id}, ids{correlation_id = corr, type = "A"})
    assert.same({batch.commands[1].command_id}, ids{batch_id = batch.batch_id})
    assert.equal(4, #ids{status = "PENDING"})
    assert.same({}, ids{status = "COMPLETED"})
    local all = ids{}
    assert.same({all[2], all[3]}, ids{limit = 2, offset = 1})
    assert.same({}, ids{type = "Nothing"})
  end)

  it("list_commands returns INVALID_ARGUMENT for a correlation_id that is not a UUID", function()
    local res, err = bus:list_commands{domain = domain, correlation_id = "x"}
    assert.is_nil(res)
    assert.equal("INVALID_ARGUMENT", err.code)
  end)

  it("audit of an unknown command is an empty list", function()
    assert.same({}, assert(bus:audit(domain, world.uuid())))
  end)
end)
