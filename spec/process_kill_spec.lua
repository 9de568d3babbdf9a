-- Crash safety and scale-out with real worker processes.
local helper = require "spec.helper"

local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"

local function spawn(args)
  local f = assert(io.popen(("%s spec/support/worker_process.lua %s >/dev/null 2>&1 & echo $!"):format(lua, args)))
  local pid = tonumber(f:read("*l"))
  f:close()
  return pid
end

local function alive(pid)
  return os.execute(("kill -0 %d 2>/dev/null"):format(pid)) == true or
         os.execute(("kill -0 %d 2>/dev/null"):format(pid)) == 0
end

local function wait_exit(pid, seconds)
  for _ = 1, seconds * 10 do
    if not alive(pid) then return true end
    os.execute("sleep 0.1")
  end
  return false
end

-- Status counts and the number of terminal audit rows per command.
local function tally(bus, domain)
  local counts, per_command = {}, {}
  local offset = 0
  repeat
    local page = assert(bus:list_commands{domain = domain, limit = 1000, offset = offset})
    for _, c in ipairs(page) do
      counts[c.status] = (counts[c.status] or 0) + 1
      per_command[#per_command + 1] = c.command_id
    end
    offset = offset + #page
  until #page < 1000
  return counts, per_command
end

local function completed_audits(bus, domain, id)
  local n = 0
  for _, e in ipairs(assert(bus:audit(domain, id))) do
    if e.event_type == "COMPLETED" or e.event_type == "MOVED_TO_TSQ" or e.event_type == "BUSINESS_RULE_FAILED" then
      n = n + 1
    end
  end
  return n
end

describe("worker processes", function()
  local bus
  before_each(function() bus = helper.bus() end)
  after_each(function() bus:close() end)

  it("a worker killed with SIGKILL while handlers run loses nothing: a second worker finishes every command once", function()
    local domain = helper.unique("crash")
    local commands = {}
    for i = 1, 60 do commands[i] = {type = "Slow", data = {seconds = 0.1, n = i}, max_attempts = 5} end
    assert(bus:send_batch{domain = domain, commands = commands})
    local first = spawn(("%s 4 2"):format(domain))
    -- Kill it once some commands completed and others are in flight.
    local done = 0
    for _ = 1, 200 do
      done = #assert(bus:list_commands{domain = domain, status = "COMPLETED"})
      if done >= 8 then break end
      os.execute("sleep 0.05")
    end
    assert.is_true(done >= 8, "the first worker made no progress")
    os.execute(("kill -9 %d"):format(first))
    assert.is_true(wait_exit(first, 5))
    local counts = tally(bus, domain)
    assert.is_true((counts.COMPLETED or 0) < 60, "the kill came too late to test anything")

    -- The second worker picks up what was in flight after the visibility
    -- timeout (2 s) and everything never started.
    local second = spawn(("%s 4 2"):format(domain))
    assert.is_true(wait_exit(second, 60), "the second worker did not finish")
    local final, ids = tally(bus, domain)
    assert.equal(60, final.COMPLETED)
    for _, id in ipairs(ids) do
      assert.equal(1, completed_audits(bus, domain, id), "command " .. id)
    end
  end)

  it("four worker processes of concurrency 4 complete 20,000 commands, each exactly once", function()
    local domain = helper.unique("scale")
    local total = 20000
    local commands = {}
    for i = 1, total do commands[i] = {type = "Nothing", data = {n = i}} end
    assert(bus:send_batch{domain = domain, commands = commands})
    local pids = {}
    for i = 1, 4 do pids[i] = spawn(("%s 4 30"):format(domain)) end
    for i = 1, 4 do assert.is_true(wait_exit(pids[i], 240), "worker " .. i .. " did not finish") end
    local counts = tally(bus, domain)
    assert.equal(total, counts.COMPLETED)
    -- One COMPLETED audit row per command, and one RECEIVED (nobody ran twice).
    local rows = assert(bus:list_commands{domain = domain, status = "COMPLETED", limit = 1})
    assert.equal(1, #rows)
    local q = assert(bus:queue(domain .. "__commands"))
    assert.equal(0, assert(q:metrics()).queue_length)
    local sql = io.popen(("psql -qAt %q -c %q"):format(os.getenv("DATABASE_URL"),
      ("SELECT count(*) FILTER (WHERE event_type = 'COMPLETED'), count(DISTINCT command_id) FILTER (WHERE event_type = 'COMPLETED'),"
       .. " count(*) FILTER (WHERE event_type = 'RECEIVED') FROM commandbus.audit WHERE domain = '%s'"):format(domain)))
    local out = sql:read("*a")
    sql:close()
    local completed, distinct, received = out:match("(%d+)|(%d+)|(%d+)")
    assert.equal(total, tonumber(completed))
    assert.equal(total, tonumber(distinct))
    assert.equal(total, tonumber(received))
  end)
end)

describe("a worker whose connections are cut", function()
  it("keeps its outcomes, reconnects and finishes every command once", function()
    local socket = require "socket"
    local app = helper.unique("cut")
    local setup = helper.bus()
    local domain = helper.unique("cut")
    local commands = {}
    for i = 1, 600 do commands[i] = {type = "Nap", data = {n = i}} end
    assert(setup:send_batch{domain = domain, commands = commands})
    local bus = helper.bus({application_name = app})
    local worker = assert(bus:worker{domain = domain, poll_interval = 0.1,
                                     handlers = {Nap = function() socket.sleep(0.002) end}})
    local q = assert(setup:queue(domain .. "__commands"))
    local cut, t0 = false, socket.gettime()
    worker:run{tick_interval = 0.05, tick = function()
      if not cut and socket.gettime() - t0 > 0.3 then
        cut = true -- every connection of the worker's bus, the listener included
        os.execute(("psql -qAt %q -c \"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '%s'\" >/dev/null")
          :format(os.getenv("DATABASE_URL"), app))
      end
      return socket.gettime() - t0 < 60 and assert(q:metrics()).queue_length > 0
    end}
    assert.is_true(cut)
    local f = io.popen(("psql -qAt %q -c %q"):format(os.getenv("DATABASE_URL"),
      ("SELECT count(*) FILTER (WHERE status = 'COMPLETED'), count(*) FROM commandbus.command WHERE domain = '%s';"
       .. " SELECT count(*) FROM commandbus.audit WHERE domain = '%s' AND event_type = 'COMPLETED'"):format(domain, domain)))
    local out = f:read("*a")
    f:close()
    local completed, total, audits = out:match("(%d+)|(%d+)%s+(%d+)")
    assert.equal("600", total)
    assert.equal("600", completed)
    assert.equal("600", audits)
    bus:close()
    setup:close()
  end)
end)
