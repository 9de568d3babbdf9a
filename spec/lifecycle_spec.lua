-- How buses end (close, <close>, __gc, process exit), and ids past 2^53.
local commandbus = require "commandbus"
local helper = require "spec.helper"

local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"

local sql = helper.sql

-- The bus's connections: the pool's and the LISTEN one (application_name
-- app) and its send connection (app .. ":send").
local function connections(app)
  return tonumber(sql(("SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('%s', '%s:send')")
                      :format(app, app)):match("%d+"))
end

-- A closed connection's backend leaves pg_stat_activity a moment after the
-- client hung up (the server ends it on its own time): closed means gone
-- within the safety net's seconds.
local function assert_all_closed(app)
  helper.wait_until(function() return connections(app) == 0 end, 10)
end

describe("lifecycle", function()
  it("close() ends every connection of the bus and is idempotent", function()
    local app = helper.unique("closing")
    local bus = helper.bus({application_name = app})
    assert(bus:setup())
    assert(bus:send{domain = require("spec.support.world").domain(), type = "Noop"}) -- makes the send connection
    assert.is_true(connections(app) >= 4)
    bus:close()
    bus:close()
    assert_all_closed(app)
    assert.is_true(bus:is_closed())
  end)

  it("the garbage collector closes a bus nobody references", function()
    local app = helper.unique("collected")
    do
      local bus = helper.bus({application_name = app})
      assert(bus:list_queues())
    end
    collectgarbage()
    collectgarbage()
    assert_all_closed(app)
  end)

  it("the garbage collector closes a bus whose event sink refers to it", function()
    local app = helper.unique("sunk")
    do
      local bus = helper.bus({application_name = app})
      assert(bus:on_process_event(function(e) return bus, e end))
    end
    collectgarbage()
    collectgarbage()
    assert_all_closed(app)
  end)

  it("a Lua 5.4 <close> variable closes the bus at the end of its scope", function()
    if _VERSION ~= "Lua 5.4" then
      pending("to-be-closed variables are Lua 5.4 only")
      return
    end
    local app = helper.unique("scoped")
    local chunk = assert(load([[
      local commandbus, dsn, app = ...
      do
        local bus <close> = assert(commandbus.connect(dsn, {application_name = app}))
        assert(bus:list_queues())
      end
    ]]))
    chunk(commandbus, os.getenv("DATABASE_URL"), app)
    assert_all_closed(app)
  end)

  it("a script that exits without closing its bus exits cleanly and at once", function()
    local script = os.tmpname()
    local name = helper.unique("exit_check")
    local f = assert(io.open(script, "w"))
    f:write(([[
      local commandbus = require "commandbus"
      local bus = assert(commandbus.connect())
      local q = assert(bus:queue("%s"))
      assert(q:create())
      os.exit(0)
    ]]):format(name))
    f:close()
    local t0 = os.time()
    local ok, how, code = os.execute(("%s %s"):format(lua, script))
    os.remove(script)
    if type(ok) == "number" then code = ok end   -- Lua 5.1 returns the status alone
    assert.equal(0, code)
    assert.is_true(os.time() - t0 < 10)
    local bus = helper.bus()
    bus:queue(name):drop()
    bus:close()
  end)
end)

describe("ids past 2^53", function()
  it("come back exactly (as strings under LuaJIT) and work as arguments", function()
    local bus = helper.bus()
    local name = helper.unique("bigid")
    local q = assert(bus:queue(name))
    assert(q:create())
    sql(("ALTER SEQUENCE pgmq.q_%s_msg_id_seq RESTART WITH 9007199254740993"):format(name))
    local id = assert(q:send({n = 1}))
    if _VERSION == "Lua 5.4" then
      assert.equal(math.type(id), "integer")
      assert.equal("9007199254740993", tostring(id))
    else
      assert.equal("9007199254740993", id)  -- a double would say ...992
    end
    local msgs = assert(q:read{vt = 30})
    assert.equal(id, msgs[1].msg_id)
    assert.is_true(assert(q:set_vt(id, 0)) ~= false)
    assert.is_true(q:delete(id))
    q:drop()
    bus:close()
  end)
end)

describe("worker lifecycle", function()
  it("closing a worker from inside its own run() stops it safely, again and again", function()
    local bus = helper.bus()
    local domain = helper.unique("closerun")
    for _ = 1, 10 do
      local worker
      worker = assert(bus:worker{domain = domain, handlers = {}, poll_interval = 0.05})
      assert.is_true(worker:run{tick = function() worker:close() end, tick_interval = 0.01})
      worker:close()
      assert.equal("CLOSED", select(2, worker:health()).code)
    end
    bus:close()
  end)

  it("closing the bus under a running worker ends run() instead of hanging", function()
    local bus = helper.bus()
    local domain = helper.unique("closebus")
    local worker = assert(bus:worker{domain = domain, handlers = {}, poll_interval = 0.05})
    local ticks = 0
    assert.is_true(worker:run{tick_interval = 0.05, tick = function()
      ticks = ticks + 1
      if ticks == 2 then bus:close() end
    end})
    assert.is_true(bus:is_closed())
  end)
end)
