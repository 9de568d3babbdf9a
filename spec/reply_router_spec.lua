-- The process reply router with real workers: sagas end to end.
local helper = require "spec.helper"
local saga = require "spec.support.saga"

local settle = saga.settle

describe("reply router", function()
  local bus, domain, order
  before_each(function()
    bus = helper.bus()
    assert(bus:setup())
    domain = helper.unique("saga")
    order = saga.for_domain(domain)
  end)
  after_each(function() bus:close() end)

  it("drives a three-step saga to COMPLETED with real workers", function()
    local ids = {}
    for i = 1, 5 do ids[i] = assert(order:start(bus, {order = i})) end
    local health = settle(bus, domain)
    for i, id in ipairs(ids) do
      local p = assert(bus:get_process(domain, id))
      assert.equal("COMPLETED", p.status)
      assert.same({"reserve", "charge", "ship"}, p.state.done)
      assert.equal(42, p.state.charged)
      assert.equal(i, p.state.order)
      local audit = assert(bus:process_audit(domain, id))
      assert.equal(3, #audit)
      for _, a in ipairs(audit) do assert.equal("SUCCESS", a.reply_outcome) end
    end
    assert.equal(0, health.failures)
  end)

  it("brings 1,000 concurrent processes to COMPLETED with their final state", function()
    local socket = require "socket"
    for i = 1, 1000 do assert(order:start(bus, {order = i})) end
    local t0 = socket.gettime()
    settle(bus, domain)
    local took = socket.gettime() - t0
    local completed, offset = 0, 0
    repeat
      local page = assert(bus:list_processes{domain = domain, status = "COMPLETED", limit = 500, offset = offset})
      for _, p in ipairs(page) do
        assert.same({"reserve", "charge", "ship"}, p.state.done)
        completed = completed + 1
      end
      offset = offset + #page
    until #page < 500
    assert.equal(1000, completed)
    io.stderr:write(("  (1,000 processes, 3 steps each, settled in %.1f s)\n"):format(took))
  end)

  it("a router killed with SIGKILL mid-batch and restarted applies every reply exactly once", function()
    local ids = {}
    for i = 1, 300 do ids[i] = assert(order:start(bus, {order = i})) end
    -- Every first step answered: 300 replies wait.
    local commands = assert(bus:queue(domain .. "__commands"))
    local worker = assert(bus:worker{domain = domain, handlers = "spec.support.saga_handlers", poll_interval = 0.05})
    worker:run{tick_interval = 0.05, tick = function() return assert(commands:metrics()).queue_length > 0 end}
    worker:close()
    local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
    local f = assert(io.popen(("%s spec/support/router_process.lua %s spec.support.slow_saga_managers >/dev/null 2>&1 & echo $!")
      :format(lua, domain)))
    local pid = tonumber(f:read("*l"))
    f:close()
    local function applied()
      local q = io.popen(("psql -qAt %q -c %q"):format(os.getenv("DATABASE_URL"),
        ("SELECT count(*) FROM commandbus.process_audit WHERE domain = '%s' AND reply_outcome IS NOT NULL"):format(domain)))
      local n = tonumber(q:read("*a"):match("%d+"))
      q:close()
      return n
    end
    for _ = 1, 200 do
      if applied() >= 50 then break end
      os.execute("sleep 0.02")
    end
    os.execute(("kill -9 %d"):format(pid))
    local at_kill = applied()
    assert.is_true(at_kill >= 50 and at_kill < 300, "killed at " .. at_kill)
    -- The replies it held come back after their visibility timeout (2 s).
    os.execute("sleep 2.2")
    settle(bus, domain)
    for _, id in ipairs(ids) do
      local p = assert(bus:get_process(domain, id))
      assert.equal("COMPLETED", p.status)
      assert.same({"reserve", "charge", "ship"}, p.state.done) -- each step applied once
      local audit = assert(bus:process_audit(domain, id))
      assert.equal(3, #audit) -- one command per step, none sent twice
    end
  end)

  it("a failure in step 2 compensates step 1 and ends COMPENSATED", function()
    local id = assert(order:start(bus, {order = 7, fail = "charge"}))
    settle(bus, domain)
    local p = assert(bus:get_process(domain, id))
    assert.equal("COMPENSATED", p.status)
    assert.equal("DECLINED", p.error_code)
    local steps = {}
    for _, a in ipairs(assert(bus:process_audit(domain, id))) do steps[#steps + 1] = a.step_name .. ":" .. a.reply_outcome end
    assert.same({"reserve:SUCCESS", "charge:FAILED", "release:SUCCESS"}, steps)
  end)

  describe("a step in the troubleshooting queue", function()
    local function paused(fail)
      local id = assert(order:start(bus, {order = 9, fail = fail}))
      settle(bus, domain)
      local p = assert(bus:get_process(domain, id))
      assert.equal("WAITING_FOR_TSQ", p.status)
      local items = assert(bus:tsq():list{domain = domain}).items
      assert.equal(1, #items)
      assert.equal("Charge", items[1].type)
      return id, items[1].command_id
    end

    it("pauses the process, and the operator's complete resumes it to COMPLETED", function()
      local id, command_id = paused("charge_tsq")
      assert(bus:tsq():complete(domain, command_id, {amount = 42}))
      settle(bus, domain)
      local p = assert(bus:get_process(domain, id))
      assert.equal("COMPLETED", p.status)
      assert.same({"reserve", "charge", "ship"}, p.state.done)
    end)

    it("and the operator's cancel compensates it", function()
      local id, command_id = paused("charge_tsq")
      assert(bus:tsq():cancel(domain, command_id, "gave up on the gateway"))
      settle(bus, domain)
      local p = assert(bus:get_process(domain, id))
      assert.equal("COMPENSATED", p.status)
      assert.equal("CANCELED", p.error_code)
    end)

    it("and the operator's retry puts it back to WAITING", function()
      local id, command_id = paused("charge_tsq")
      assert(bus:tsq():retry(domain, command_id))
      assert.equal("WAITING", assert(bus:get_process(domain, id)).status)
    end)
  end)

  it("stop() drains in-flight replies before run() returns", function()
    local ids = {}
    for i = 1, 40 do ids[i] = assert(order:start(bus, {order = i})) end
    local commands = assert(bus:queue(domain .. "__commands"))
    local worker = assert(bus:worker{domain = domain, handlers = "spec.support.saga_handlers", poll_interval = 0.05})
    worker:run{tick_interval = 0.05, tick = function() return assert(commands:metrics()).queue_length > 0 end}
    worker:close()
    -- 40 replies wait; the lanes take 10 ms a reply. The router is stopped as
    -- soon as it holds replies: run() returns only once every one of them is
    -- applied (all 40 came in the first fetch).
    local router
    router = assert(bus:reply_router{domain = domain, managers = "spec.support.slow_saga_managers", concurrency = 2,
                                     poll_interval = 0.05})
    local stopped_while_holding
    assert(router:run{tick_interval = 0.005, tick = function()
      local h = router:health()
      if stopped_while_holding == nil and (h.in_flight > 0 or h.applied > 0) then
        stopped_while_holding = h.in_flight
      end
      return stopped_while_holding == nil -- run() goes on calling tick while it drains
    end})
    local health = router:health()
    router:close()
    assert.is_true(stopped_while_holding > 0, "stopped while holding no reply")
    assert.equal("stopped", health.state)
    assert.equal(0, health.in_flight)
    assert.equal(40, health.applied)
    assert.equal(0, assert(bus:queue(domain .. "__process_replies"):metrics()).queue_length)
    for _, id in ipairs(ids) do
      local p = assert(bus:get_process(domain, id))
      assert.equal("WAITING", p.status)
      assert.equal("charge", p.current_step)
    end
  end)

  it("archives a reply whose correlation id matches no process, and one without a valid correlation id", function()
    local replies = assert(bus:queue(domain .. "__process_replies"))
    assert(replies:create())
    assert(replies:send({command_id = "01234567-89ab-7def-8123-456789abcdef",
                         correlation_id = "01234567-89ab-7def-8123-456789abcde0", outcome = "SUCCESS"}))
    assert(replies:send({command_id = "01234567-89ab-7def-8123-456789abcdef", correlation_id = "nope", outcome = "SUCCESS"}))
    local health = settle(bus, domain)
    assert.equal(0, assert(replies:metrics()).queue_length)
    assert.equal(2, health.rejected)
  end)

  it("fails a compensation answered FAILED whose error_message is JSON null", function()
    -- A peer's reply may carry its text fields as null. decide() joined the
    -- reply's error_message into the failure's text, and null (cjson.null)
    -- cannot be joined: the hook raised, the reply came back after every
    -- visibility timeout, and the process stayed COMPENSATING.
    local id = assert(order:start(bus, {order = 1}))
    local command_id = assert(bus:process_audit(domain, id))[1].command_id
    helper.sql(("UPDATE commandbus.process SET status = 'COMPENSATING', state = state ||"
      .. " '{\"_compensating\": [], \"_failure\": {\"code\": \"DECLINED\", \"message\": \"card declined\"}}'"
      .. " WHERE process_id = '%s'"):format(id))
    local replies = assert(bus:queue(domain .. "__process_replies"))
    assert(replies:create())
    local null = require("cjson").null
    assert(replies:send({command_id = command_id, correlation_id = id, outcome = "FAILED", error_code = null,
                         error_message = null, reason = null}))
    local router = assert(bus:reply_router{domain = domain, managers = {Order = order}, poll_interval = 0.05})
    local deadline = helper.clock() + 5
    router:run{tick_interval = 0.05, tick = function()
      return assert(bus:get_process(domain, id)).status == "COMPENSATING" and helper.clock() < deadline
    end}
    router:close()
    local p = assert(bus:get_process(domain, id))
    assert.equal("FAILED", p.status)
    assert.equal("COMPENSATION_FAILED", p.error_code)
    assert.equal("a compensation step failed (while undoing: card declined)", p.error_message)
  end)

  it("archives a reply for a process type with no manager", function()
    local id = assert(order:start(bus, {order = 1}))
    local health = settle(bus, domain, {managers = {Other = saga.Order}})
    assert.equal(1, health.rejected)
    assert.equal("WAITING", assert(bus:get_process(domain, id)).status)
  end)

  -- Runs the saga's first step, then the reply router with a manager whose
  -- hooks `overrides` replaces: the reply must be left for redelivery (a
  -- failure counted, nothing applied, run() going on), the process still
  -- waiting on its first step, and no next command sent.
  local function refused(overrides)
    local broken = {}
    for k, v in pairs(saga.Order) do broken[k] = v end
    for k, v in pairs(overrides) do broken[k] = v end
    local manager = setmetatable(broken, getmetatable(saga.Order))
    local id = assert(order:start(bus, {order = 1}))
    local commands = assert(bus:queue(domain .. "__commands"))
    local worker = assert(bus:worker{domain = domain, handlers = "spec.support.saga_handlers", poll_interval = 0.05})
    worker:run{tick_interval = 0.05, tick = function() return assert(commands:metrics()).queue_length > 0 end}
    worker:close()
    local router
    router = assert(bus:reply_router{domain = domain, managers = {Order = manager}, poll_interval = 0.05})
    router:run{tick_interval = 0.05, tick = function()
      local h = router:health()
      return h.failures < 1 and h.applied < 1
    end}
    local health = router:health()
    router:close()
    assert.equal(0, health.applied)
    assert.is_true(health.failures >= 1)
    local p = assert(bus:get_process(domain, id))
    assert.equal("WAITING", p.status)
    assert.equal("reserve", p.current_step)
    assert.equal(0, assert(commands:metrics()).queue_length) -- no next command went out
    -- The reply is still there, hidden until its visibility timeout passes.
    assert.equal(1, assert(bus:queue(domain .. "__process_replies"):metrics()).queue_length)
  end

  it("leaves the reply for redelivery when a hook raises, and counts a failure", function()
    refused{update_state = function() error("hook broke") end}
  end)

  it("does the same when the hook raises a value that cannot be turned into text", function()
    -- The log line's tostring() ran the value's __tostring unprotected: the
    -- error escaped run() (a lane of its own would have aborted the process).
    refused{update_state = function() error(setmetatable({}, {__tostring = function() error("cannot say") end})) end}
  end)

  it("leaves the reply for redelivery when the next step's data cannot be encoded", function()
    -- The next step's command went out with data {} in place of what
    -- build_command returned, and the process moved on as if it were right.
    refused{build_command = function(step) return {type = "Charge", data = {blob = "\255", step = step}} end}
  end)

  it("leaves the reply for redelivery when the next step's data is not a JSON object", function()
    -- A list as the next step's data went out as a JSON array, where the
    -- contract shared with rcmd has a command's data an object.
    refused{build_command = function(step, state)
      if step == "reserve" then return saga.Order.build_command(step, state) end
      return {type = "Charge", data = {state.order, step}}
    end}
  end)

  it("checks run() and start() as a worker does, and reports its health alike", function()
    local router = assert(bus:reply_router{domain = domain, managers = {Order = saga.Order}})
    local worker = assert(bus:worker{domain = domain, handlers = {}})
    for _, runner in ipairs({router, worker}) do
      assert.has_error(function() runner:run{tick = 5} end, "bad option 'tick': function expected, got number")
    end
    assert.has_error(function() router:start() end,
                     "reply_router:start() runs managers on lane threads: give managers as a module name (a managers"
                     .. " table runs only on run()'s thread)")
    assert.are.same({state = "starting", in_flight = 0, applied = 0, failures = 0, rejected = 0},
                    assert(router:health()))
    assert.equal(0, router:in_flight())
    router:close()
    worker:close()
    local ok, err = router:health()
    assert.is_nil(ok)
    assert.equal("CLOSED", err.code)
    assert.equal("the reply router is closed", err.message)
    assert.equal(0, router:in_flight())
    ok, err = router:run()
    assert.is_nil(ok)
    assert.equal("INVALID_STATE", err.code)
    assert.equal("the reply router already ran", err.message)
  end)
end)
