-- Processes (sagas): defining one, starting it in one transaction, reading
-- processes and their steps back (docs/architecture.md, "Data contract": the
-- process and process_audit tables, process statuses, the command message).
local commandbus = require "commandbus"
local world = require "spec.support.world"

local process = commandbus.process

--- A definition with every hook; fields in `extra` override.
local function definition(domain, extra)
  local d = {
    type = "OrderFulfilment",
    domain = domain,
    first_step = function() return "reserve" end,
    build_command = function(step, state)
      return {type = "Reserve", data = {sku = state.sku, step = step}}
    end,
    update_state = function(state) return state end,
    next_step = function() return nil end,
    compensation_step = function() return nil end,
  }
  for k, v in pairs(extra or {}) do d[k] = v end
  return d
end

describe("process.define", function()
  it("is exposed as commandbus.process and by require", function()
    assert.equal(require("commandbus.process"), commandbus.process)
    assert.is_function(process.define)
  end)

  it("returns a manager with the definition and the default reply queue", function()
    local m = process.define(definition("orders"))
    assert.equal("OrderFulfilment", m.type)
    assert.equal("orders", m.domain)
    assert.equal("orders__process_replies", m.reply_queue)
    assert.is_function(m.first_step)
    assert.is_function(m.start)
  end)

  it("keeps a reply queue that is given", function()
    assert.equal("order_replies", process.define(definition("orders", {reply_queue = "order_replies"})).reply_queue)
  end)

  it("makes compensation_step optional", function()
    local d = definition("orders")
    d.compensation_step = nil
    assert.is_nil(process.define(d).compensation_step)
  end)

  it("raises on a definition that is not a table", function()
    assert.has_error(function() process.define(nil) end, "bad argument #1 to 'define' (table expected, got nil)")
  end)

  it("raises on a missing or mistyped type or domain", function()
    assert.has_error(function() process.define(definition("orders", {type = false})) end,
                     "bad argument #1 to 'define' (field 'type': non-empty string expected, got boolean)")
    assert.has_error(function() process.define(definition("orders", {type = ""})) end,
                     "bad argument #1 to 'define' (field 'type': non-empty string expected, got string)")
    assert.has_error(function() process.define(definition(nil)) end,
                     "bad argument #1 to 'define' (field 'domain': string expected, got nil)")
  end)

  it("raises on an invalid domain or reply queue name", function()
    assert.error_matches(function() process.define(definition("Orders")) end, "invalid domain `Orders`")
    assert.error_matches(function() process.define(definition("orders", {reply_queue = "bad-name"})) end,
                         "invalid reply_queue `bad%-name`")
    -- The default reply queue of a long domain would not fit pgmq's names.
    assert.error_matches(function() process.define(definition(string.rep("d", 35))) end,
                         "give a shorter domain or a reply_queue")
  end)

  it("raises on a missing hook, naming it", function()
    for _, hook in ipairs{"first_step", "build_command", "update_state", "next_step"} do
      local d = definition("orders")
      d[hook] = nil
      assert.has_error(function() process.define(d) end,
                       "bad argument #1 to 'define' (field '" .. hook .. "': function expected, got nil)")
    end
    assert.has_error(function() process.define(definition("orders", {compensation_step = "undo"})) end,
                     "bad argument #1 to 'define' (field 'compensation_step': function expected, got string)")
  end)

  it("raises on an unknown field, so that a misspelt hook is noticed", function()
    assert.has_error(function() process.define(definition("orders", {next_stp = function() end})) end,
                     "bad argument #1 to 'define' (unknown field 'next_stp')")
  end)
end)

describe("process start", function()
  local bus, domain, manager

  before_each(function()
    bus = world.bus()
    domain = world.domain()
    manager = process.define(definition(domain))
  end)

  after_each(function() bus:close() end)

  local function nothing_written()
    assert.same({}, assert(bus:list_processes{domain = domain}))
    assert.same({}, assert(bus:list_commands{domain = domain}))
  end

  it("returns a UUID and writes the process row WAITING at the first step with the state", function()
    local id = assert(manager:start(bus, {sku = "A-1", qty = 2}))
    assert.matches(world.UUID_PATTERN, id)
    local p = assert(bus:get_process(domain, id))
    assert.equal(domain, p.domain)
    assert.equal(id, p.process_id)
    assert.equal("OrderFulfilment", p.type)
    assert.equal("WAITING", p.status)
    assert.equal("reserve", p.current_step)
    assert.same({sku = "A-1", qty = 2}, p.state)
    assert.is_string(p.created_at)
    assert.is_string(p.updated_at)
    assert.is_nil(p.completed_at)
    assert.is_nil(p.error_code)
    assert.is_nil(p.batch_id)
  end)

  it("passes the state to first_step and build_command, and stores {} when none is given", function()
    local seen = {}
    local m = process.define(definition(domain, {
      first_step = function(state) seen.first = state; return "only" end,
      build_command = function(step, state) seen.step, seen.build = step, state; return {type = "Go"} end,
    }))
    local id = assert(m:start(bus))
    assert.same({}, seen.first)
    assert.equal(seen.first, seen.build)
    assert.equal("only", seen.step)
    assert.same({}, assert(bus:get_process(domain, id)).state)
  end)

  it("sends the first command with the process id as correlation_id and the reply queue as reply_to", function()
    local id = assert(manager:start(bus, {sku = "A-1"}))
    local commands = assert(bus:list_commands{domain = domain})
    assert.equal(1, #commands)
    local c = commands[1]
    assert.equal("Reserve", c.type)
    assert.equal("PENDING", c.status)
    assert.equal(id, c.correlation_id)
    assert.equal(manager.reply_queue, c.reply_to)
    local sent = world.details(bus, domain, c.command_id, "SENT")
    assert.equal(1, #sent)
    assert.equal(id, sent[1].correlation_id)
    assert.equal(manager.reply_queue, sent[1].reply_to)
    assert.equal(c.msg_id, sent[1].msg_id)
  end)

  it("queues the command message in rcmd's format, with reply_to", function()
    local id = assert(manager:start(bus, {sku = "A-1"}))
    local msgs = world.drain_queue(bus, domain .. "__commands")
    assert.equal(1, #msgs)
    local m = msgs[1]
    assert.same({"command_id", "command_type", "correlation_id", "data", "domain", "reply_to"}, world.keys(m))
    assert.equal(domain, m.domain)
    assert.equal("Reserve", m.command_type)
    assert.equal(id, m.correlation_id)
    assert.equal(domain .. "__process_replies", m.reply_to)
    assert.same({sku = "A-1", step = "reserve"}, m.data)
    assert.equal(assert(bus:list_commands{domain = domain})[1].command_id, m.command_id)
  end)

  it("creates the reply queue", function()
    assert(manager:start(bus, {sku = "A-1"}))
    assert.equal(0, world.queue_length(bus, domain .. "__process_replies"))
  end)

  it("records the step in process_audit, with no reply yet", function()
    local id = assert(manager:start(bus, {sku = "A-1"}))
    local steps = assert(bus:process_audit(domain, id))
    assert.equal(1, #steps)
    local s = steps[1]
    assert.equal("reserve", s.step_name)
    assert.equal(assert(bus:list_commands{domain = domain})[1].command_id, s.command_id)
    assert.equal("Reserve", s.command_type)
    assert.same({sku = "A-1", step = "reserve"}, s.command_data)
    assert.is_string(s.sent_at)
    assert.is_not_nil(s.id)
    assert.is_nil(s.reply_outcome)
    assert.is_nil(s.reply_data)
    assert.is_nil(s.received_at)
  end)

  it("records the batch id on the process row", function()
    local batch_id = world.uuid()
    local id = assert(manager:start(bus, {}, {batch_id = batch_id}))
    assert.equal(batch_id, assert(bus:get_process(domain, id)).batch_id)
  end)

  it("honours a reply queue given in the definition", function()
    local replies = domain .. "_r"
    local m = process.define(definition(domain, {reply_queue = replies}))
    local id = assert(m:start(bus, {}))
    local c = assert(bus:list_commands{domain = domain, correlation_id = id})[1]
    assert.equal(replies, c.reply_to)
  end)

  it("writes nothing when build_command raises", function()
    local m = process.define(definition(domain, {build_command = function() error("no such sku") end}))
    assert.error_matches(function() m:start(bus, {}) end, "no such sku")
    nothing_written()
  end)

  it("raises and writes nothing when build_command returns no command type", function()
    local m = process.define(definition(domain, {build_command = function() return {data = {}} end}))
    assert.error_matches(function() m:start(bus, {}) end, "returned a command without a string type")
    nothing_written()
  end)

  it("returns INVALID_ARGUMENT and writes nothing for an empty command type", function()
    local m = process.define(definition(domain, {build_command = function() return {type = ""} end}))
    local id, err = m:start(bus, {})
    assert.is_nil(id)
    assert.equal("INVALID_ARGUMENT", err.code)
    nothing_written()
  end)

  it("returns INVALID_ARGUMENT and writes nothing when the state cannot be encoded", function()
    local id, err = manager:start(bus, {callback = function() end})
    assert.is_nil(id)
    assert.equal("INVALID_ARGUMENT", err.code)
    nothing_written()
  end)

  it("writes nothing when the first command's id already exists (DUPLICATE_COMMAND)", function()
    local existing = assert(bus:send{domain = domain, type = "Other", data = {n = 1}})
    local m = process.define(definition(domain, {
      build_command = function() return {type = "Reserve", id = existing.command_id} end,
    }))
    local id, err = m:start(bus, {sku = "A-1"})
    assert.is_nil(id)
    assert.equal("DUPLICATE_COMMAND", err.code)
    assert.matches(existing.command_id, err.message, 1, true)
    assert.same({}, assert(bus:list_processes{domain = domain}))
    -- The existing command is untouched and is still the only message.
    local c = assert(bus:get_command(domain, existing.command_id))
    assert.equal("Other", c.type)
    assert.is_nil(c.reply_to)
    assert.same({"SENT"}, world.events(bus, domain, existing.command_id))
    assert.equal(1, world.queue_length(bus, domain .. "__commands"))
  end)

  it("raises on misuse of start", function()
    assert.has_error(function() manager:start(nil, {}) end, "bad argument #1 to 'start' (bus expected, got nil)")
    assert.has_error(function() manager:start(bus, "state") end,
                     "bad argument #2 to 'start' (table expected, got string)")
    assert.has_error(function() manager:start(bus, {}, {batch_id = 7}) end,
                     "bad argument #3 to 'start' (field 'batch_id': string expected, got number)")
    local m = process.define(definition(domain, {first_step = function() return nil end}))
    assert.error_matches(function() m:start(bus, {}) end, "first_step must return a step name")
    nothing_written()
  end)

  it("returns INVALID_ARGUMENT for a batch id that is not a UUID", function()
    local id, err = manager:start(bus, {}, {batch_id = "nope"})
    assert.is_nil(id)
    assert.equal("INVALID_ARGUMENT", err.code)
    nothing_written()
  end)
end)

describe("process queries", function()
  local bus, domain

  before_each(function()
    bus = world.bus()
    domain = world.domain()
  end)

  after_each(function() bus:close() end)

  it("reports an unknown process as NOT_FOUND, naming it", function()
    local missing = world.uuid()
    local p, err = bus:get_process(domain, missing)
    assert.is_nil(p)
    assert.equal("NOT_FOUND", err.code)
    assert.equal("unknown process `" .. missing .. "`", err.message)
    local steps, err2 = bus:process_audit(domain, missing)
    assert.is_nil(steps)
    assert.equal("NOT_FOUND", err2.code)
    assert.equal("unknown process `" .. missing .. "`", err2.message)
  end)

  it("refuses an id that is not a UUID and an invalid domain", function()
    local p, err = bus:get_process(domain, "not-a-uuid")
    assert.is_nil(p)
    assert.equal("INVALID_ARGUMENT", err.code)
    p, err = bus:list_processes{domain = "Bad Domain"}
    assert.is_nil(p)
    assert.equal("INVALID_ARGUMENT", err.code)
  end)

  it("lists processes newest first, filtered by type and status, with limit and offset", function()
    local a = process.define(definition(domain, {type = "A"}))
    local b = process.define(definition(domain, {type = "B"}))
    local a1 = assert(a:start(bus, {n = 1}))
    local b1 = assert(b:start(bus, {n = 2}))
    local a2 = assert(a:start(bus, {n = 3}))
    local function ids(list)
      local out = {}
      for i, p in ipairs(list) do out[i] = p.process_id end
      return out
    end
    assert.same({a2, b1, a1}, ids(assert(bus:list_processes{domain = domain})))
    assert.same({a2, a1}, ids(assert(bus:list_processes{domain = domain, type = "A"})))
    assert.same({a2, b1, a1}, ids(assert(bus:list_processes{domain = domain, status = "WAITING"})))
    assert.same({}, assert(bus:list_processes{domain = domain, status = "COMPLETED"}))
    assert.same({b1}, ids(assert(bus:list_processes{domain = domain, limit = 1, offset = 1})))
    local listed = assert(bus:list_processes{domain = domain, type = "B"})[1]
    assert.same({n = 2}, listed.state)
    assert.equal("reserve", listed.current_step)
    -- Another domain's processes stay out.
    assert.same({}, assert(bus:list_processes{domain = world.domain()}))
  end)

  it("keeps each process's steps apart in process_audit", function()
    local m = process.define(definition(domain))
    local p1 = assert(m:start(bus, {sku = "1"}))
    local p2 = assert(m:start(bus, {sku = "2"}))
    local s1 = assert(bus:process_audit(domain, p1))
    local s2 = assert(bus:process_audit(domain, p2))
    assert.equal(1, #s1)
    assert.equal(1, #s2)
    assert.same({sku = "1", step = "reserve"}, s1[1].command_data)
    assert.same({sku = "2", step = "reserve"}, s2[1].command_data)
    assert.are_not.equal(s1[1].command_id, s2[1].command_id)
  end)

  it("raises on misuse of the query methods", function()
    assert.has_error(function() bus:get_process(domain) end)
    assert.has_error(function() bus:list_processes() end)
    assert.has_error(function() bus:list_processes{domain = domain, status = 1} end)
  end)
end)
