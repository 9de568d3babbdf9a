-- Batches of commands: exact counts whenever read, the status by rcmd's rule,
-- and the end recorded once with a BATCH_COMPLETED audit event
-- (docs/architecture.md: batch statuses).
local helper = require "spec.helper"
local world = require "spec.support.world"

describe("batch", function()
  local bus, domain

  before_each(function()
    bus = world.bus()
    domain = world.domain()
  end)

  after_each(function() bus:close() end)

  local function create(commands, extra)
    local spec = {domain = domain, name = "nightly", commands = commands}
    for k, v in pairs(extra or {}) do spec[k] = v end
    local batch = assert(bus:create_batch(spec))
    local ids = {}
    for i, c in ipairs(batch.commands) do ids[i] = c.command_id end
    return batch.batch_id, ids
  end

  local function run_until_settled(ids)
    local _, met = world.work(bus, domain, world.settled(bus, domain, ids))
    assert.is_true(met, "the commands did not settle in time")
  end

  local function counts(b)
    return {
      total = b.total_count, completed = b.completed_count, canceled = b.canceled_count, failed = b.failed_count,
      tsq = b.in_troubleshooting_count, pending = b.pending_count, in_progress = b.in_progress_count,
    }
  end

  it("is created PENDING with its total, name and custom data, each command carrying the batch id", function()
    local batch_id, ids = create({{type = "Echo"}, {type = "Echo"}, {type = "Echo"}}, {custom_data = {owner = "ops"}})
    assert.matches(world.UUID_PATTERN, batch_id)
    local b = assert(bus:get_batch(domain, batch_id))
    assert.equal("PENDING", b.status)
    assert.equal("COMMAND", b.batch_type)
    assert.equal("nightly", b.name)
    assert.same({owner = "ops"}, b.custom_data)
    assert.same({total = 3, completed = 0, canceled = 0, failed = 0, tsq = 0, pending = 3, in_progress = 0}, counts(b))
    for _, id in ipairs(ids) do
      local c = assert(bus:get_command(domain, id))
      assert.equal(batch_id, c.batch_id)
      assert.equal(batch_id, world.details(bus, domain, id, "SENT")[1].batch_id)
    end
    assert.equal(3, #assert(bus:list_commands{domain = domain, batch_id = batch_id}))
  end)

  it("is listed by list_batches, filtered by status", function()
    local batch_id = create({{type = "Echo"}})
    local listed = assert(bus:list_batches{domain = domain})
    assert.equal(1, #listed)
    assert.equal(batch_id, listed[1].batch_id)
    assert.equal(1, #assert(bus:list_batches{domain = domain, status = "PENDING"}))
    assert.same({}, assert(bus:list_batches{domain = domain, status = "COMPLETED"}))
  end)

  it("refuses a batch without commands and reports an unknown batch as NOT_FOUND", function()
    local res, err = bus:create_batch{domain = domain, commands = {}}
    assert.is_nil(res)
    assert.equal("INVALID_ARGUMENT", err.code)
    res, err = bus:get_batch(domain, world.uuid())
    assert.is_nil(res)
    assert.equal("NOT_FOUND", err.code)
  end)

  it("completes when every command succeeded, with one BATCH_STARTED and one BATCH_COMPLETED event", function()
    local batch_id, ids = create({{type = "Echo"}, {type = "Echo"}, {type = "Nothing"}})
    run_until_settled(ids)
    local b = assert(bus:get_batch(domain, batch_id))
    assert.equal("COMPLETED", b.status)
    assert.same({total = 3, completed = 3, canceled = 0, failed = 0, tsq = 0, pending = 0, in_progress = 0}, counts(b))
    assert.is_string(b.started_at)
    assert.is_string(b.completed_at)
    -- Reading it again records nothing more.
    assert(bus:get_batch(domain, batch_id))
    assert.same({"BATCH_STARTED", "BATCH_COMPLETED"}, world.events(bus, domain, batch_id))
    assert.same({batch_id = batch_id, total_count = 3, completed_count = 3, canceled_count = 0, failed_count = 0},
                world.details(bus, domain, batch_id, "BATCH_COMPLETED")[1])
    assert.equal(1, #assert(bus:list_batches{domain = domain, status = "COMPLETED"}))
  end)

  it("is detected complete by the worker itself, before anyone reads the batch", function()
    local batch_id, ids = create({{type = "Echo"}, {type = "Echo"}})
    local _, met = world.work(bus, domain, function()
      return #world.details(bus, domain, batch_id, "BATCH_COMPLETED") > 0
    end)
    assert.is_true(met, "no BATCH_COMPLETED event without reading the batch")
    for _, id in ipairs(ids) do assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status) end
  end)

  it("completes with failures after a business-rule failure, with exact counts", function()
    local batch_id, ids = create({{type = "Echo"}, {type = "Refuse", data = {balance = 0}}, {type = "Echo"}})
    run_until_settled(ids)
    local b = assert(bus:get_batch(domain, batch_id))
    assert.equal("COMPLETED_WITH_FAILURES", b.status)
    assert.same({total = 3, completed = 2, canceled = 0, failed = 1, tsq = 0, pending = 0, in_progress = 0}, counts(b))
    assert.same({batch_id = batch_id, total_count = 3, completed_count = 2, canceled_count = 0, failed_count = 1},
                world.details(bus, domain, batch_id, "BATCH_COMPLETED")[1])
  end)

  it("is complete with failures while a command sits in the TSQ, and ends once the operator resolves it", function()
    -- rcmd's rule: a member in the TSQ counts as finished (with a failure);
    -- the batch has ended (BATCH_COMPLETED) only when nothing is left there.
    local batch_id, ids = create({{type = "Echo"}, {type = "Permanent"}, {type = "Echo"}, {type = "Permanent"}})
    run_until_settled(ids)
    local b = assert(bus:get_batch(domain, batch_id))
    assert.equal("COMPLETED_WITH_FAILURES", b.status)
    assert.same({total = 4, completed = 2, canceled = 0, failed = 0, tsq = 2, pending = 0, in_progress = 0}, counts(b))
    assert.same({}, world.details(bus, domain, batch_id, "BATCH_COMPLETED"))
    local listed = assert(bus:list_batches{domain = domain})[1]
    assert.equal("COMPLETED_WITH_FAILURES", listed.status)
    assert.equal(2, listed.in_troubleshooting_count)
    assert.equal(2, listed.completed_count)

    assert(bus:tsq():cancel(domain, ids[2], "not needed"))
    b = assert(bus:get_batch(domain, batch_id))
    assert.equal("COMPLETED_WITH_FAILURES", b.status)
    assert.same({total = 4, completed = 2, canceled = 1, failed = 0, tsq = 1, pending = 0, in_progress = 0}, counts(b))
    assert.same({}, world.details(bus, domain, batch_id, "BATCH_COMPLETED"))

    -- The last decision ends the batch in the operator's call.
    assert(bus:tsq():complete(domain, ids[4], {by = "hand"}))
    assert.same({batch_id = batch_id, total_count = 4, completed_count = 3, canceled_count = 1, failed_count = 0},
                world.details(bus, domain, batch_id, "BATCH_COMPLETED")[1])
    b = assert(bus:get_batch(domain, batch_id))
    assert.equal("COMPLETED_WITH_FAILURES", b.status)
    assert.same({total = 4, completed = 3, canceled = 1, failed = 0, tsq = 0, pending = 0, in_progress = 0}, counts(b))
    assert.equal(1, #world.details(bus, domain, batch_id, "BATCH_COMPLETED"))
  end)

  it("ends after a TSQ cancel of its only command in the TSQ", function()
    local batch_id, ids = create({{type = "Echo"}, {type = "Permanent"}})
    run_until_settled(ids)
    assert.equal("COMPLETED_WITH_FAILURES", assert(bus:get_batch(domain, batch_id)).status)
    assert.same({"BATCH_STARTED"}, world.events(bus, domain, batch_id))
    assert(bus:tsq():cancel(domain, ids[2], "give up"))
    local b = assert(bus:get_batch(domain, batch_id))
    assert.equal("COMPLETED_WITH_FAILURES", b.status)
    assert.same({total = 2, completed = 1, canceled = 1, failed = 0, tsq = 0, pending = 0, in_progress = 0}, counts(b))
    assert.same({"BATCH_STARTED", "BATCH_COMPLETED"}, world.events(bus, domain, batch_id))
  end)

  it("is IN_PROGRESS again when the operator retries its TSQ command, and COMPLETED when that succeeds", function()
    local batch_id, ids = create({{type = "Echo"}, {type = "Flaky", data = {succeed_on = 2}, max_attempts = 1}})
    run_until_settled(ids)
    local b = assert(bus:get_batch(domain, batch_id))
    assert.equal("COMPLETED_WITH_FAILURES", b.status)
    assert.equal(1, b.in_troubleshooting_count)
    assert(bus:tsq():retry(domain, ids[2]))
    b = assert(bus:get_batch(domain, batch_id))
    assert.equal("IN_PROGRESS", b.status)
    assert.is_nil(b.completed_at)
    assert.same({total = 2, completed = 1, canceled = 0, failed = 0, tsq = 0, pending = 1, in_progress = 0}, counts(b))
    local _, met = world.work(bus, domain, world.settled(bus, domain, {ids[2]}),
                                   {handlers = {Flaky = function() return {ok = true} end}})
    assert.is_true(met)
    b = assert(bus:get_batch(domain, batch_id))
    assert.equal("COMPLETED", b.status)
    assert.equal(2, b.completed_count)
    assert.same({batch_id = batch_id, total_count = 2, completed_count = 2, canceled_count = 0, failed_count = 0},
                world.details(bus, domain, batch_id, "BATCH_COMPLETED")[1])
    assert.same({"BATCH_STARTED", "BATCH_COMPLETED"}, world.events(bus, domain, batch_id))
  end)

  it("a batch of one business-rule failure completes with failures", function()
    local batch_id, ids = create({{type = "Refuse", data = {balance = 0}}})
    run_until_settled(ids)
    local b = assert(bus:get_batch(domain, batch_id))
    assert.equal("COMPLETED_WITH_FAILURES", b.status)
    assert.equal(1, b.failed_count)
  end)
end)
