-- The pgmq queue API against a real PostgreSQL.
local commandbus = require "commandbus"
local helper = require "spec.helper"

describe("queue", function()
  local bus, q, name

  before_each(function()
    bus = helper.bus()
    name = helper.unique("q")
    q = assert(bus:queue(name))
    assert(q:create())
  end)

  after_each(function()
    q:drop()
    bus:close()
  end)

  it("sends and reads a message as a table", function()
    local id = assert(q:send({order = 7, items = {"a", "b"}}))
    assert.is_number(tonumber(id))
    local msgs = assert(q:read{vt = 30, qty = 5})
    assert.equal(1, #msgs)
    assert.equal(id, msgs[1].msg_id)
    assert.equal(1, msgs[1].read_ct)
    assert.same({order = 7, items = {"a", "b"}}, msgs[1].message)
    assert.is_string(msgs[1].enqueued_at)
    assert.is_string(msgs[1].vt)
  end)

  it("hides a read message for vt seconds, then redelivers it with read_ct counted", function()
    local id = assert(q:send({n = 1}))
    local first = assert(q:read{vt = 1})
    assert.equal(1, #first)
    assert.same({}, assert(q:read{vt = 1}))       -- hidden
    local again
    for _ = 1, 40 do                              -- visible again after about 1 s
      again = assert(q:read{vt = 30})
      if #again > 0 then break end
      os.execute("sleep 0.1")
    end
    assert.equal(1, #again)
    assert.equal(id, again[1].msg_id)
    assert.equal(2, again[1].read_ct)
  end)

  it("send with a delay keeps the message invisible until then", function()
    assert(q:send({n = 1}, {delay = 30}))
    assert.same({}, assert(q:read{}))
    assert.equal(1, assert(q:metrics()).queue_length)
  end)

  it("send_batch returns one id per message, in order, and reads come in queue order", function()
    local ids = assert(q:send_batch({{n = 1}, {n = 2}, {n = 3}}))
    assert.equal(3, #ids)
    assert.is_true(ids[1] < ids[2] and ids[2] < ids[3])
    local msgs = assert(q:read{qty = 10})
    assert.equal(3, #msgs)
    for i = 1, 3 do
      assert.equal(ids[i], msgs[i].msg_id)
      assert.equal(i, msgs[i].message.n)
    end
  end)

  it("pop returns and removes messages", function()
    assert(q:send_batch({{n = 1}, {n = 2}}))
    local msgs = assert(q:pop{qty = 1})
    assert.equal(1, #msgs)
    assert.equal(1, msgs[1].message.n)
    assert.equal(1, assert(q:metrics()).queue_length)
  end)

  it("delete returns true for a known id and false for an unknown one", function()
    local id = assert(q:send({n = 1}))
    assert.is_true(assert(q:delete(id)))
    assert.is_false(q:delete(id))
    local a = assert(q:send({n = 1}))
    local b = assert(q:send({n = 2}))
    local deleted = assert(q:delete({a, b, 999999}))
    table.sort(deleted)
    assert.same({a, b}, deleted)
  end)

  it("archive moves messages out of the queue", function()
    local id = assert(q:send({n = 1}))
    assert.is_true(assert(q:archive(id)))
    assert.is_false(q:archive(id))
    assert.equal(0, assert(q:metrics()).queue_length)
  end)

  it("set_vt makes a message visible again at once, or returns false for an unknown id", function()
    local id = assert(q:send({n = 1}))
    assert.equal(1, #assert(q:read{vt = 300}))
    local msg = assert(q:set_vt(id, 0))
    assert.equal(id, msg.msg_id)
    assert.equal(1, #assert(q:read{vt = 300}))
    assert.is_false(q:set_vt(424242, 10))
  end)

  it("metrics and purge report what the queue holds", function()
    assert(q:send_batch({{n = 1}, {n = 2}, {n = 3}}))
    local m = assert(q:metrics())
    assert.equal(name, m.queue_name)
    assert.equal(3, m.queue_length)
    assert.equal(3, m.total_messages)
    assert.is_number(m.oldest_msg_age_sec)
    assert.equal(3, assert(q:purge()))
    assert.equal(0, assert(q:metrics()).queue_length)
  end)

  it("list_queues includes the queue and drop removes it", function()
    local found = false
    for _, info in ipairs(assert(bus:list_queues())) do
      if info.queue_name == name then found = true end
    end
    assert.is_true(found)
    assert.is_true(q:drop())
    assert.is_false(q:drop())
    for _, info in ipairs(assert(bus:list_queues())) do
      assert.not_equal(name, info.queue_name)
    end
  end)

  it("read_with_poll wakes at once for a send from another process", function()
    local out = os.tmpname()
    local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
    os.execute(string.format("%s spec/support/send_later.lua %s 0.5 %s &", lua, name, out))
    -- poll_interval is 10 s: only the notification can end the wait early.
    local msgs = assert(q:read_with_poll{vt = 30, qty = 1, max_wait = 8, poll_interval = 10})
    local woke_at = helper.clock()
    assert.equal(1, #msgs)
    assert.equal("another process", msgs[1].message.from)
    local sent_at
    for _ = 1, 50 do
      local f = io.open(out)
      sent_at = f and tonumber(f:read("*a"))
      if f then f:close() end
      if sent_at then break end
      os.execute("sleep 0.05")
    end
    os.remove(out)
    assert.is_number(sent_at)
    assert.is_true(woke_at - sent_at < 1, "woke " .. (woke_at - sent_at) .. " s after the send")
  end)

  it("reads a message lua-cjson cannot decode (nested past its depth) as its JSON text", function()
    -- Another producer (SQL, Python) may store JSON nested deeper than
    -- lua-cjson's decoder goes (1000 levels); PostgreSQL takes it.
    local text = '{"a": ' .. ("["):rep(1200) .. ("]"):rep(1200) .. '}'
    helper.sql(("INSERT INTO pgmq.q_%s (vt, message) VALUES (now(), '%s')"):format(name, text))
    local id = assert(q:send({n = 2}))
    local msgs = assert(q:read{qty = 5})
    assert.equal(2, #msgs)
    assert.equal(text, msgs[1].message) -- as PostgreSQL prints it
    assert.equal(id, msgs[2].msg_id)
    assert.same({n = 2}, msgs[2].message)
  end)

  it("read_with_poll returns an empty list after max_wait when nothing comes", function()
    local msgs = assert(q:read_with_poll{max_wait = 0.3, poll_interval = 0.1})
    assert.same({}, msgs)
  end)
end)

describe("bad input", function()
  local bus
  before_each(function() bus = helper.bus() end)
  after_each(function() bus:close() end)

  it("rejects invalid queue names before any SQL runs", function()
    for _, bad in ipairs({"", "Orders", "a; drop table x", string.rep("a", 60), "1abc", "a-b"}) do
      local q, err = bus:queue(bad)
      assert.is_nil(q)
      assert.equal("INVALID_ARGUMENT", err.code)
      assert.matches("INVALID_ARGUMENT", tostring(err))
    end
  end)

  it("raises on a queue name that is not a string", function()
    assert.has_error(function() bus:queue(nil) end)
    assert.has_error(function() bus:queue({}) end)
  end)

  it("raises for a message that is not a table; INVALID_ARGUMENT for one that cannot be encoded", function()
    local q = assert(bus:queue(helper.unique("bad")))
    assert(q:create())
    assert.has_error(function() q:send("text") end, "bad argument #1 to 'send' (table expected, got string)")
    assert.has_error(function() q:send_batch({{n = 1}, 5}) end,
                     "bad argument #1 to 'send_batch' (message #2: table expected, got number)")
    local id, err = q:send({f = function() end})
    assert.is_nil(id)
    assert.equal("INVALID_ARGUMENT", err.code)
    local ids
    ids, err = q:send_batch({{n = 1}, {f = function() end}})
    assert.is_nil(ids)
    assert.equal("INVALID_ARGUMENT", err.code)
    assert.matches("message #2", err.message)
    assert.equal(0, assert(q:metrics()).queue_length) -- nothing was written
    q:drop()
  end)

  it("returns CLOSED for an operation on a closed bus", function()
    local q = assert(bus:queue("never_created"))
    bus:close()
    local res, err = q:send({n = 1})
    assert.is_nil(res)
    assert.equal("CLOSED", err.code)
    res, err = bus:list_queues()
    assert.is_nil(res)
    assert.equal("CLOSED", err.code)
  end)

  it("returns CONNECTION for an unreachable database within the connect timeout", function()
    local t0 = os.time()
    local b, err = commandbus.connect("postgresql://nobody@127.0.0.1:1/none", {connect_timeout = 1})
    assert.is_nil(b)
    assert.equal("CONNECTION", err.code)
    assert.is_true(os.time() - t0 <= 3)
  end)

  it("raises on option values of the wrong type, and refuses values out of range", function()
    local q = assert(bus:queue("whatever"))
    assert.has_error(function() q:read{vt = "soon"} end)
    assert.has_error(function() q:set_vt(true, 1) end)
    local res, err = q:read{qty = 0}
    assert.is_nil(res)
    assert.equal("INVALID_ARGUMENT", err.code)
    assert.equal("option 'qty' must be an integer from 1 to 1000000, got 0", err.message)
    res, err = q:set_vt("x", 1)
    assert.is_nil(res)
    assert.equal("INVALID_ARGUMENT", err.code)
  end)
end)

describe("module", function()
  it("has a version and a default thread count", function()
    assert.is_string(commandbus._VERSION)
    assert.is_true(commandbus.default_threads() >= 1)
  end)

  it("configure sets the default thread count", function()
    local before = commandbus.default_threads()
    commandbus.configure{threads = 3}
    assert.equal(3, commandbus.default_threads())
    commandbus.configure{threads = before}
    local ok, err = commandbus.configure{threads = 0}
    assert.is_nil(ok)
    assert.equal("INVALID_ARGUMENT", err.code)
    assert.equal(before, commandbus.default_threads())
  end)

  it("setup is idempotent", function()
    local bus = helper.bus()
    assert(bus:setup())
    local ok, applied = bus:setup()
    assert.is_true(ok)
    assert.equal(0, applied)
    bus:close()
  end)
end)
