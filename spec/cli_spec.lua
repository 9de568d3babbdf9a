-- The command-line tool: driven through cli.main with captured output, and
-- as bin/commandbus in its own process where a signal must stop it.
local cjson = require "cjson"
local commandbus = require "commandbus"
local cli = require "commandbus.cli"
local helper = require "spec.helper"
local saga = require "spec.support.saga"
local cli_process = require "spec.support.cli_process"

local socket = require "socket"

-- No server listens on port 1: connecting fails at once.
local DOWN = "postgresql://ada:s3cret-pw@127.0.0.1:1/nowhere"
local ISO = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d[%.%d]*Z$"
local UNKNOWN_ID = "01234567-89ab-7def-8123-456789abcdef"

local function run(args)
  local out, err = io.tmpfile(), io.tmpfile()
  local status = cli.main(args, out, err)
  out:seek("set")
  err:seek("set")
  local o, e = out:read("*a"), err:read("*a")
  out:close()
  err:close()
  return status, o, e
end

-- Runs with --json; the document parsed back.
local function json(args)
  local full = {"--json"}
  for _, a in ipairs(args) do full[#full + 1] = a end
  local status, out, err = run(full)
  assert.equal(0, status, err)
  return cjson.decode(out), out
end

-- The keys of every object in a JSON text appear in sorted order.
local function assert_sorted_keys(text)
  local depth, last = 0, {}
  local i = 1
  while i <= #text do
    local c = text:sub(i, i)
    if c == '"' then
      local j = i + 1
      while text:sub(j, j) ~= '"' do j = j + (text:sub(j, j) == "\\" and 2 or 1) end
      local s = text:sub(i + 1, j - 1)
      if text:sub(j + 1, j + 1) == ":" then
        assert.is_true(last[depth] == nil or last[depth] < s, "key " .. s .. " after " .. tostring(last[depth]))
        last[depth] = s
      end
      i = j
    elseif c == "{" or c == "[" then
      depth = depth + 1
      last[depth] = nil
    elseif c == "}" or c == "]" then
      depth = depth - 1
    end
    i = i + 1
  end
end

-- Column starts of a table's header line.
local function columns(header)
  local starts = {}
  for start, name in header:gmatch("()(%S+)") do starts[name] = start end
  return starts
end

-- s as a pattern that matches itself (ids hold "-").
local function literal(s)
  return (tostring(s):gsub("%p", "%%%0"))
end

local function lines(text)
  local out = {}
  for l in text:gmatch("([^\n]*)\n") do out[#out + 1] = l end
  return out
end

local function login_name()
  local name = os.getenv("USER") or os.getenv("LOGNAME")
  if not name or name == "" then
    local p = io.popen("id -un")
    name = p:read("*l")
    p:close()
  end
  return name
end

describe("commandbus CLI, without a database", function()
  it("prints its help on stdout and exits 0 (--help, -h, and per command)", function()
    for _, args in ipairs{{"--help"}, {"-h"}, {"--dsn", DOWN, "--help"}} do
      local status, out, err = run(args)
      assert.equal(0, status)
      assert.equal("", err)
      assert.matches("usage: commandbus", out)
      for _, word in ipairs{"queues", "tsq retry", "process events", "health", "metrics", "worker", "reply%-router",
                             "schedules list", "schedules pause"} do
        assert.matches(word, out)
      end
    end
    local status, out = run{"tsq", "retry", "--help"}
    assert.equal(0, status)
    assert.matches("^usage: commandbus tsq retry <domain> <id> %[%-%-operator NAME%] %[%-%-reason TEXT%]", out)
  end)

  it("prints its version and exits 0", function()
    local status, out, err = run{"--version"}
    assert.equal(0, status)
    assert.equal("", err)
    assert.equal(("commandbus %s (schema version %d)\n"):format(commandbus._VERSION, commandbus.schema_version()), out)
  end)

  it("refuses unknown options and bad values with exit 2 before connecting", function()
    local id = UNKNOWN_ID
    local cases = {
      {{}, "no command given"},
      {{"frobnicate"}, "unknown command `frobnicate`"},
      {{"command"}, "`command` needs one of: show, audit"},
      {{"tsq", "list"}, "`tsq list` takes 1 argument(s), got 0"},
      {{"commands", "d", "--status", "BOGUS"}, "--status must be one of PENDING"},
      {{"commands", "d", "--limit", "abc"}, "--limit must be a whole number from 1 to 10000, got `abc`"},
      {{"commands", "d", "--limit", "1.5"}, "got `1.5`"},
      {{"commands", "d", "--limit", "1e10"}, "got `1e10`"},
      {{"commands", "d", "--limit", "0"}, "got `0`"},
      {{"commands", "d", "--limit", "-3"}, "got `-3`"},
      {{"commands", "d", "--limit=99999"}, "got `99999`"},
      {{"commands", "d", "--offset", "x"}, "--offset must be a whole number"},
      {{"commands", "d", "--frob", "x"}, "unknown option --frob for `commands`"},
      {{"commands", "d", "-x"}, "unknown option -x"},
      {{"commands", "d", "--limit"}, "--limit needs a value"},
      {{"commands", "d", "--limit", "5", "--limit", "6"}, "--limit is given twice"},
      {{"--json=yes", "queues"}, "--json takes no value"},
      {{"commands", "Bad-Domain"}, "<domain> must be a domain name"},
      {{"commands", string.rep("d", 38)}, "at most 37 bytes"},
      {{"queue", "metrics", "No Such"}, "<queue> must be a queue name"},
      {{"command", "show", "d", "not-a-uuid"}, "<id> must be a UUID"},
      {{"command", "audit", "d"}, "`command audit` takes 2 argument"},
      {{"batches", "d", "--status", "DONE"}, "--status must be one of PENDING, IN_PROGRESS, COMPLETED, COMPLETED_WITH"},
      {{"batch", "show", "d", "123"}, "must be a UUID"},
      {{"processes", "d", "--status", "IN_TROUBLESHOOTING_QUEUE"}, "--status must be one of PENDING, WAITING"},
      {{"process", "events", "d", id, "--after", "x"}, "--after must be a whole number"},
      {{"tsq", "list", "d", "--status", "PENDING"}, "unknown option --status for `tsq list`"},
      {{"tsq", "complete", "d", id, "--result", "not json"}, "--result must be a JSON object"},
      {{"tsq", "complete", "d", id, "--result", "[1, 2]"}, "--result must be a JSON object"},
      {{"tsq", "cancel", "d", id, "--operator", ""}, "--operator must not be empty"},
      {{"tsq", "retry", "d", id, "--result", "{}"}, "unknown option --result for `tsq retry`"},
      {{"health", "--domain", "1x"}, "--domain must be a domain name"},
      {{"metrics", "extra"}, "`metrics` takes 0 argument"},
      {{"worker", "--domain", "d"}, "`worker` needs --handlers"},
      {{"worker", "--handlers", "m"}, "`worker` needs --domain"},
      {{"worker", "--domain", "d", "--handlers", "m", "--concurrency", "0"}, "--concurrency must be a whole number"},
      {{"worker", "--domain", "d", "--handlers", "no spaces"}, "must be a Lua module name"},
      {{"reply-router", "--domain", "d"}, "needs --managers"},
      {{"schedules"}, "`schedules` needs one of: list, pause, resume, remove"},
      {{"schedules", "pause"}, "`schedules pause` takes 1 argument(s), got 0"},
      {{"schedules", "remove", "a", "b"}, "`schedules remove` takes 1 argument(s), got 2"},
      {{"schedules", "resume", string.rep("n", 201)}, "<name> must be a schedule name of 1 to 200 bytes"},
      {{"schedules", "list", "--domain", "Bad"}, "--domain must be a domain name"},
      {{"schedules", "list", "extra"}, "`schedules list` takes 0 argument(s), got 1"},
    }
    for _, case in ipairs(cases) do
      local args = {"--dsn", DOWN}
      for _, a in ipairs(case[1]) do args[#args + 1] = a end
      local status, out, err = run(args)
      assert.equal(2, status, table.concat(case[1], " ") .. ": " .. err)
      assert.equal("", out)
      assert.equal(1, err:find("commandbus: ", 1, true), err)
      assert.truthy(err:find(case[2], 1, true), err)
      assert.matches("\nusage: commandbus", err)
    end
  end)

  it("exits 1 on a connection failure, never showing the password", function()
    local status, out, err = run{"--dsn", DOWN, "queues"}
    assert.equal(1, status)
    assert.equal("", out)
    assert.matches("^commandbus: CONNECTION", err)
    assert.is_nil(err:find("s3cret", 1, true))
    local status2, _, err2 = run{"--dsn", "host=127.0.0.1 port=1 user=ada password='s3cret pw' dbname=x", "queues"}
    assert.equal(1, status2)
    assert.is_nil(err2:find("s3cret", 1, true))
  end)

  it("redacts passwords from whatever it prints", function()
    local dsn = "postgresql://ada:pa55@db:5432/app"
    assert.equal("could not use postgresql://ada:***@db:5432/app (***)",
                 cli.redact("could not use postgresql://ada:pa55@db:5432/app (pa55)", dsn))
    assert.equal("missing \"=\" after \"password=***\"", cli.redact("missing \"=\" after \"password=hunter2\"", nil))
    assert.equal("in password = *** here", cli.redact("in password = 'two words' here", nil))
  end)

  it("refuses a handlers module that does not load, before connecting", function()
    local status, _, err = run{"--dsn", DOWN, "worker", "--domain", "d", "--handlers", "spec.support.no_such_module"}
    assert.equal(1, status)
    assert.matches("^commandbus: cannot load module `spec.support.no_such_module`", err)
  end)
end)

describe("commandbus CLI", function()
  local bus, domain, broken, done, batch_id, process_id
  before_each(function()
    bus = helper.bus()
    assert(bus:setup())
    domain = helper.unique("cli")
    done = assert(bus:send{domain = domain, type = "Fine", data = {n = 1}}).command_id
    broken = assert(bus:send{domain = domain, type = "Broken", reply_to = domain .. "__replies",
                             data = {why = "<script>"}}).command_id
    local worker = assert(bus:worker{domain = domain, poll_interval = 0.05, handlers = {
      Fine = function() return {ok = true} end,
      Broken = function() error(commandbus.permanent("BROKEN", "cannot")) end}})
    local q = assert(bus:queue(domain .. "__commands"))
    worker:run{tick_interval = 0.05, tick = function() return assert(q:metrics()).queue_length > 0 end}
    worker:close()
    batch_id = assert(bus:create_batch{domain = domain, name = "nightly", commands = {
      {type = "Later", data = {n = 1}}, {type = "Later", data = {n = 2}}}}).batch_id
    process_id = assert(saga.for_domain(domain):start(bus, {order = 7}))
  end)
  after_each(function() bus:close() end)

  describe("queues", function()
    it("lists queues with depth, ages and messages sent, as a table and as JSON", function()
      local status, out = run{"queues"}
      assert.equal(0, status)
      local rows = lines(out)
      local cols = columns(rows[1])
      assert.truthy(cols.QUEUE and cols.DEPTH and cols.OLDEST and cols.SENT)
      local row
      for _, l in ipairs(rows) do
        if l:find(domain .. "__commands ", 1, true) == 1 then row = l end
      end
      assert.truthy(row, out)
      -- Right-aligned numbers end where their header ends.
      assert.equal("5", row:sub(cols.SENT + 3, cols.SENT + 3))
      assert.equal("3", row:sub(cols.DEPTH + 4, cols.DEPTH + 4)) -- the batch's two, the process's first
      local list, text = json{"queues"}
      assert_sorted_keys(text)
      local mine
      for _, q in ipairs(list) do
        if q.queue_name == domain .. "__commands" then mine = q end
      end
      assert.equal(3, mine.queue_length)
      assert.equal(5, mine.total_messages)
      assert.matches(ISO, mine.scrape_time)
      assert.is_true(mine.oldest_msg_age_sec >= 0)
    end)

    it("shows one queue's metrics, and says NOT_FOUND for a queue that does not exist", function()
      local m = json{"queue", "metrics", domain .. "__commands"}
      assert.equal(3, m.queue_length)
      local status, out = run{"queue", "metrics", domain .. "__commands"}
      assert.equal(0, status)
      assert.matches("queue_length%s+3\n", out)
      local status2, out2, err2 = run{"queue", "metrics", "nosuchqueue"}
      assert.equal(1, status2)
      assert.equal("", out2)
      assert.equal("commandbus: NOT_FOUND: no queue `nosuchqueue`\n", err2)
    end)
  end)

  describe("commands", function()
    it("lists a domain's commands as an aligned table with ISO 8601 times", function()
      local status, out = run{"commands", domain}
      assert.equal(0, status)
      local rows = lines(out)
      assert.equal(6, #rows) -- header, five commands (the process sent one)
      local cols = columns(rows[1])
      for i = 2, #rows do
        assert.matches("^%S", rows[i]:sub(cols.STATUS)) -- every status starts under its header
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ", rows[i]:sub(cols.UPDATED))
      end
      assert.matches("BROKEN: cannot", out)
    end)

    it("filters by status (any case), type, limit and offset, and prints [] for none", function()
      local list, text = json{"commands", domain, "--status", "in_troubleshooting_queue"}
      assert_sorted_keys(text)
      assert.equal(1, #list)
      assert.equal(broken, list[1].command_id)
      assert.matches(ISO, list[1].created_at)
      assert.equal(2, #json{"commands", domain, "--type", "Later"})
      assert.equal(1, #json{"commands", domain, "--limit", "1"})
      assert.equal(4, #json{"commands", domain, "--offset=1"})
      local status, out = run{"--json", "commands", domain, "--status", "CANCELED"}
      assert.equal(0, status)
      assert.equal("[]\n", out)
      local _, human = run{"commands", domain, "--status", "CANCELED"}
      assert.equal("no commands\n", human)
    end)

    it("shows one command and its audit trail; NOT_FOUND for an unknown id", function()
      local c = json{"command", "show", domain, broken}
      assert.equal("IN_TROUBLESHOOTING_QUEUE", c.status)
      assert.matches(ISO, c.updated_at)
      local status, out = run{"command", "show", domain, done}
      assert.equal(0, status)
      assert.matches("^domain%s+" .. domain .. "\ncommand_id%s+" .. literal(done) .. "\ntype%s+Fine\nstatus%s+COMPLETED\n",
                     out)
      assert.matches("\ncreated_at%s+%d%d%d%d%-%d%d%-%d%dT[%d:.]+Z\n", out)
      local events = json{"command", "audit", domain, broken}
      assert.equal("SENT", events[1].event_type)
      assert.equal("MOVED_TO_TSQ", events[#events].event_type)
      assert.matches(ISO, events[1].ts)
      local _, table_ = run{"command", "audit", domain, broken}
      assert.matches("^TIME%s+EVENT%s+DETAILS\n", table_)
      local status2, _, err = run{"command", "show", domain, UNKNOWN_ID}
      assert.equal(1, status2)
      assert.matches("^commandbus: NOT_FOUND", err)
    end)
  end)

  describe("batches and processes", function()
    it("list and show batches; NOT_FOUND for an unknown batch", function()
      local list = json{"batches", domain}
      assert.equal(1, #list)
      assert.equal(batch_id, list[1].batch_id)
      assert.equal(2, list[1].total_count)
      assert.same({}, json{"batches", domain, "--status", "COMPLETED"})
      assert.equal(1, #json{"batches", domain, "--limit", "1"})
      assert.same({}, json{"batches", domain, "--offset", "1"})
      local b = json{"batch", "show", domain, batch_id}
      assert.equal(2, b.pending_count)
      assert.equal("nightly", b.name)
      local status, out = run{"batches", domain}
      assert.equal(0, status)
      assert.matches("nightly", out)
      local status2, _, err = run{"batch", "show", domain, UNKNOWN_ID}
      assert.equal(1, status2)
      assert.matches("NOT_FOUND", err)
    end)

    it("list processes by status, show one and its events; NOT_FOUND for an unknown process", function()
      local list = json{"processes", domain, "--status", "waiting"}
      assert.equal(1, #list)
      assert.equal(process_id, list[1].process_id)
      assert.same({}, json{"processes", domain, "--status", "COMPLETED"})
      assert.equal(1, #json{"processes", domain, "--type", "Order", "--limit", "5"})
      assert.same({}, json{"processes", domain, "--offset", "1"})
      local p = json{"process", "show", domain, process_id}
      assert.equal("reserve", p.current_step)
      assert.equal(7, p.state.order)
      assert(bus:append_process_event(domain, process_id, "label_printed", {printer = "P1"}))
      local events = json{"process", "events", domain, process_id}
      assert.same({"STARTED", "label_printed"}, {events[1].event_type, events[2].event_type})
      assert.matches(ISO, events[1].created_at)
      local after = json{"process", "events", domain, process_id, "--after", "1"}
      assert.equal(1, #after)
      assert.equal(2, after[1].sequence)
      assert.same({printer = "P1"}, after[1].data)
      assert.same({}, json{"process", "events", domain, process_id, "--after", "2"})
      local status, out = run{"process", "events", domain, process_id}
      assert.equal(0, status)
      assert.matches("^#%s+TIME%s+EVENT%s+STEP%s+STATUS%s+DATA\n", out)
      local status2, _, err = run{"process", "events", domain, UNKNOWN_ID}
      assert.equal(1, status2)
      assert.matches("NOT_FOUND", err)
      local status3, _, err3 = run{"process", "show", domain, UNKNOWN_ID}
      assert.equal(1, status3)
      assert.matches("NOT_FOUND", err3)
    end)
  end)

  describe("the troubleshooting queue", function()
    it("lists what waits, with the total; {\"items\":[],\"total\":0} when empty", function()
      local page, text = json{"tsq", "list", domain}
      assert_sorted_keys(text)
      assert.equal(1, page.total)
      assert.equal(broken, page.items[1].command_id)
      assert.equal("BROKEN", page.items[1].last_error_code)
      assert.equal("<script>", page.items[1].data.why)
      local status, out = run{"tsq", "list", domain}
      assert.equal(0, status)
      assert.matches(literal(broken) .. "%s+Broken%s+1/3%s+BROKEN: cannot", out)
      assert.matches("%(1 of 1%)\n$", out)
      local _, empty = run{"--json", "tsq", "list", helper.unique("empty")}
      assert.equal('{"items":[],"total":0}\n', empty)
      assert.equal(0, json{"tsq", "list", domain, "--type", "Fine"}.total)
      assert.equal(1, json{"tsq", "list", domain, "--type", "Broken", "--limit", "1"}.total)
      local past = json{"tsq", "list", domain, "--offset", "1"}
      assert.same({}, past.items)
      assert.equal(1, past.total)
    end)

    it("retries with the operator and reason in the audit trail (operator defaults to the login name)", function()
      local r = json{"tsq", "retry", domain, broken, "--reason", "fixed the data"}
      assert.equal("PENDING", r.status)
      assert.equal(broken, r.command_id)
      assert.is_true(r.msg_id > 0)
      local events = assert(bus:audit(domain, broken))
      local last = events[#events]
      assert.equal("OPERATOR_RETRY", last.event_type)
      assert.equal(login_name(), last.details.operator)
      assert.equal("fixed the data", last.details.reason)
      assert.equal("PENDING", assert(bus:get_command(domain, broken)).status)
    end)

    it("cancels with a reason, and refuses a command no longer in the TSQ with exit 1", function()
      local status, out = run{"tsq", "cancel", domain, broken, "--reason", "customer withdrew", "--operator", "ada"}
      assert.equal(0, status)
      assert.equal("command " .. broken .. " canceled\n", out)
      local last = assert(bus:audit(domain, broken))
      last = last[#last]
      assert.equal("OPERATOR_CANCEL", last.event_type)
      assert.equal("ada", last.details.operator)
      assert.equal("customer withdrew", last.details.reason)
      local status2, out2, err2 = run{"tsq", "retry", domain, broken}
      assert.equal(1, status2)
      assert.equal("", out2)
      assert.matches("^commandbus: INVALID_STATE", err2)
      local status3, _, err3 = run{"tsq", "retry", domain, UNKNOWN_ID}
      assert.equal(1, status3)
      assert.matches("NOT_FOUND", err3)
    end)

    it("completes by hand with a JSON result, operator and reason", function()
      local r = json{"tsq", "complete", domain, broken, "--result", '{"refunded": true}', "--operator", "ada",
                     "--reason", "refunded by phone"}
      assert.same({command_id = broken, status = "COMPLETED"}, r)
      assert.equal("COMPLETED", assert(bus:get_command(domain, broken)).status)
      local events = assert(bus:audit(domain, broken))
      local last = events[#events]
      assert.equal("OPERATOR_COMPLETE", last.event_type)
      assert.equal("ada", last.details.operator)
      assert.equal("refunded by phone", last.details.reason)
      assert.is_true(last.details.has_result_data)
      local replies = assert(bus:queue(domain .. "__replies"))
      local msgs = assert(replies:read{vt = 1, qty = 10})
      assert.same({refunded = true}, msgs[#msgs].message.result)
    end)
  end)

  describe("schedules", function()
    it("lists, pauses, resumes and removes schedules, as tables and as JSON", function()
      local nightly, tick = domain .. "_nightly", domain .. "_tick"
      assert(bus:schedule{name = nightly, domain = domain, type = "Build", cron = "30 2 * * *", timezone = "Europe/Paris"})
      assert(bus:schedule{name = tick, domain = domain, type = "Ping", every = 30, missed = "catch_up"})
      local status, out = run{"schedules", "list", "--domain", domain}
      assert.equal(0, status)
      local l = lines(out)
      assert.equal(3, #l)
      assert.matches("^NAME%s+DOMAIN%s+TYPE%s+WHEN%s+MISSED%s+STATE%s+NEXT_DUE%s+LAST_DUE$", l[1])
      local at = columns(l[1])
      assert.equal(at.NAME, l[2]:find(nightly, 1, true))
      assert.equal(at.WHEN, l[2]:find("30 2 * * * (Europe/Paris)", 1, true))
      assert.matches("skip%s+active%s+%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ", l[2])
      assert.equal(at.WHEN, l[3]:find("every 30s", 1, true))
      assert.matches("catch_up%s+active", l[3])
      local rows, text = json{"schedules", "list", "--domain", domain}
      assert_sorted_keys(text)
      assert.equal(2, #rows)
      assert.equal(nightly, rows[1].name)
      assert.equal("30 2 * * *", rows[1].cron)
      assert.equal(30, rows[2].every)
      assert.matches(ISO, rows[2].next_due_at)

      status, out = run{"schedules", "pause", tick}
      assert.equal(0, status)
      assert.equal("schedule " .. tick .. " paused\n", out)
      assert.is_true(json{"schedules", "list", "--domain", domain}[2].paused)
      assert.matches(literal(tick) .. ".-catch_up%s+paused%s+%-", select(2, run{"schedules", "list", "--domain", domain}))
      assert.same({name = tick, paused = false}, json{"schedules", "resume", tick})
      assert.is_false(assert(bus:list_schedules{domain = domain})[2].paused)
      status, out = run{"schedules", "remove", tick}
      assert.equal(0, status)
      assert.equal("schedule " .. tick .. " removed\n", out)
      assert.equal(1, #assert(bus:list_schedules{domain = domain}))
      -- What is not there: exit 1, NOT_FOUND.
      for _, words in ipairs{{"remove", tick}, {"pause", tick}, {"resume", tick}} do
        local code, o, e = run{"schedules", words[1], words[2]}
        assert.equal(1, code)
        assert.equal("", o)
        assert.matches("^commandbus: NOT_FOUND", e)
      end
      assert.equal("no schedules\n", select(2, run{"schedules", "list", "--domain", helper.unique("none")}))
      assert.same({}, json{"schedules", "list", "--domain", helper.unique("none")})
      assert(bus:unschedule(nightly))
    end)
  end)

  it("applies migrations with setup", function()
    local r = json{"setup"}
    assert.equal(0, r.applied)
    assert.equal(commandbus.schema_version(), r.schema_version)
    local status, out = run{"setup"}
    assert.equal(0, status)
    assert.equal(("schema at version %d (0 migration(s) applied now)\n"):format(commandbus.schema_version()), out)
  end)

  it("runs a worker until SIGTERM, drains it, and shows its health and metrics meanwhile", function()
    local d = helper.unique("cliw")
    local gate = os.tmpname() .. ".gate"
    local slow = assert(bus:send{domain = d, type = "Gate", data = {file = gate}}).command_id
    assert(bus:send{domain = d, type = "Echo"})
    local worker = cli_process.spawn{"worker", "--domain", d, "--handlers", "spec.support.gate_handlers",
                                     "--concurrency", "2"}
    finally(function() worker.signal("KILL") end)
    -- Wait for its heartbeat, and for the slow handler to be running.
    local rows
    for _ = 1, 300 do
      rows = json{"health", "--domain", d}
      local cmd = assert(bus:get_command(d, slow))
      if #rows == 1 and rows[1].state == "running" and cmd.status == "IN_PROGRESS" then break end
      socket.sleep(0.02)
    end
    assert.equal(1, #rows)
    local r = rows[1]
    assert.equal("worker", r.kind)
    assert.equal(worker.pid, r.pid)
    assert.equal(2, r.lanes)
    assert.matches(ISO, r.heartbeat_at)
    assert.matches(ISO, r.started_at)
    local status, out = run{"health", "--domain", d}
    assert.equal(0, status)
    assert.matches("^KIND%s+DOMAIN%s+RUNNER%s+HOST%s+PID%s+STATE", out)
    assert.matches("worker%s+" .. d .. "%s+" .. literal(r.runner_id) .. "%s+%S+%s+" .. worker.pid .. "%s+running", out)
    local _, text = run{"metrics"}
    assert.matches('commandbus_runner_info{kind="worker",domain="' .. d .. '",runner="' .. r.runner_id, text, 1, true)
    local m = json{"metrics"}
    assert.is_true(m.all_processes)
    local seen = false
    for _, w in ipairs(m.workers) do seen = seen or w.runner_id == r.runner_id end
    assert.is_true(seen)

    -- Signalled while the gate handler runs: the worker stops fetching and
    -- waits for it; once the gate opens, it finishes and the worker exits.
    worker.signal("TERM")
    for _ = 1, 500 do
      if worker.output():find("SIGTERM received", 1, true) then break end
      socket.sleep(0.02)
    end
    assert.equal("IN_PROGRESS", assert(bus:get_command(d, slow)).status)
    local f = assert(io.open(gate, "w"))
    f:close()
    finally(function() os.remove(gate) end)
    local rc, output = worker.wait()
    assert.equal(0, rc, output)
    assert.matches("SIGTERM received; stopping", output)
    assert.matches("waiting for [12] command%(s%) in flight", output) -- the gate (and the echo, if behind it)
    assert.equal("COMPLETED", assert(bus:get_command(d, slow)).status)
    local after = json{"health", "--domain", d}
    assert.equal("stopped", after[1].state)
    assert.equal(2, after[1].successes)
    local _, none = run{"health", "--domain", helper.unique("nobody")}
    assert.equal("no workers or reply routers have run in the last day\n", none)
  end)

  it("runs a reply router until SIGINT, then drains it", function()
    -- The process of before_each waits for its first step's reply.
    local worker = assert(bus:worker{domain = domain, handlers = "spec.support.saga_handlers", poll_interval = 0.05})
    local q = assert(bus:queue(domain .. "__commands"))
    worker:run{tick_interval = 0.05, tick = function()
      return #assert(bus:list_commands{domain = domain, type = "Reserve", status = "PENDING", limit = 1}) > 0
    end}
    worker:close()
    assert.is_true(q ~= nil)
    local router = cli_process.spawn{"reply-router", "--domain", domain, "--managers", "spec.support.saga_managers"}
    finally(function() router.signal("KILL") end)
    for _ = 1, 300 do
      if assert(bus:get_process(domain, process_id)).current_step == "charge" then break end
      socket.sleep(0.02)
    end
    assert.equal("charge", assert(bus:get_process(domain, process_id)).current_step)
    router.signal("INT")
    local rc, output = router.wait()
    assert.equal(0, rc, output)
    assert.matches("SIGINT received; stopping", output)
    local rows = json{"health", "--domain", domain}
    local mine
    for _, row in ipairs(rows) do
      if row.kind == "reply_router" then mine = row end
    end
    assert.equal("stopped", mine.state)
    assert.equal(1, mine.applied)
  end)

  it("runs metrics against the database with --dsn, and says why a usage error is one", function()
    local status, out = run{"--dsn", os.getenv("DATABASE_URL"), "metrics"}
    assert.equal(0, status)
    assert.matches("^# HELP commandbus_", out)
    assert.matches('\ncommandbus_tsq_commands{domain="' .. domain .. '"} 1\n', out, 1, true)
    local status2, _, err = run{"metrics", "--status", "x"}
    assert.equal(2, status2)
    assert.matches("unknown option %-%-status for `metrics`", err)
  end)
end)
