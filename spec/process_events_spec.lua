-- Process events, awaiting processes and events, the event sink.
local helper = require "spec.helper"
local saga = require "spec.support.saga"
local timing = require "spec.support.await_timing"

local sql = helper.sql

local function types_of(events)
  local out = {}
  for i, e in ipairs(events) do out[i] = e.event_type end
  return out
end

describe("process events", function()
  local bus, domain, order
  before_each(function()
    bus = helper.bus()
    assert(bus:setup())
    domain = helper.unique("pev")
    order = saga.for_domain(domain)
  end)
  after_each(function() bus:close() end)

  it("log every change of a saga in order, numbered 1, 2, 3, ...", function()
    local id = assert(order:start(bus, {order = 1}))
    saga.settle(bus, domain)
    local events = assert(bus:process_events(domain, id))
    assert.same({"STARTED", "STEP_STARTED", "STEP_STARTED", "COMPLETED"}, types_of(events))
    for i, e in ipairs(events) do
      assert.equal(i, tonumber(e.sequence))
      assert.equal(domain, e.domain)
      assert.equal(id, e.process_id)
    end
    assert.same({"reserve", "charge", "ship", "ship"}, {events[1].step, events[2].step, events[3].step, events[4].step})
    assert.equal("Order", events[1].data.process_type)
    assert.equal("reserve", events[2].data.previous_step)
    assert.equal("COMPLETED", events[4].status)
    -- after_sequence skips what the caller has seen.
    assert.same({"STEP_STARTED", "COMPLETED"}, types_of(assert(bus:process_events(domain, id, 2))))
  end)

  it("log a compensation", function()
    local id = assert(order:start(bus, {order = 2, fail = "charge"}))
    saga.settle(bus, domain)
    assert.same({"STARTED", "STEP_STARTED", "COMPENSATING", "COMPENSATED"},
                types_of(assert(bus:process_events(domain, id))))
  end)

  it("say NOT_FOUND for an unknown process", function()
    local unknown = "01234567-89ab-7def-8123-456789abcdef"
    local events, err = bus:process_events(domain, unknown)
    assert.is_nil(events)
    assert.equal("NOT_FOUND", err.code)
    local seq, err2 = bus:append_process_event(domain, unknown, "progress", {})
    assert.is_nil(seq)
    assert.equal("NOT_FOUND", err2.code)
  end)

  it("take host events while running, refuse reserved names and finished processes", function()
    local id = assert(order:start(bus, {order = 3}))
    assert.equal(2, tonumber(assert(bus:append_process_event(domain, id, "progress", {pct = 50}))))
    local e = assert(bus:process_events(domain, id, 1))[1]
    assert.equal("progress", e.event_type)
    assert.equal(50, math.floor(e.data.pct))
    assert.equal("reserve", e.step)
    local seq, err = bus:append_process_event(domain, id, "COMPLETED", {})
    assert.is_nil(seq)
    assert.equal("INVALID_ARGUMENT", err.code)
    assert.has_error(function() bus:append_process_event(domain, id, "progress", "not a table") end)
    saga.settle(bus, domain)
    seq, err = bus:append_process_event(domain, id, "late", {})
    assert.is_nil(seq)
    assert.equal("INVALID_STATE", err.code)
  end)
end)

describe("await_process and await_event", function()
  local bus, domain, order
  before_each(function()
    bus = helper.bus()
    assert(bus:setup())
    domain = helper.unique("paw")
    order = saga.for_domain(domain)
  end)
  after_each(function() bus:close() end)

  it("return at once for a process that already finished (re-attach after terminal)", function()
    local id = assert(order:start(bus, {order = 1}))
    saga.settle(bus, domain)
    local t0 = helper.clock()
    local p = assert(bus:await_process(domain, id, {timeout = 10}))
    assert.equal("COMPLETED", p.status)
    assert.same({"reserve", "charge", "ship"}, p.state.done)
    local e = assert(bus:await_event(domain, id, "STEP_STARTED", 2, {timeout = 10}))
    assert.equal(3, tonumber(e.sequence))
    assert.equal("ship", e.step)
    assert.is_true(helper.clock() - t0 < 0.5)
  end)

  it("say NOT_FOUND with the id for an unknown process, TIMEOUT when time runs out", function()
    local unknown = "01234567-89ab-7def-8123-456789abcdef"
    local p, err = bus:await_process(domain, unknown, {timeout = 1})
    assert.is_nil(p)
    assert.equal("NOT_FOUND", err.code)
    assert.equal("unknown process `" .. unknown .. "`", err.message)
    local e, err2 = bus:await_event(domain, unknown, "STARTED", 0, {timeout = 1})
    assert.is_nil(e)
    assert.equal("unknown process `" .. unknown .. "`", err2.message)
    local id = assert(order:start(bus, {order = 1}))
    p, err = bus:await_process(domain, id, {timeout = 0.2})
    assert.is_nil(p)
    assert.equal("TIMEOUT", err.code)
    e, err = bus:await_event(domain, id, "progress", 0, {timeout = 0.2})
    assert.is_nil(e)
    assert.equal("TIMEOUT", err.code)
    for _, refused in ipairs({{bus:await_process(domain, id, {timeout = -1})}, {bus:await_event(domain, id, "x", -1)}}) do
      assert.is_nil(refused[1])
      assert.equal("INVALID_ARGUMENT", refused[2].code)
    end
  end)

  it("wake on an event appended by another connection (the log's NOTIFY)", function()
    -- As for bus:await (await_spec): while listening, the await reads only on
    -- its safety schedule; a run is clear when no read was planned between
    -- the append and the wake (nor shortly before the append: a read may
    -- come late), so that only the notification explains the wake, and it
    -- must come soon after the append.
    timing.until_clear(4, function()
      local id = assert(order:start(bus, {order = 1}))
      local appended_at = timing.change_at(helper.clock() + timing.AT,
        ("SELECT commandbus.append_process_event('%s', '%s', 'ready', '{\"n\": 7}')"):format(domain, id))
      local t0 = helper.clock()
      local e = assert(bus:await_event(domain, id, "ready", 1, {timeout = 30}))
      local woke = helper.clock() - t0
      assert.equal(2, tonumber(e.sequence))
      assert.equal(7, math.floor(e.data.n))
      local appended = appended_at() - t0
      assert.is_true(woke > appended, ("woke at %.3f s, before the append at %.3f s"):format(woke, appended))
      local read = timing.poll_explaining(appended, woke)
      if read then
        return false, ("appended at %.3f s, woke at %.3f s: the read planned at %.3f s could have seen it")
          :format(appended, woke, read)
      end
      assert.is_true(woke - appended < 0.5, ("woke %.3f s after the append (at %.3f s)"):format(woke - appended, appended))
      return true
    end)
  end)

  it("wake a waiter in another OS process on a completion made here", function()
    local id = assert(order:start(bus, {order = 9}))
    local answer = helper.await_elsewhere("process", domain, id)
    saga.settle(bus, domain)
    local woke, status = answer()
    assert.equal("COMPLETED", status)
    -- completed_at is the completing transaction's start: a little before
    -- its commit, so this overstates the delay, never understates it.
    local completed = tonumber(sql(("SELECT extract(epoch FROM completed_at) FROM commandbus.process"
                                    .. " WHERE process_id = '%s'"):format(id)):match("[%d.]+"))
    -- How fast is bench-await's business; here only that the waiter woke
    -- on the completion, well before the timeout would have ended its wait.
    local delay = tonumber(woke) - completed
    assert.is_true(delay < 2, ("woke %.1f ms after the completion"):format(delay * 1000))
  end)
end)

describe("the process event sink", function()
  local bus, domain, order
  before_each(function()
    bus = helper.bus()
    assert(bus:setup())
    domain = helper.unique("psk")
    order = saga.for_domain(domain)
  end)
  after_each(function() bus:close() end)

  it("pushes committed non-terminal events in order; a lossy sink leaves the log complete", function()
    local seen, dropped = {}, 0
    assert(bus:on_process_event(function(e)
      if tonumber(e.sequence) % 2 == 0 then dropped = dropped + 1 return end -- loses every second event
      seen[e.process_id] = seen[e.process_id] or {}
      table.insert(seen[e.process_id], e)
    end))
    local ids = {}
    for i = 1, 3 do ids[i] = assert(order:start(bus, {order = i})) end
    saga.settle(bus, domain)
    bus:dispatch_process_events()
    assert.is_true(dropped > 0)
    for _, id in ipairs(ids) do
      local pushed = seen[id]
      assert.is_true(#pushed > 0 and #pushed < 4)
      for i, e in ipairs(pushed) do
        assert.is_nil(({COMPLETED = true, COMPENSATED = true, FAILED = true, CANCELED = true})[e.event_type])
        if i > 1 then assert.is_true(tonumber(e.sequence) > tonumber(pushed[i - 1].sequence)) end
      end
      local log = assert(bus:process_events(domain, id))
      assert.equal(4, #log)
      for i, e in ipairs(log) do assert.equal(i, tonumber(e.sequence)) end
    end
    local stats = bus:process_event_stats()
    assert.equal(9, tonumber(stats.pushed)) -- 3 processes x (STARTED + 2 STEP_STARTED); COMPLETED is not pushed
    assert.equal(0, tonumber(stats.dropped))
  end)

  it("never slows writers: a full queue drops and counts", function()
    assert(bus:on_process_event(function() end, {capacity = 2}))
    for i = 1, 5 do assert(order:start(bus, {order = i})) end
    local stats = bus:process_event_stats()
    assert.equal(2, tonumber(stats.pushed))
    assert.equal(3, tonumber(stats.dropped))
    assert.equal(2, bus:dispatch_process_events())
    assert.equal(0, bus:process_event_stats().queued)
  end)

  it("keeps the write when the sink raises", function()
    local calls = 0
    assert(bus:on_process_event(function() calls = calls + 1 error("sink broken") end))
    local id = assert(order:start(bus, {order = 1}))
    assert.equal(1, bus:dispatch_process_events())
    assert.equal(1, calls)
    assert.equal("WAITING", assert(bus:get_process(domain, id)).status)
    assert(bus:on_process_event(nil))
    assert(order:start(bus, {order = 2}))
    assert.equal(0, bus:dispatch_process_events())
  end)

  it("goes on when the sink raises a value that cannot be turned into text", function()
    -- The log line's tostring() of it raised in turn, out of the dispatch
    -- (out of a worker's run() between rounds), the events not yet handed
    -- to the sink left unfreed.
    local calls = 0
    assert(bus:on_process_event(function()
      calls = calls + 1
      error(setmetatable({}, {__tostring = function() error("cannot say") end}))
    end))
    assert(order:start(bus, {order = 1}))
    assert(order:start(bus, {order = 2}))
    assert.equal(2, bus:dispatch_process_events())
    assert.equal(2, calls)
  end)
end)

describe("purge_processes", function()
  it("deletes finished processes with their events and steps, and keeps running ones", function()
    local bus = helper.bus()
    assert(bus:setup())
    local domain = helper.unique("ppg")
    local order = saga.for_domain(domain)
    local done = assert(order:start(bus, {order = 1}))
    saga.settle(bus, domain)
    local running = assert(order:start(bus, {order = 2}))
    assert.equal(0, tonumber(assert(bus:purge_processes{domain = domain, older_than = 3600})))
    assert.equal(1, tonumber(assert(bus:purge_processes{domain = domain, older_than = 0})))
    local p, err = bus:get_process(domain, done)
    assert.is_nil(p)
    assert.equal("NOT_FOUND", err.code)
    assert.equal("0", sql(("SELECT count(*) FROM commandbus.process_event WHERE process_id = '%s'"):format(done))
      :match("%d+"))
    assert.equal("0", sql(("SELECT count(*) FROM commandbus.process_audit WHERE process_id = '%s'"):format(done))
      :match("%d+"))
    assert.equal("WAITING", assert(bus:get_process(domain, running)).status)
    assert.has_error(function() bus:purge_processes{domain = domain} end)
    bus:close()
  end)
end)
