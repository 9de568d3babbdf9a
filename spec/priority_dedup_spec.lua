-- Priorities and deduplication windows on send.
local helper = require "spec.helper"
local world = require "spec.support.world"

describe("priorities", function()
  local bus
  before_each(function() bus = world.bus() end)
  after_each(function() bus:close() end)

  it("are taken in order: higher first, the same priority in the order sent", function()
    local domain = world.domain()
    local commands = {}
    for i = 1, 12 do
      local priority = ({0, 5, -3, 1})[i % 4 + 1]
      commands[i] = {type = "Order", data = {i = i, p = priority}, priority = priority}
    end
    assert(bus:send_batch{domain = domain, commands = commands})
    local seen = {}
    local worker = assert(bus:worker(world.options(domain, {handlers = {
      Order = function(cmd) seen[#seen + 1] = {p = cmd.data.p, i = cmd.data.i} end}})))
    world.run(worker, function() return #seen == 12 end)
    worker:close()
    assert.equal(12, #seen)
    for k = 2, #seen do
      local a, b = seen[k - 1], seen[k]
      assert.is_true(a.p > b.p or (a.p == b.p and a.i < b.i),
                     ("#%d (priority %d) ran before #%d (priority %d)"):format(a.i, a.p, b.i, b.p))
    end
  end)

  it("ride in the message only when not 0, and a bad one from another producer reads as 0", function()
    local domain = world.domain()
    assert(bus:send{domain = domain, type = "Nothing", data = {}, priority = 7})
    assert(bus:send{domain = domain, type = "Nothing", data = {}})
    local messages = world.drain_queue(bus, domain .. "__commands")
    assert.equal(7, math.tointeger and math.tointeger(messages[1].priority) or messages[1].priority)
    assert.is_nil(messages[2].priority)
    -- A raw pgmq message with a priority that is not a number is still sent.
    local q = assert(bus:queue(domain .. "__commands"))
    assert(q:send({command_id = world.uuid(), command_type = "Nothing", priority = "urgent"}))
    for _, bad in ipairs({1.5, 40000, -40000}) do
      local sent, err = bus:send{domain = domain, type = "Nothing", priority = bad}
      assert.is_nil(sent)
      assert.equal("INVALID_ARGUMENT", err.code)
    end
    assert.has_error(function() bus:send{domain = domain, type = "Nothing", priority = "high"} end)
  end)
end)

describe("deduplication windows", function()
  local bus
  before_each(function() bus = world.bus() end)
  after_each(function() bus:close() end)

  it("a dedup key is refused inside its window, naming the first command, and accepted after it", function()
    local domain = world.domain()
    local first = assert(bus:send{domain = domain, type = "Nothing", data = {}, dedup_key = "invoice-7", dedup_for = 1})
    local again, err = bus:send{domain = domain, type = "Nothing", data = {}, dedup_key = "invoice-7", dedup_for = 1}
    assert.is_nil(again)
    assert.equal("DUPLICATE_COMMAND", err.code)
    assert.equal(first.command_id, err.command_id)
    -- Another domain has its own keys.
    assert(bus:send{domain = world.domain(), type = "Nothing", data = {}, dedup_key = "invoice-7", dedup_for = 1})
    world.sleep(1.1)
    local later = assert(bus:send{domain = domain, type = "Nothing", data = {}, dedup_key = "invoice-7", dedup_for = 60})
    assert.are_not.equal(first.command_id, later.command_id)
    local _, err2 = bus:send{domain = domain, type = "Nothing", data = {}, dedup_key = "invoice-7", dedup_for = 1}
    assert.equal(later.command_id, err2.command_id)
    assert.equal(2, tonumber(helper.sql(("SELECT count(*) FROM commandbus.command WHERE domain = '%s'"):format(domain)):match("%d+")))
  end)

  it("send_batch refuses a key held by an earlier command of the same call", function()
    local domain = world.domain()
    local res = assert(bus:send_batch{domain = domain, commands = {
      {type = "Nothing", dedup_key = "k", dedup_for = 60}, {type = "Nothing", dedup_key = "k", dedup_for = 60},
      {type = "Nothing"}}})
    assert.is_number(tonumber(res[1].msg_id))
    assert.is_true(res[2].duplicate)
    assert.equal(res[1].command_id, res[2].duplicate_of)
    assert.is_number(tonumber(res[3].msg_id))
    for _, half in ipairs({{dedup_key = "k"}, {dedup_for = 5}}) do
      half.domain, half.type = domain, "Nothing"
      local sent, err = bus:send(half)
      assert.is_nil(sent)
      assert.equal("INVALID_ARGUMENT", err.code)
    end
    assert.has_error(function() bus:send{domain = domain, type = "Nothing", dedup_key = "k", dedup_for = "1h"} end)
  end)
end)
