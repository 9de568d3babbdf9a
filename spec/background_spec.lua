-- Running in the background (what commandbus.ngx builds on): a runtime
-- shared by every Lua state of the process, and workers and reply routers
-- started with start() while the caller goes on, then drained by close().
local core = require "commandbus.core"
local helper = require "spec.helper"
local saga = require "spec.support.saga"
local world = require "spec.support.world"

local function connections(application_name)
  return tonumber(helper.sql(("SELECT count(*) FROM pg_stat_activity WHERE application_name = '%s'")
                             :format(application_name)):match("%d+"))
end

local function wait_until(what, condition, timeout)
  local deadline = helper.clock() + (timeout or 10)
  while helper.clock() < deadline do
    if condition() then return end
    world.sleep(0.02)
  end
  error("timed out waiting until " .. what, 2)
end

describe("a shared runtime", function()
  local dsn = os.getenv("DATABASE_URL")
  local app

  before_each(function() app = helper.unique("shared") end)
  after_each(function() core.close_shared() end)

  it("is one runtime for every handle with the same parameters", function()
    local a = assert(core.shared(dsn, {pool_size = 2, application_name = app}))
    local b = assert(core.shared(dsn, {pool_size = 2, application_name = app}))
    assert.matches("shared", tostring(a))
    assert.is_true(a:setup())
    assert.is_true(b:setup())
    assert.are.equal(2 + 1, connections(app)) -- the pool and the LISTEN connection, once
    local c = assert(core.shared(dsn, {pool_size = 1, application_name = app}))
    assert.is_true(c:setup())
    assert.are.equal(2 + 1 + 1 + 1, connections(app)) -- other parameters, another runtime
    local d = assert(core.shared(dsn, {pool_size = 1, application_name = app, notify_after_commit = true}))
    assert.is_true(d:setup())
    assert.are.equal(2 + 1 + 1 + 1 + 1 + 1, connections(app)) -- notify_after_commit too
  end)

  it("stays open when one handle closes, and closes for all with close_shared", function()
    local a = assert(core.shared(dsn, {application_name = app}))
    local b = assert(core.shared(dsn, {application_name = app}))
    a:close()
    assert.is_true(a:is_closed())
    local _, err = a:setup()
    assert.are.equal("CLOSED", err.code)
    assert.is_false(b:is_closed())
    assert.is_true(b:setup())
    assert.are.equal(1, core.close_shared())
    assert.is_true(b:is_closed())
    _, err = b:setup()
    assert.are.equal("CLOSED", err.code)
    wait_until("its connections closed", function() return connections(app) == 0 end)
    -- A later handle connects anew.
    local fresh = assert(core.shared(dsn, {application_name = app}))
    assert.is_true(fresh:setup())
  end)

  it("is found from another Lua state of the process (a lane's)", function()
    local main = assert(core.shared(dsn, {application_name = app}))
    assert.is_true(main:setup())
    local before = connections(app)
    local router = core.message_router{lanes = 1, handler = "spec.support.shared_lane", batch_timeout_ms = 0}
    router:start()
    local domain = world.domain()
    assert.is_true(router:route("k", {dsn = dsn, application_name = app, domain = domain}))
    router:stop()
    router:close()
    -- The lane sent a command through its own handle: same runtime, no new connection.
    assert.are.equal(1, #assert(main:list_commands{domain = domain}))
    assert.are.equal(before, connections(app))
  end)
end)

describe("start() in the background", function()
  local bus, domain

  before_each(function()
    bus = world.bus()
    domain = world.domain()
  end)
  after_each(function() bus:close() end)

  it("runs a worker while the caller goes on, and close() drains it", function()
    local worker = assert(bus:worker(world.options(domain, {concurrency = 2})))
    assert.is_true(worker:start())
    local fast = assert(bus:send{domain = domain, type = "Echo"})
    wait_until("the worker completed a command", function()
      return assert(bus:get_command(domain, fast.command_id)).status == "COMPLETED"
    end)
    local slow = assert(bus:send{domain = domain, type = "Slow", data = {seconds = 0.5}})
    wait_until("the worker took the slow one", function()
      return assert(bus:get_command(domain, slow.command_id)).status == "IN_PROGRESS"
    end)
    worker:close() -- stops, lets the handler finish, joins the lanes
    assert.are.equal("COMPLETED", assert(bus:get_command(domain, slow.command_id)).status)
  end)

  it("refuses a second start, and a handlers table", function()
    local worker = assert(bus:worker(world.options(domain)))
    assert.is_true(worker:start())
    local ok, err = worker:start()
    assert.is_nil(ok)
    assert.are.equal("INVALID_STATE", err.code)
    _, err = worker:run()
    assert.are.equal("INVALID_STATE", err.code)
    worker:close()
    local in_table = assert(bus:worker(world.options(domain, {handlers = {Echo = function() end}})))
    assert.has_error(function() in_table:start() end,
                     "worker:start() runs handlers on lane threads: give handlers as a module name (a handlers table"
                     .. " runs only on run()'s thread)")
    in_table:close()
  end)

  it("runs a worker and a reply router together until a saga completes", function()
    local worker = assert(bus:worker{domain = domain, handlers = "spec.support.saga_handlers", concurrency = 2,
                                     poll_interval = 0.05})
    local router = assert(bus:reply_router{domain = domain, managers = "spec.support.saga_managers",
                                           concurrency = 2, poll_interval = 0.05})
    assert.is_true(worker:start())
    assert.is_true(router:start())
    local id = assert(saga.for_domain(domain):start(bus, {order = 1}))
    local process = assert(bus:await_process(domain, id, {timeout = 20}))
    assert.are.equal("COMPLETED", process.status)
    router:close()
    worker:close()
    local table_router = assert(bus:reply_router{domain = domain, managers = saga.managers})
    assert.has_error(function() table_router:start() end)
    table_router:close()
  end)
end)
