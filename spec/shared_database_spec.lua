-- One database shared with rcmd and pgmq, whichever came first. Each order is
-- built on a database of its own, created here and dropped afterwards:
--   rcmd's migrations, then setup();  setup() alone;  setup(), then rcmd's
--   migrations.
-- rcmd's schema and procedures come from spec/fixtures/rcmd_v001.sql and
-- rcmd_v004.sql, pgmq (as plain SQL, without an extension row) from
-- spec/fixtures/pgmq.sql. Where commandbus runs first it makes a queue before
-- pgmq is loaded, so that pgmq's own functions meet a queue commandbus built.
local commandbus = require "commandbus"
local helper = require "spec.helper"
local world = require "spec.support.world"
local saga = require "spec.support.saga"

local main_url = assert(os.getenv("DATABASE_URL"), "DATABASE_URL is not set")

--- The URL of another database on the same server.
local function url_of(database)
  local url, n = main_url:gsub("^(%a[%w+.-]*://[^/]*/)[^?]*", "%1" .. database)
  assert(n == 1, "cannot find the database name in DATABASE_URL")
  return url
end

--- Runs SQL with psql (from a file, so that the shell never sees it); raises
-- with psql's message when a statement fails; returns the output.
local function psql_file(url, path)
  local cmd = ("psql -X -v ON_ERROR_STOP=1 -qAt -F '|' '%s' -f '%s' 2>&1; echo \"exit=$?\""):format(url, path)
  local f = assert(io.popen(cmd))
  local out = f:read("*a")
  f:close()
  local body, code = out:match("^(.-)exit=(%d+)%s*$")
  if code ~= "0" then error(("psql -f %s failed: %s"):format(path, body), 2) end
  return (body:gsub("%s+$", ""))
end

local function psql(url, statement)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(statement, ";\n")
  f:close()
  local ok, out = pcall(psql_file, url, path)
  os.remove(path)
  if not ok then error(out, 2) end
  return out
end

local function load(url, fixture) psql_file(url, "spec/fixtures/" .. fixture) end

--- Pairs of indexes of one commandbus table that PostgreSQL prints alike
-- (bar name and table): each pays on every write for the same work.
local EQUAL_INDEXES = [[
  SELECT count(*) FROM (
    SELECT i.indrelid, i.indisunique, regexp_replace(pg_get_indexdef(i.indexrelid), '^.*? USING ', '') AS shape
      FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
     WHERE n.nspname = 'commandbus') s
  GROUP BY indrelid, indisunique, shape HAVING count(*) > 1]]

local orders = {
  {
    name = "rcmd's migrations, then setup()",
    build = function(url, bus)
      load(url, "pgmq.sql")
      load(url, "rcmd_v001.sql")
      load(url, "rcmd_v004.sql")
      assert(bus:setup())
    end,
  },
  {
    name = "setup() alone",
    our_procedures = true,
    build = function(url, bus)
      assert(bus:setup())
      assert(assert(bus:queue("made_before_pgmq")):create())
      load(url, "pgmq.sql")
      return "made_before_pgmq"
    end,
  },
  {
    name = "setup(), then rcmd's migrations",
    build = function(url, bus)
      assert(bus:setup())
      assert(assert(bus:queue("made_before_pgmq")):create())
      load(url, "pgmq.sql")
      load(url, "rcmd_v001.sql")
      load(url, "rcmd_v004.sql")
      return "made_before_pgmq"
    end,
  },
}

for _, order in ipairs(orders) do
  describe("a database shared with rcmd and pgmq, " .. order.name .. ":", function()
    local database = helper.unique("cb_shared")
    local url = url_of(database)
    local bus, early_queue

    setup(function()
      psql(main_url, ("DROP DATABASE IF EXISTS %s WITH (FORCE)"):format(database))
      psql(main_url, ("CREATE DATABASE %s"):format(database))
      bus = assert(commandbus.connect(url))
      early_queue = order.build(url, bus)
    end)

    teardown(function()
      if bus then bus:close() end
      psql(main_url, ("DROP DATABASE IF EXISTS %s WITH (FORCE)"):format(database))
    end)

    local function sql(statement) return psql(url, statement) end

    it("has pgmq as plain SQL, and pgmq's own send, read and archive work on commandbus's queues", function()
      assert.equal("0", sql("SELECT count(*) FROM pg_extension WHERE extname = 'pgmq'"))
      local domain = world.domain()
      assert(bus:send{domain = domain, type = "Echo"}) -- its queue is made now, with pgmq present
      local queues = {domain .. "__commands"}
      if early_queue then queues[2] = early_queue end
      for _, name in ipairs(queues) do
        -- Column for column the layout pgmq.create gives a queue.
        local reference = "pgmq_made_" .. name:sub(1, 30)
        sql(("SELECT pgmq.create('%s')"):format(reference))
        local layout = [[SELECT string_agg(column_name || ' ' || data_type || ' ' || is_nullable || ' '
                           || coalesce(column_default, '-') || ' ' || coalesce(is_identity, '-'), ', '
                           ORDER BY ordinal_position) FROM information_schema.columns
                          WHERE table_schema = 'pgmq' AND table_name = '%s']]
        -- pgmq's indexes; a command queue has one more of its own (the
        -- messages with a priority), which pgmq's functions never notice.
        local indexes = [[SELECT string_agg(regexp_replace(indexdef, '^.*? USING ', ''), ', '
                            ORDER BY regexp_replace(indexdef, '^.*? USING ', '')) FROM pg_indexes
                           WHERE schemaname = 'pgmq' AND tablename = '%s' AND indexname <> '%s_priority_idx']]
        for _, prefix in ipairs{"q_", "a_"} do
          assert.equal(sql(layout:format(prefix .. reference)), sql(layout:format(prefix .. name)))
          assert.equal(sql(indexes:format(prefix .. reference, prefix .. reference)),
                       sql(indexes:format(prefix .. name, prefix .. name)))
        end
        local priority_index = sql(("SELECT count(*) FROM pg_indexes WHERE schemaname = 'pgmq'"
                                    .. " AND indexname = 'q_%s_priority_idx'"):format(name))
        assert.equal(name:match("__commands$") and "1" or "0", priority_index)
        local id = sql(("SELECT pgmq.send('%s', '{\"n\": 1}'::jsonb, 0)"):format(name))
        local q = assert(bus:queue(name))
        local via_commandbus = assert(q:send({n = 2}))
        local read = sql(("SELECT msg_id, read_ct, message->>'n', headers IS NULL FROM pgmq.read('%s', 30, 10)"
                          .. " ORDER BY msg_id"):format(name))
        local rows = {}
        for line in read:gmatch("[^\n]+") do rows[#rows + 1] = line end
        local last = #rows
        assert.equal(id .. "|1|1|t", rows[last - 1])
        assert.equal(("%s|1|2|t"):format(via_commandbus), rows[last])
        assert.equal("t", sql(("SELECT pgmq.archive('%s', %s::bigint)"):format(name, id)))
        assert.equal("1", sql(("SELECT count(*) FROM pgmq.a_%s WHERE msg_id = %s"):format(name, id)))
        -- And commandbus archives what pgmq sent, headers and all.
        local with_headers = sql(("INSERT INTO pgmq.q_%s (vt, message, headers) VALUES (now(), '{}', '{\"h\": 1}')"
                                  .. " RETURNING msg_id"):format(name))
        assert.same({tonumber(with_headers)}, assert(q:archive{tonumber(with_headers)}))
        assert.equal("1", sql(("SELECT headers->>'h' FROM pgmq.a_%s WHERE msg_id = %s"):format(name, with_headers)))
      end
    end)

    it("runs a command commandbus sent through rcmd's procedures, as an rcmd worker does", function()
      local domain = world.domain()
      local batch = assert(bus:create_batch{domain = domain, commands = {{type = "Echo", data = {n = 1}}}})
      local sent = batch.commands[1]
      local queue = domain .. "__commands"
      -- rcmd reads with pgmq.read and passes the message id as a small integer.
      local msg_id = sql(("SELECT msg_id FROM pgmq.read('%s', 30, 1)"):format(queue))
      assert.equal(tostring(sent.msg_id), msg_id)
      local received = sql(("SELECT status, attempts, command_type FROM commandbus.sp_receive_command('%s', '%s'::uuid,"
                            .. " 'IN_PROGRESS', %s::smallint, NULL)"):format(domain, sent.command_id, msg_id))
      assert.equal("IN_PROGRESS|1|Echo", received)
      sql(("SELECT commandbus.sp_finish_command('%s', '%s'::uuid, 'COMPLETED', 'COMPLETED', NULL, NULL, NULL,"
           .. " jsonb_build_object('msg_id', %s), NULL)"):format(domain, sent.command_id, msg_id))
      assert.equal("t", sql(("SELECT pgmq.delete('%s', %s::bigint)"):format(queue, msg_id)))
      local c = assert(bus:get_command(domain, sent.command_id))
      assert.equal("COMPLETED", c.status)
      assert.same({"SENT", "RECEIVED", "COMPLETED"}, world.events(bus, domain, sent.command_id))
      assert.equal(tonumber(msg_id), world.details(bus, domain, sent.command_id, "RECEIVED")[1].msg_id)
      local b = assert(bus:get_batch(domain, batch.batch_id))
      assert.equal("COMPLETED", b.status)
      assert.same({"BATCH_STARTED", "BATCH_COMPLETED"}, world.events(bus, domain, batch.batch_id))
    end)

    if order.our_procedures then
      it("has rcmd's batch procedures apply the one rule and tell when the batch ended", function()
        local domain = world.domain()
        local batch = assert(bus:create_batch{domain = domain, commands = {{type = "Echo"}, {type = "Permanent"}}})
        local ids = {batch.commands[1].command_id, batch.commands[2].command_id}
        local _, met = world.work(bus, domain, world.settled(bus, domain, ids))
        assert.is_true(met)
        local function call(procedure, ...)
          local args = {("'%s'"):format(domain), ...}
          return sql(("SELECT commandbus.%s(%s)"):format(procedure, table.concat(args, ", ")))
        end
        local batch_arg = ("'%s'::uuid"):format(batch.batch_id)
        assert.equal("f", call("sp_tsq_retry", "NULL"))
        assert.has_error(function() call("sp_update_batch_counters", batch_arg, "'sideways'") end)
        -- As rcmd's operator completes a command from the TSQ.
        sql(("UPDATE commandbus.command SET status = 'COMPLETED' WHERE command_id = '%s'"):format(ids[2]))
        assert.equal("t", call("sp_tsq_complete", batch_arg))
        assert.equal("f", call("sp_tsq_complete", batch_arg))
        assert.equal("COMPLETED|2|0", sql(("SELECT status, completed_count, in_troubleshooting_count"
                                           .. " FROM commandbus.batch WHERE batch_id = %s"):format(batch_arg)))
        assert.equal(1, #world.details(bus, domain, batch.batch_id, "BATCH_COMPLETED"))
        -- A finished command keeps its status and trail.
        assert.equal("f", call("sp_finish_command", ("'%s'::uuid"):format(ids[1]), "'IN_TROUBLESHOOTING_QUEUE'",
                               "'MOVED_TO_TSQ'"))
        assert.equal("COMPLETED", assert(bus:get_command(domain, ids[1])).status)
        assert.same({"SENT", "RECEIVED", "COMPLETED"}, world.events(bus, domain, ids[1]))
      end)
    end

    it("starts a process and routes it to completion on these tables", function()
      local domain = world.domain()
      local manager = saga.for_domain(domain)
      local id = assert(manager:start(bus, {order = 7}))
      saga.settle(bus, domain)
      local p = assert(bus:get_process(domain, id))
      assert.equal("COMPLETED", p.status)
      assert.same({"reserve", "charge", "ship"}, p.state.done)
      local steps = assert(bus:process_audit(domain, id))
      assert.equal(3, #steps)
      for _, step in ipairs(steps) do
        assert.equal("SUCCESS", step.reply_outcome)
        assert.is_string(step.sent_at)
      end
      -- Purged with its steps (rcmd's steps reference their process).
      assert.equal(1, tonumber(assert(bus:purge_processes{domain = domain, older_than = 0})))
      assert.equal("NOT_FOUND", select(2, bus:get_process(domain, id)).code)
    end)

    it("keeps one batch status with rcmd's refresh at every step and records the end once", function()
      local domain = world.domain()
      local batch = assert(bus:create_batch{domain = domain, commands = {
        {type = "Echo"}, {type = "Flaky", data = {succeed_on = 2}, max_attempts = 1}}})
      local ids = {batch.commands[1].command_id, batch.commands[2].command_id}
      local function rcmd_refresh()
        sql(("SELECT * FROM commandbus.sp_refresh_batch_stats('%s', '%s'::uuid)"):format(domain, batch.batch_id))
        return sql(("SELECT status, completed_count, in_troubleshooting_count FROM commandbus.batch"
                    .. " WHERE batch_id = '%s'"):format(batch.batch_id))
      end
      local function ended() return world.details(bus, domain, batch.batch_id, "BATCH_COMPLETED") end

      local _, met = world.work(bus, domain, world.settled(bus, domain, ids))
      assert.is_true(met)
      assert.equal("IN_TROUBLESHOOTING_QUEUE", assert(bus:get_command(domain, ids[2])).status)
      assert.equal("COMPLETED_WITH_FAILURES", assert(bus:get_batch(domain, batch.batch_id)).status)
      assert.equal("COMPLETED_WITH_FAILURES|1|1", rcmd_refresh())
      assert.same({}, ended())

      assert(bus:tsq():retry(domain, ids[2]))
      assert.equal("IN_PROGRESS", assert(bus:get_batch(domain, batch.batch_id)).status)
      assert.equal("IN_PROGRESS|1|0", rcmd_refresh())

      _, met = world.work(bus, domain, world.settled(bus, domain, {ids[2]}),
                          {handlers = {Flaky = function() return {ok = true} end}})
      assert.is_true(met)
      assert.equal("COMPLETED", assert(bus:get_batch(domain, batch.batch_id)).status)
      assert.equal("COMPLETED|2|0", rcmd_refresh())
      assert.same({{batch_id = batch.batch_id, total_count = 2, completed_count = 2, canceled_count = 0,
                    failed_count = 0}}, ended())
    end)

    it("gives the command table and command queues room for updated rows, and keeps a fillfactor set before",
       function()
      local function options(table_name)
        return sql(("SELECT coalesce(reloptions::text, '') FROM pg_class WHERE oid = '%s'::regclass"):format(table_name))
      end
      assert.equal("{fillfactor=70}", options("commandbus.command"))
      local domain = world.domain()
      assert(bus:send{domain = domain, type = "Echo"})
      assert.equal("{fillfactor=50}", options(("pgmq.q_%s__commands"):format(domain)))
      -- A queue whose owner chose its own keeps it.
      local chosen = world.domain()
      assert(assert(bus:queue(chosen .. "__commands")):create())
      sql(("ALTER TABLE pgmq.q_%s__commands SET (fillfactor = 80)"):format(chosen))
      assert(bus:send{domain = chosen, type = "Echo"})
      assert.equal("{fillfactor=80}", options(("pgmq.q_%s__commands"):format(chosen)))
    end)

    it("adds no index equal to one the database has, and setup() again adds nothing", function()
      assert.equal("", sql(EQUAL_INDEXES))
      local before = sql("SELECT count(*) FROM pg_indexes WHERE schemaname = 'commandbus'")
      local ok, applied = bus:setup()
      assert.is_true(ok)
      assert.equal(0, applied)
      assert.equal(before, sql("SELECT count(*) FROM pg_indexes WHERE schemaname = 'commandbus'"))
      assert.equal("", sql(EQUAL_INDEXES))
      -- Where commandbus and rcmd have the same index, it has rcmd's name.
      assert.equal("ix_audit_cmdid_ts ix_command_batch uq_command_domain_cmdid idx_process_audit_command",
                   sql([[SELECT string_agg(indexname, ' ' ORDER BY tablename, indexname) FROM pg_indexes
                          WHERE schemaname = 'commandbus' AND indexname IN ('ix_audit_cmdid_ts', 'ix_command_batch',
                            'idx_process_audit_command', 'uq_command_domain_cmdid', 'ix_audit_command_ts',
                            'ix_command_domain_batch', 'ix_process_audit_command', 'command_pkey')]]))
    end)

    it("reports only a unique violation on the command's key as DUPLICATE_COMMAND", function()
      local domain = world.domain()
      local function start(step, command_id)
        return bus:process_start{domain = domain, type = "Order", step = step, reply_to = domain .. "__process_replies",
                                 command = {type = "Reserve", id = command_id}}
      end
      local existing = assert(bus:send{domain = domain, type = "Other"})
      local id, err = start("reserve", existing.command_id)
      assert.is_nil(id)
      assert.equal("DUPLICATE_COMMAND", err.code)
      assert.same({}, assert(bus:list_processes{domain = domain}))

      -- A column a peer declares NOT NULL without a default: the server's
      -- error, not a duplicate.
      sql("ALTER TABLE commandbus.process_audit ADD COLUMN reviewer text NOT NULL DEFAULT 'x'")
      finally(function() sql("ALTER TABLE commandbus.process_audit DROP COLUMN IF EXISTS reviewer") end)
      sql("ALTER TABLE commandbus.process_audit ALTER COLUMN reviewer DROP DEFAULT")
      id, err = start("reserve")
      assert.is_nil(id)
      assert.equal("DATABASE", err.code)
      assert.equal("23502", err.sqlstate)
      assert.matches("reviewer", err.message, 1, true)
      sql("ALTER TABLE commandbus.process_audit DROP COLUMN reviewer")

      -- A unique violation on another table is not a duplicate command.
      sql("CREATE UNIQUE INDEX spec_once ON commandbus.process_audit (domain, step_name) WHERE step_name = 'once'")
      finally(function() sql("DROP INDEX IF EXISTS commandbus.spec_once") end)
      assert(start("once"))
      id, err = start("once")
      assert.is_nil(id)
      assert.equal("DATABASE", err.code)
      assert.equal("23505", err.sqlstate)
      assert.matches("spec_once", err.message, 1, true)
      assert.equal(1, #assert(bus:list_processes{domain = domain}))
    end)
  end)
end

describe("a fresh database set up by three processes at once", function()
  local database = helper.unique("cb_fresh")
  local url = url_of(database)

  setup(function()
    psql(main_url, ("DROP DATABASE IF EXISTS %s WITH (FORCE)"):format(database))
    psql(main_url, ("CREATE DATABASE %s"):format(database))
  end)
  teardown(function() psql(main_url, ("DROP DATABASE IF EXISTS %s WITH (FORCE)"):format(database)) end)

  it("lets each create its first queue (one that waited sees what another made)", function()
    local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
    local start_at = helper.clock() + 1
    local outs = {}
    for i = 1, 3 do
      outs[i] = os.tmpname()
      os.execute(("%s spec/support/setup_and_send.lua '%s' %.3f first_%d > %s 2>&1 &"):format(lua, url, start_at, i,
                                                                                          outs[i]))
    end
    for i = 1, 3 do
      local said
      for _ = 1, 200 do
        local f = io.open(outs[i])
        said = f and f:read("*a") or ""
        if f then f:close() end
        if said:find("result: [^\n]*\n") then break end
        world.sleep(0.05)
      end
      os.remove(outs[i])
      assert.equal("ok", said:match("result: ([^\n]*)\n"), said)
    end
  end)
end)
