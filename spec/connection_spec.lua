-- Connections: errors never show a password, and work whose connection died
-- before it was sent goes out again on a fresh one (work already sent is
-- never resent).
local commandbus = require "commandbus"
local helper = require "spec.helper"

local SECRET = "S3cr3tPw"

-- Connection strings libpq cannot use, each of which made libpq echo the
-- password (or the whole string) into its message.
local bad_dsns = {
  "postgresql://u:" .. SECRET .. "%ZZ@127.0.0.1:5432/db",         -- invalid percent-encoding
  "postgresql://u:" .. SECRET .. "@[::1/db",                      -- malformed IPv6 host: the whole URI
  "postgresql://u:pa/" .. SECRET .. "@127.0.0.1/db",              -- a raw '/' in the password
  "postgresql://u@127.0.0.1/db?password=" .. SECRET .. "%ZZ",     -- in the query
  "host=127.0.0.1 password=\"" .. SECRET .. " " .. SECRET .. "x",  -- quoted the wrong way
  "host=127.0.0.1 port=1 password=" .. SECRET,                     -- refused: no echo, still checked
}

describe("connection errors", function()
  it("never contain the password", function()
    for _, dsn in ipairs(bad_dsns) do
      local bus, err = commandbus.connect(dsn, {connect_timeout = 2})
      assert.is_nil(bus)
      assert.equal("CONNECTION", err.code)
      assert.is_nil(err.message:find(SECRET, 1, true), dsn .. " -> " .. err.message)
      assert.is_nil(tostring(err):find(SECRET, 1, true))
    end
  end)

  it("keep what helps: the echoed URI with its password masked", function()
    local _, err = commandbus.connect("postgresql://u:" .. SECRET .. "@[::1/db", {connect_timeout = 2})
    assert.matches("postgresql://u:***@[::1/db", err.message, 1, true)
  end)

  it("never reach the command-line tool's output", function()
    local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
    for _, dsn in ipairs(bad_dsns) do
      local out = os.tmpname()
      -- the tool reads DATABASE_URL, and --dsn
      os.execute(("DATABASE_URL=%q %s bin/commandbus setup >%s 2>&1"):format(dsn, lua, out))
      os.execute(("%s bin/commandbus --dsn %q setup >>%s 2>&1"):format(lua, dsn, out))
      local f = assert(io.open(out))
      local text = f:read("*a")
      f:close()
      os.remove(out)
      assert.matches("CONNECTION", text)
      assert.is_nil(text:find(SECRET, 1, true), dsn .. " -> " .. text)
    end
  end)
end)

describe("a lost connection", function()
  local bus, q, app

  before_each(function()
    app = helper.unique("conn_spec")
    bus = helper.bus{pool_size = 1, application_name = app}
    q = assert(bus:queue(helper.unique("conn_q")))
    assert(q:create())
  end)

  after_each(function()
    q:drop()
    bus:close()
  end)

  -- Ends this bus's sessions; with a timeout, pg_terminate_backend returns
  -- once each is gone.
  local function kill(filter)
    return helper.sql(("SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                       .. " WHERE application_name = '%s' %s"):format(app, filter or ""))
  end

  it("that died before a send is replaced: the next send succeeds on a fresh connection", function()
    for round = 1, 3 do
      assert(q:send({round = round}))
      assert.is_true(tonumber(kill():match("%d+")) >= 1)
      if round == 2 then require("socket").sleep(0.2) end -- reconnecting meanwhile, or not yet noticed
      local id, err = q:send({round = round, after = true})
      assert.is_not_nil(id, err and tostring(err))
    end
    assert.equal(6, assert(q:metrics()).queue_length)
  end)

  it("that died while a send was on the server is not resent: CONNECTION, and nothing written", function()
    -- A lock held elsewhere keeps the send waiting on the server; the
    -- session is ended while it waits.
    -- The locker holds the lock until the watcher has ended the waiting
    -- session, then the watcher ends the locker too: no step waits on a clock.
    local table_name = "pgmq.q_" .. q:name()
    local url, locker = os.getenv("DATABASE_URL"), app .. "_locker"
    os.execute(("PGAPPNAME=%s psql -qAt %q -c \"BEGIN; LOCK TABLE %s; SELECT pg_sleep(60); COMMIT\" >/dev/null 2>&1 &")
               :format(locker, url, table_name))
    os.execute(("(for i in $(seq 1200); do n=$(psql -qAt %q -c \"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                .. " WHERE application_name = '%s' AND wait_event_type = 'Lock'\"); [ \"$n\" != 0 ] && break; sleep 0.05; done;"
                .. " psql -qAt %q -c \"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '%s'\")"
                .. " >/dev/null 2>&1 &"):format(url, app, url, locker))
    helper.wait_until(function() -- the lock is taken
      return helper.sql(("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                         .. " WHERE a.application_name = '%s' AND l.granted AND l.mode = 'AccessExclusiveLock'")
                        :format(locker)):match("%d+") ~= "0"
    end, 30)
    local id, err = q:send({n = 1})
    assert.is_nil(id)
    assert.equal("CONNECTION", err.code)
    assert.equal(0, assert(q:metrics()).queue_length) -- read once the lock is gone
    assert(q:send({n = 2})) -- and the bus carries on
  end)
end)
