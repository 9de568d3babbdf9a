-- Retention and purges: what finished goes, what is still needed stays.
local helper = require "spec.helper"
local world = require "spec.support.world"
local cjson = require "cjson"

local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"

local function count(sql)
  return tonumber(helper.sql(sql):match("%-?%d+"))
end

local function commands_of(domain, where)
  return count(("SELECT count(*) FROM commandbus.command WHERE domain = '%s'%s"):format(domain, where or ""))
end

local function audits_of(domain)
  return count(("SELECT count(*) FROM commandbus.audit WHERE domain = '%s'"):format(domain))
end

-- Makes every finished command of the domain look `days` days old.
local function age(domain, days)
  helper.sql(("UPDATE commandbus.command SET updated_at = now() - interval '%d days' WHERE domain = '%s'"):format(days, domain))
end

describe("retention", function()
  local bus
  before_each(function() bus = world.bus() end)
  after_each(function() bus:close() end)

  it("a purge never removes commands in flight, in the TSQ, in an unfinished batch or of a running process", function()
    local domain = world.domain()
    local done = assert(bus:send{domain = domain, type = "Echo", data = {}})
    local tsq = assert(bus:send{domain = domain, type = "Permanent", data = {}})
    -- A batch with one command completed, and one in the TSQ: not finished.
    local batch = assert(bus:create_batch{domain = domain, name = "half", commands = {
      {type = "Echo", data = {}}, {type = "Permanent", data = {}}}})
    local finished_batch = assert(bus:create_batch{domain = domain, name = "whole", commands = {{type = "Echo", data = {}}}})
    local worker = world.work(bus, domain, world.settled(bus, domain, {done.command_id, tsq.command_id,
      batch.commands[1].command_id, batch.commands[2].command_id, finished_batch.commands[1].command_id}))
    worker:close()
    assert.equal("COMPLETED", assert(bus:get_batch(domain, finished_batch.batch_id)).status)
    local pending = assert(bus:send{domain = domain, type = "Echo", data = {}, delay = 3600})
    local running = assert(bus:send{domain = domain, type = "Echo", data = {}})
    helper.sql(("UPDATE commandbus.command SET status = 'IN_PROGRESS' WHERE command_id = '%s'"):format(running.command_id))
    -- A running process whose first step completed.
    local process = world.uuid()
    local step = assert(bus:send{domain = domain, type = "Echo", data = {}, correlation_id = process})
    helper.sql(("UPDATE commandbus.command SET status = 'COMPLETED' WHERE command_id = '%s';"
      .. " INSERT INTO commandbus.process (domain, process_id, process_type, status, current_step)"
      .. " VALUES ('%s', '%s', 'Order', 'WAITING', 'second')"):format(step.command_id, domain, process))
    age(domain, 30)

    local removed = assert(bus:purge{domain = domain, older_than = 0})
    -- Gone: the plain completed command and the finished batch with its command.
    assert.equal(2, tonumber(removed.commands))
    assert.equal(1, tonumber(removed.batches))
    local _, err = bus:get_command(domain, done.command_id)
    assert.equal("NOT_FOUND", err.code)
    assert.same({}, assert(bus:audit(domain, done.command_id)))
    assert.is_nil(bus:get_batch(domain, finished_batch.batch_id))
    -- Kept: everything still needed.
    for _, id in ipairs({tsq.command_id, batch.commands[1].command_id, batch.commands[2].command_id,
                         pending.command_id, running.command_id, step.command_id}) do
      assert(bus:get_command(domain, id))
    end
    assert.equal("IN_TROUBLESHOOTING_QUEUE", assert(bus:get_command(domain, tsq.command_id)).status)
    -- The TSQ command's archived message is kept too: a retry resends it.
    assert(bus:tsq():retry(domain, tsq.command_id))
    local again = world.drain_queue(bus, domain .. "__commands")
    local found = false
    for _, m in ipairs(again) do found = found or m.command_id == tsq.command_id end
    assert.is_true(found)
  end)

  it("a purge of chosen statuses removes only commands in those statuses, with their audit rows", function()
    local domain = world.domain()
    local ok = assert(bus:send{domain = domain, type = "Echo", data = {}})
    local refused = assert(bus:send{domain = domain, type = "Refuse", data = {balance = 1}})
    world.work(bus, domain, world.settled(bus, domain, {ok.command_id, refused.command_id})):close()
    age(domain, 1)
    local before = audits_of(domain)
    local removed = assert(bus:purge{domain = domain, older_than = 60, statuses = {"FAILED"}})
    assert.equal(1, tonumber(removed.commands))
    assert.equal(before - audits_of(domain), tonumber(removed.audit))
    assert.equal("COMPLETED", assert(bus:get_command(domain, ok.command_id)).status)
    assert.is_nil((bus:get_command(domain, refused.command_id)))
    assert.has_error(function() bus:purge{domain = domain} end)
    local _, err = bus:purge{domain = domain, older_than = 0, statuses = {"IN_TROUBLESHOOTING_QUEUE"}}
    assert.equal("INVALID_ARGUMENT", err.code)
  end)

  it("keeps what is younger than the policy's age, and keeps forever what the policy says false for", function()
    local domain = world.domain()
    assert.same({domain = domain, commands = 604800, archive = 604800, batches = 604800, processes = 604800},
                assert(bus:retention(domain)))
    local old = assert(bus:send{domain = domain, type = "Echo", data = {}})
    world.work(bus, domain, world.settled(bus, domain, {old.command_id})):close()
    age(domain, 2)
    local young = assert(bus:send{domain = domain, type = "Echo", data = {}})
    world.work(bus, domain, world.settled(bus, domain, {young.command_id})):close()

    assert(bus:set_retention{domain = domain, commands = false})
    assert.is_false(assert(bus:retention(domain)).commands)
    local worker = assert(bus:worker(world.options(domain, {retention = {interval = 0.1}})))
    world.run(worker, function() return worker:health().retention.passes >= 2 end)
    assert.equal(0, tonumber(worker:health().retention.commands))
    worker:close()
    assert.equal(2, commands_of(domain))

    assert(bus:set_retention{domain = domain, commands = 86400})
    assert.equal(604800, assert(bus:retention(domain)).archive) -- untouched
    worker = assert(bus:worker(world.options(domain, {retention = {interval = 0.1}})))
    assert.is_true(world.run(worker, function() return tonumber(worker:health().retention.commands) == 1 end))
    local health = worker:health()
    worker:close()
    assert.equal(1, commands_of(domain))
    assert.equal(3, tonumber(health.retention.audit)) -- SENT, RECEIVED, COMPLETED
    assert(bus:get_command(domain, young.command_id))
  end)

  it("two worker processes applying retention together remove each row once", function()
    local domain = world.domain()
    local n = 3000
    local commands = {}
    for i = 1, n do commands[i] = {type = "Echo", data = {i = i}} end
    assert(bus:send_batch{domain = domain, commands = commands})
    -- Finished long ago: no message left, completed eight days back.
    helper.sql(("DELETE FROM pgmq.q_%s__commands; UPDATE commandbus.command SET status = 'COMPLETED',"
      .. " updated_at = now() - interval '8 days' WHERE domain = '%s'"):format(domain, domain))
    local audits = audits_of(domain)
    local out1, out2 = os.tmpname(), os.tmpname()
    local cmd = "%s spec/support/upkeep_process.lua %s 4 0.2 > %s 2>&1"
    os.execute(("(%s & %s & wait)"):format(cmd:format(lua, domain, out1), cmd:format(lua, domain, out2)))
    local removed, audit_removed, logged = 0, 0, 0
    for _, out in ipairs({out1, out2}) do
      local f = assert(io.open(out))
      local text = f:read("*a")
      f:close()
      os.remove(out)
      local json = assert(text:match("\nhealth ([^\n]+)") or text:match("^health ([^\n]+)"),
                          "a worker process failed: " .. text)
      local health = cjson.decode(json)
      removed = removed + health.retention.commands
      audit_removed = audit_removed + health.retention.audit
      -- Each pass that removed something says so in the log.
      for k in text:gmatch("worker " .. domain .. ": retention removed (%d+) command%(s%)") do logged = logged + tonumber(k) end
    end
    assert.equal(0, commands_of(domain))
    assert.equal(0, audits_of(domain))
    assert.equal(n, removed)
    assert.equal(audits, audit_removed)
    assert.equal(n, logged)
    -- The heartbeat rows carry the same counts, for any process to read.
    local rows = assert(bus:runners{domain = domain})
    assert.equal(2, #rows)
    local from_rows = 0
    for _, r in ipairs(rows) do from_rows = from_rows + r.removed.commands end
    assert.equal(n, from_rows)
  end)

  it("a worker's counts show in its health, in bus:runners() and in the metrics", function()
    local domain = world.domain()
    local sent = assert(bus:send{domain = domain, type = "Echo", data = {}})
    world.work(bus, domain, world.settled(bus, domain, {sent.command_id})):close()
    age(domain, 8)
    local worker = assert(bus:worker(world.options(domain, {retention = {interval = 0.1}})))
    assert.is_true(world.run(worker, function() return tonumber(worker:health().retention.commands) == 1 end))
    local text = assert(bus:metrics_text())
    local metrics = assert(bus:metrics())
    worker:close()
    assert.matches('commandbus_worker_retention_removed_total{domain="' .. domain .. '",runner="[%x-]+",kind="commands"} 1\n',
                   text)
    assert.matches('commandbus_worker_retention_removed_total{domain="' .. domain .. '",runner="[%x-]+",kind="audit"} 3\n',
                   text)
    local mine
    for _, w in ipairs(metrics.workers) do if w.domain == domain then mine = w end end
    assert.equal(1, tonumber(mine.removed.commands))
    -- The row its last heartbeat wrote, when it stopped (the last started:
    -- the worker that handled the command has one too).
    local rows = assert(bus:runners{domain = domain})
    local row = rows[#rows]
    assert.equal("stopped", row.state)
    assert.equal(1, tonumber(row.removed.commands))
    assert.equal(3, tonumber(row.removed.audit))
    assert.equal(0, tonumber(row.scheduled))
  end)
end)
