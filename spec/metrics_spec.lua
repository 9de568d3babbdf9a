-- Metrics: bus:metrics() and the Prometheus exposition bus:metrics_text(),
-- read back with a strict parser of the text format (spec/support/
-- prometheus.lua) and checked against the database after a known workload.
local commandbus = require "commandbus"
local helper = require "spec.helper"
local prometheus = require "spec.support.prometheus"
local saga = require "spec.support.saga"
local cli_process = require "spec.support.cli_process"

local sql = helper.sql
local value = prometheus.value

local COMMAND_STATUSES = {"PENDING", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELED", "IN_TROUBLESHOOTING_QUEUE"}
local PROCESS_STATUSES = {"PENDING", "WAITING", "WAITING_FOR_TSQ", "COMPENSATING", "COMPLETED", "COMPENSATED",
                          "FAILED", "CANCELED"}

-- count by status of a table's rows of one domain, from psql.
local function counts_by_status(tbl, domain)
  local counts = {}
  for status, n in sql(("SELECT status, count(*) FROM commandbus.%s WHERE domain = '%s' GROUP BY status")
                         :format(tbl, domain)):gmatch("(%S+)|(%d+)") do
    counts[status] = tonumber(n)
  end
  return counts
end

local function number(statement)
  return tonumber(sql(statement):match("%-?%d+"))
end

-- Checks the conventions every family must keep.
local function assert_conventions(families, order)
  assert.is_true(#order > 0)
  for _, name in ipairs(order) do
    local f = families[name]
    assert.truthy(name:match("^commandbus_"), name)
    assert.truthy(f.type, "no TYPE for " .. name)
    assert.truthy(f.help and #f.help > 0, "no HELP for " .. name)
    assert.truthy(#f.samples > 0, "empty family " .. name)
    if f.type == "counter" then
      assert.truthy(name:match("_total$"), "counter without _total: " .. name)
    else
      assert.falsy(name:match("_total$"), "_total on a " .. f.type .. ": " .. name)
    end
    assert.falsy(name:match("_ms$") or name:match("_ns$") or name:match("_milliseconds"), "not base units: " .. name)
    for _, s in ipairs(f.samples) do
      assert.is_true(s.value == s.value and s.value >= 0, name .. " has a negative or NaN sample")
    end
  end
end

describe("metrics", function()
  local bus
  before_each(function()
    bus = helper.bus()
    assert(bus:setup())
  end)
  after_each(function() bus:close() end)

  it("match the database for queues, commands and a worker after a known workload", function()
    local domain = helper.unique("met")
    for i = 1, 6 do assert(bus:send{domain = domain, type = "Echo", data = {i = i}}) end
    for _ = 1, 2 do assert(bus:send{domain = domain, type = "Permanent"}) end
    assert(bus:send{domain = domain, type = "Refuse", data = {balance = 1}})
    assert(bus:send{domain = domain, type = "Flaky", data = {succeed_on = 2}})
    local commands = assert(bus:queue(domain .. "__commands"))
    assert(commands:send{not_a = "command"}) -- poison: set aside
    local side = assert(bus:queue(helper.unique("metq")))
    assert(side:create())
    for i = 1, 3 do assert(side:send{n = i}) end

    local worker = assert(bus:worker{domain = domain, handlers = "spec.support.handlers", concurrency = 2,
                                     poll_interval = 0.05, retry = {backoff = {0}}})
    worker:run{tick_interval = 0.05, tick = function()
      return #assert(bus:list_commands{domain = domain, status = "PENDING", limit = 1})
           + #assert(bus:list_commands{domain = domain, status = "IN_PROGRESS", limit = 1})
           + assert(commands:metrics()).queue_length > 0
    end}
    local health = worker:health()
    local text = assert(bus:metrics_text())
    local snapshot = assert(bus:metrics())
    worker:close()

    local families, order = prometheus.parse(text)
    assert_conventions(families, order)

    -- The worker (still registered: run() returned, close() had not).
    local mine = {domain = domain}
    assert.equal(7, health.successes)
    assert.equal(4, health.failures)
    assert.equal(1, health.retries)
    assert.equal(1, health.poison)
    assert.equal(health.successes, value(families, "commandbus_worker_successes_total", mine))
    assert.equal(health.failures, value(families, "commandbus_worker_failures_total", mine))
    assert.equal(health.retries, value(families, "commandbus_worker_retries_total", mine))
    assert.equal(health.poison, value(families, "commandbus_worker_poison_total", mine))
    assert.equal(0, value(families, "commandbus_worker_stuck_total", mine))
    assert.equal(0, value(families, "commandbus_worker_in_flight", mine))
    assert.equal(2, value(families, "commandbus_worker_lanes", mine))
    assert.equal(0, value(families, "commandbus_worker_lane_depth", {domain = domain, lane = "1"}))
    assert.equal(0, value(families, "commandbus_worker_lane_depth", {domain = domain, lane = "2"}))
    assert.equal(1, value(families, "commandbus_runner_info", {domain = domain, kind = "worker", state = "stopped"}))

    -- Commands by status, the TSQ, as the database has them.
    local db = counts_by_status("command", domain)
    assert.same({COMPLETED = 7, IN_TROUBLESHOOTING_QUEUE = 2, FAILED = 1}, db)
    for _, status in ipairs(COMMAND_STATUSES) do
      assert.equal(db[status] or 0, value(families, "commandbus_commands", {domain = domain, status = status}), status)
    end
    assert.equal(assert(bus:tsq():list{domain = domain}).total, value(families, "commandbus_tsq_commands", mine))

    -- Queues.
    local q = domain .. "__commands"
    assert.equal(number(("SELECT count(*) FROM pgmq.q_%s"):format(q)),
                 value(families, "commandbus_queue_depth", {queue = q}))
    assert.equal(11, number(("SELECT last_value FROM pgmq.q_%s_msg_id_seq"):format(q)))
    assert.equal(11, value(families, "commandbus_queue_messages_total", {queue = q}))
    local s = side:name()
    assert.equal(3, value(families, "commandbus_queue_depth", {queue = s}))
    assert.equal(3, value(families, "commandbus_queue_messages_total", {queue = s}))
    local age = value(families, "commandbus_queue_oldest_message_age_seconds", {queue = s})
    assert.is_true(age >= 0 and age <= number(("SELECT ceil(extract(epoch FROM now() - min(enqueued_at))) FROM"
                                                .. " pgmq.q_%s"):format(s)))

    -- bus:metrics() tells the same.
    local by_name = {}
    for _, m in ipairs(snapshot.queues) do by_name[m.queue_name] = m end
    assert.equal(3, by_name[s].queue_length)
    assert.equal(11, by_name[q].total_messages)
    local entry
    for _, d in ipairs(snapshot.domains) do
      if d.domain == domain then entry = d end
    end
    assert.same({COMPLETED = 7, IN_TROUBLESHOOTING_QUEUE = 2, FAILED = 1}, entry.commands)
    assert.equal(2, entry.tsq)
    local w
    for _, x in ipairs(snapshot.workers) do
      if x.domain == domain then w = x end
    end
    assert.equal(7, w.successes)
    assert.equal(1, w.retries)
    assert.same({0, 0}, w.lane_depths)
    assert.is_false(snapshot.all_processes)

    -- Closed, the worker leaves its last heartbeat: every process's metrics
    -- count it as stopped and report no series of it.
    local all = prometheus.parse(assert(bus:metrics_text{all_processes = true}))
    assert.equal(1, value(all, "commandbus_runners", {kind = "worker", domain = domain, state = "stopped"}))
    assert.is_nil(value(all, "commandbus_worker_successes_total", mine))
    local rows = assert(bus:runners{domain = domain})
    assert.equal(1, #rows)
    assert.equal("stopped", rows[1].state)
    assert.equal(7, rows[1].successes)
    assert.equal(4, rows[1].failures)
  end)

  it("match the database for processes, a reply router and process events", function()
    local domain = helper.unique("metsaga")
    local order = saga.for_domain(domain)
    bus:on_process_event(function() end, {capacity = 1})
    for i = 1, 3 do assert(order:start(bus, {order = i, fail = i == 3 and "charge" or nil})) end
    -- The commands run in another process: `commandbus worker`.
    local worker = cli_process.spawn{"worker", "--domain", domain, "--handlers", "spec.support.saga_handlers"}
    finally(function() worker.signal("KILL") end)
    local router = assert(bus:reply_router{domain = domain, managers = "spec.support.saga_managers",
                                           concurrency = 2, poll_interval = 0.05})
    local text, health, stats
    local deadline = helper.clock() + 60
    router:run{tick_interval = 0.1, tick = function()
      local open = number(("SELECT count(*) FROM commandbus.process WHERE domain = '%s' AND status NOT IN"
                           .. " ('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELED')"):format(domain))
      if open > 0 and helper.clock() < deadline then return true end
      text, health, stats = assert(bus:metrics_text()), router:health(), bus:process_event_stats()
      return false
    end}
    router:close()
    worker.signal("TERM")
    assert.equal(0, (worker.wait()))
    assert.truthy(text, "the processes did not finish")

    local families, order_ = prometheus.parse(text)
    assert_conventions(families, order_)
    local db = counts_by_status("process", domain)
    assert.same({COMPLETED = 2, COMPENSATED = 1}, db)
    for _, status in ipairs(PROCESS_STATUSES) do
      assert.equal(db[status] or 0, value(families, "commandbus_processes", {domain = domain, status = status}), status)
    end
    local replies = number(("SELECT count(*) FROM commandbus.process_audit WHERE domain = '%s'"
                            .. " AND reply_outcome IS NOT NULL"):format(domain))
    assert.equal(replies, health.applied)
    assert.equal(replies, value(families, "commandbus_reply_router_applied_total", {domain = domain}))
    assert.equal(0, value(families, "commandbus_reply_router_rejected_total", {domain = domain}))
    assert.equal(0, value(families, "commandbus_reply_router_failures_total", {domain = domain}))
    assert.equal(2, value(families, "commandbus_reply_router_lanes", {domain = domain}))

    -- Every non-terminal event this bus's writers appended was either queued
    -- for the sink or dropped; the queue holds one.
    local appended = number(("SELECT count(*) FROM commandbus.process_event WHERE domain = '%s' AND event_type"
                             .. " NOT IN ('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELED')"):format(domain))
    assert.equal(stats.pushed, value(families, "commandbus_process_events_pushed_total"))
    assert.equal(stats.dropped, value(families, "commandbus_process_events_dropped_total"))
    assert.is_true(stats.dropped >= 5)
    assert.equal(appended, stats.pushed + stats.dropped)
    assert.equal(1, value(families, "commandbus_process_events_capacity"))
    assert.equal(0, value(families, "commandbus_awaiter_waiters"))
  end)

  it("report each named message router of the process", function()
    local name = helper.unique("mr")
    local router = commandbus.message_router{name = name, lanes = 2, batch_timeout_ms = 0}
    assert(router:start())
    for i = 1, 5 do assert(router:route("key" .. i, {i = i})) end
    for _ = 1, 100 do
      if router:stats().routed == 5 then break end
      require("socket").sleep(0.01)
    end
    local taken = #assert(router:take(1, 10, 0))
    local families = prometheus.parse(assert(bus:metrics_text()))
    local stats, depths = router:stats(), router:queue_depths()
    assert.equal(5, value(families, "commandbus_message_router_routed_total", {router = name}))
    assert.equal(stats.delivered, value(families, "commandbus_message_router_delivered_total", {router = name}))
    assert.equal(taken, stats.delivered)
    assert.equal(depths.lanes[1], value(families, "commandbus_message_router_lane_depth", {router = name, lane = "1"}))
    assert.equal(depths.lanes[2], value(families, "commandbus_message_router_lane_depth", {router = name, lane = "2"}))
    assert.equal(5 - taken, depths.lanes[1] + depths.lanes[2])
    assert.equal(0, value(families, "commandbus_message_router_dropped_total", {router = name}))
    -- A name is unique while its router lives; closed, it leaves metrics.
    local again, err = commandbus.message_router{name = name}
    assert.is_nil(again)
    assert.equal("INVALID_ARGUMENT", err.code)
    router:close()
    assert.is_nil(value(prometheus.parse(assert(bus:metrics_text())), "commandbus_message_router_routed_total",
                        {router = name}))
  end)

  it("say NOT_FOUND for a queue that does not exist", function()
    local q = assert(bus:queue(helper.unique("nosuchqueue")))
    local m, err = q:metrics()
    assert.is_nil(m)
    assert.equal("NOT_FOUND", err.code)
    assert.matches("no queue `" .. q:name() .. "`", err.message, 1, true)
    local id, err2 = q:send{x = 1}
    assert.is_nil(id)
    assert.equal("NOT_FOUND", err2.code)
  end)
end)

describe("the exposition parser of these specs", function()
  local function refuses(text, why)
    local ok, err = pcall(prometheus.parse, text)
    assert.is_false(ok, "accepted: " .. text)
    assert.matches(why, err)
  end

  it("reads labels with escapes and values of every form", function()
    local families = prometheus.parse('# HELP a_total A \\\\ help\\n.\n# TYPE a_total counter\n'
                                      .. 'a_total{x="q\\"\\\\\\n",y=""} 1.5e3\na_total 2 1700000000\nb NaN\nc +Inf\n')
    assert.equal("A \\ help\n.", families.a_total.help)
    assert.equal(1500, value(families, "a_total", {x = 'q"\\\n'}))
    assert.equal(math.huge, value(families, "c"))
  end)

  it("refuses what a scraper would", function()
    refuses("a 1\nb 2\na 3\n", "split")
    refuses("a{x=\"1\"} 1\na{x=\"1\"} 2\n", "repeated")
    refuses("a 1\n# TYPE a gauge\n", "TYPE after")
    refuses("# TYPE a gauge\n# TYPE a gauge\n", "TYPE twice")
    refuses("a{x=\"\\t\"} 1\n", "escape")
    refuses("a{x=1} 1\n", "label")
    refuses("a one\n", "value")
    refuses("1a 1\n", "name")
    refuses("a 1", "newline")
  end)
end)
