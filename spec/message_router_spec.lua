-- commandbus.message_router: in-process routing of values to lanes by key.
-- No database needed. Handler lanes run in Lua states of their own, so the
-- handler specs read what the lanes wrote to files (spec/support/router_*.lua).
local commandbus = require "commandbus"
local socket = require "socket"

local function new_router(options)
  return assert(commandbus.message_router(options))
end

--- Takes from every lane until it ends; returns {[lane] = {values...}}.
local function drain(router, lanes)
  local seen = {}
  for lane = 1, lanes do
    seen[lane] = {}
    while true do
      local values, err = router:take(lane, 1000, 0)
      if values == nil then
        assert.equal("ended", err)
        break
      end
      for _, v in ipairs(values) do seen[lane][#seen[lane] + 1] = v end
    end
  end
  return seen
end

--- A fresh file prefix for the lanes to append to, and its cleanup.
local function lane_files(lanes)
  local prefix = os.tmpname()
  local files = {}
  local function read(lane)
    local f = io.open(("%s.%d"):format(prefix, lane))
    if not f then return {} end
    local lines = {}
    for line in f:lines() do lines[#lines + 1] = line end
    f:close()
    return lines
  end
  function files.lines(lane) return read(lane) end
  function files.cleanup()
    os.remove(prefix)
    for lane = 1, lanes do os.remove(("%s.%d"):format(prefix, lane)) end
  end
  files.prefix = prefix
  return files
end

describe("message_router", function()
  it("is exported by the commandbus module", function()
    assert.is_function(commandbus.message_router)
  end)

  it("sends the same key to the same lane, and lane_for is stable across routers", function()
    local a = new_router{lanes = 8}
    local b = new_router{lanes = 8}
    for i = 1, 200 do
      local key = "customer-" .. i
      assert.equal(a:lane_for(key), a:lane_for(key))
      assert.equal(a:lane_for(key), b:lane_for(key))
    end
    a:close()
    b:close()
  end)

  it("lane_for returns 1-based lanes from 1 to lanes, and uses them all", function()
    local router = new_router{lanes = 7}
    local used = {}
    for i = 1, 2000 do
      local lane = router:lane_for("key:" .. i)
      assert.is_true(lane >= 1 and lane <= 7, "lane " .. lane)
      used[lane] = true
    end
    for lane = 1, 7 do assert.is_true(used[lane], "lane " .. lane .. " unused") end
    assert.equal(7, router:lanes())
    router:close()
  end)

  it("delivers values intact, on the key's lane, in per-key order (take)", function()
    local router = new_router{lanes = 4, batch_size = 16}
    local sent = {}
    for seq = 1, 300 do
      local key = "k" .. (seq % 13)
      local value = {key = key, seq = seq, name = "caf\195\169 \226\130\172", ok = seq % 2 == 0,
                     amount = seq * 1.5, tags = {"a", "b", {deep = {n = seq}}}}
      sent[seq] = value
      assert.is_true(router:route(key, value))
    end
    -- A scalar value travels too.
    assert.is_true(router:route("scalar", "just a string"))
    router:stop()
    local seen = drain(router, 4)
    local last_seq, count, scalar = {}, 0, nil
    for lane = 1, 4 do
      for _, value in ipairs(seen[lane]) do
        if type(value) == "string" then
          scalar = value
          assert.equal(router:lane_for("scalar"), lane)
        else
          count = count + 1
          assert.equal(router:lane_for(value.key), lane)
          assert.is_true(value.seq > (last_seq[value.key] or 0), "out of order for " .. value.key)
          last_seq[value.key] = value.seq
          assert.same(sent[value.seq], value)
        end
      end
    end
    assert.equal(300, count)
    assert.equal("just a string", scalar)
    router:close()
  end)

  it("take waits for values on a started router and returns an empty list on timeout", function()
    local router = new_router{lanes = 2, batch_size = 4, batch_timeout_ms = 1}
    assert.is_true(router:start())
    local lane = router:lane_for("x")
    assert.same({}, router:take(lane, 10, 0))
    for seq = 1, 3 do assert.is_true(router:route("x", seq)) end
    local got = {}
    local deadline = socket.gettime() + 1
    while #got < 3 and socket.gettime() < deadline do
      for _, v in ipairs(router:take(lane, 10, 200)) do got[#got + 1] = v end
    end
    assert.same({1, 2, 3}, got)
    router:stop()
    local values, err = router:take(lane, 10, 0)
    assert.is_nil(values)
    assert.equal("ended", err)
    router:close()
  end)

  it("with the drop policy refuses at once when full, and counts it", function()
    local router = new_router{lanes = 1, batch_size = 1, queue_size = 2, policy = "drop"}
    assert.is_true(router:route("a", 1))
    assert.is_true(router:route("a", 2))
    local t0 = socket.gettime()
    local ok, reason = router:route("a", 3)
    assert.is_false(ok)
    assert.equal("full", reason)
    assert.is_true(socket.gettime() - t0 < 0.05)
    local stats = router:stats()
    assert.equal(1, stats.dropped)
    assert.equal(2, router:queue_depths().ingress)
    router:close()
  end)

  it("with the block policy waits for room, then gives up after block_timeout_ms", function()
    local router = new_router{lanes = 1, batch_size = 1, queue_size = 1, policy = "block", block_timeout_ms = 60}
    assert.is_true(router:route("a", 1))
    local t0 = socket.gettime()
    local ok, reason = router:route("a", 2)
    local waited = socket.gettime() - t0
    assert.is_false(ok)
    assert.equal("timeout", reason)
    assert.is_true(waited >= 0.05, "waited only " .. waited)
    assert.equal(1, router:stats().dropped)
    router:close()
  end)

  it("with the block policy waits, then succeeds when the lane consumes", function()
    local files = lane_files(1)
    local router = new_router{lanes = 1, batch_size = 1, batch_timeout_ms = 0, queue_size = 1,
                              lane_queue_size = 1, policy = "block", block_timeout_ms = 1500,
                              handler = "spec.support.router_lane"}
    assert.is_true(router:start())
    local t0 = socket.gettime()
    for seq = 1, 6 do
      assert.is_true(router:route("a", {file = files.prefix, key = "a", seq = seq, sleep = 0.03}))
    end
    -- ingress 1 + lane 1 + one in the handler: the rest had to wait for it
    assert.is_true(socket.gettime() - t0 >= 0.05)
    router:stop()
    assert.same({"a 1", "a 2", "a 3", "a 4", "a 5", "a 6", "stop"}, files.lines(1))
    assert.equal(0, router:stats().dropped)
    router:close()
    files.cleanup()
  end)

  it("stop delivers every accepted value and ends every lane", function()
    local router = new_router{lanes = 3, batch_size = 50, batch_timeout_ms = 1000}
    assert.is_true(router:start())
    for seq = 1, 120 do assert.is_true(router:route("k" .. seq, seq)) end
    router:stop() -- long batch timeout: stop itself must hand the partial batch over
    local total = 0
    for _, values in ipairs(drain(router, 3)) do total = total + #values end
    assert.equal(120, total)
    local ok, reason = router:route("late", 1)
    assert.is_false(ok)
    assert.equal("stopped", reason)
    local stats = router:stats()
    assert.equal(120, stats.routed)
    assert.equal(120, stats.delivered)
    assert.equal(1, stats.routing_errors)
    router:close()
  end)

  it("stats and queue_depths have their documented shapes", function()
    local router = new_router{lanes = 3}
    for seq = 1, 10 do router:route("k" .. seq, seq) end
    local depths = router:queue_depths()
    assert.equal(10, depths.ingress)
    assert.equal(3, #depths.lanes)
    for lane = 1, 3 do assert.equal(0, depths.lanes[lane]) end
    router:stop()
    depths = router:queue_depths()
    assert.equal(0, depths.ingress)
    assert.equal(10, depths.lanes[1] + depths.lanes[2] + depths.lanes[3])
    drain(router, 3)
    local stats = router:stats()
    for _, field in ipairs{"routed", "dropped", "batches_sent", "queue_full_events", "routing_errors",
                           "delivered", "latency_avg_us", "latency_max_us", "handler_errors"} do
      assert.is_number(stats[field], field)
    end
    assert.equal(10, stats.routed)
    assert.equal(10, stats.delivered)
    assert.is_true(stats.batches_sent >= 1)
    assert.is_true(stats.latency_max_us >= stats.latency_avg_us)
    router:close()
  end)

  it("runs the handler module per batch on each lane, in order, then on_stop", function()
    local lanes = 3
    local files = lane_files(lanes)
    local router = new_router{lanes = lanes, batch_size = 8, batch_timeout_ms = 2,
                              handler = "spec.support.router_lane"}
    assert.is_true(router:start())
    local expected = {}
    for lane = 1, lanes do expected[lane] = {} end
    for seq = 1, 200 do
      local key = "order-" .. (seq % 17)
      assert.is_true(router:route(key, {file = files.prefix, key = key, seq = seq}))
      local lane = router:lane_for(key)
      expected[lane][#expected[lane] + 1] = key .. " " .. seq
    end
    router:stop()
    for lane = 1, lanes do
      local wanted = expected[lane]
      if #wanted > 0 then wanted[#wanted + 1] = "stop" end
      assert.same(wanted, files.lines(lane))
    end
    local stats = router:stats()
    assert.equal(200, stats.delivered)
    assert.equal(0, stats.handler_errors)
    router:close()
    files.cleanup()
  end)

  it("hands each lane its share of a batch at once, however small", function()
    -- An hour-long batch timeout: only a full batch of two moves values here,
    -- and it is split over the two lanes, one value each.
    local files = lane_files(2)
    local router = new_router{lanes = 2, batch_size = 2, batch_timeout_ms = 3600 * 1000,
                              handler = "spec.support.router_lane"}
    local keys = {}
    for i = 1, 1000 do
      local key = "key-" .. i
      keys[router:lane_for(key)] = keys[router:lane_for(key)] or key
      if keys[1] and keys[2] then break end
    end
    assert.is_true(router:start())
    for lane = 1, 2 do
      assert.is_true(router:route(keys[lane], {file = files.prefix, key = keys[lane], seq = lane}))
    end
    local deadline = socket.gettime() + 10
    while (#files.lines(1) == 0 or #files.lines(2) == 0) and socket.gettime() < deadline do socket.sleep(0.005) end
    local before_stop = {files.lines(1), files.lines(2)}
    router:stop()
    for lane = 1, 2 do assert.same({keys[lane] .. " " .. lane}, before_stop[lane]) end
    router:close()
    files.cleanup()
  end)

  it("accepts a handler module that is a plain function(batch, lane)", function()
    local files = lane_files(1)
    local router = new_router{lanes = 1, batch_size = 5, batch_timeout_ms = 1000,
                              handler = "spec.support.router_function"}
    for seq = 1, 12 do assert.is_true(router:route("k", {file = files.prefix})) end
    router:stop() -- never started: stop starts the lanes to deliver
    assert.same({"1 5", "1 5", "1 2"}, files.lines(1))
    router:close()
    files.cleanup()
  end)

  it("logs and counts a handler error, and the lane goes on", function()
    local files = lane_files(1)
    local router = new_router{lanes = 1, batch_size = 1, batch_timeout_ms = 0,
                              handler = "spec.support.router_lane"}
    assert.is_true(router:start())
    router:route("a", {file = files.prefix, key = "a", seq = 1})
    router:route("a", {file = files.prefix, key = "a", seq = 2, raise = true})
    router:route("a", {file = files.prefix, key = "a", seq = 3})
    router:stop()
    assert.same({"a 1", "a 3", "stop"}, files.lines(1))
    assert.equal(1, router:stats().handler_errors)
    router:close()
    files.cleanup()
  end)

  it("drains and counts when the handler module cannot be loaded", function()
    local router = new_router{lanes = 2, batch_size = 4, handler = "spec.support.no_such_router_module"}
    assert.is_true(router:start())
    for seq = 1, 10 do assert.is_true(router:route("k" .. seq, seq)) end
    router:stop()
    local stats = router:stats()
    assert.equal(10, stats.delivered)
    assert.is_true(stats.handler_errors >= 1)
    router:close()
  end)

  it("rejects a second start, and take on a router with a handler", function()
    local router = new_router{lanes = 1, handler = "spec.support.router_lane"}
    assert.is_true(router:start())
    local ok, err = router:start()
    assert.is_nil(ok)
    assert.equal("INVALID_STATE", err.code)
    assert.has_error(function() router:take(1, 1, 0) end)
    router:close()
  end)

  it("raises on wrong option and argument types, and refuses values out of range", function()
    local function refused(options)
      local router, err = commandbus.message_router(options)
      assert.is_nil(router)
      assert.equal("INVALID_ARGUMENT", err.code)
    end
    refused{policy = "fast"}
    assert.has_error(function() commandbus.message_router{policy = 1} end)
    assert.has_error(function() commandbus.message_router{lanes = "two"} end)
    refused{lanes = 0}
    refused{lanes = 1.5}
    refused{batch_size = 10, queue_size = 5}
    assert.has_error(function() commandbus.message_router{handler = true} end)
    refused{policy = "block", block_timeout_ms = -1}
    assert.has_error(function() commandbus.message_router("lanes") end)
    local router = new_router{lanes = 2}
    assert.has_error(function() router:route(1, "v") end)
    assert.has_error(function() router:route("k") end)
    assert.has_error(function() router:route("k", function() end) end)
    assert.has_error(function() router:lane_for(nil) end)
    local values, err = router:take(3, 1, 0)
    assert.is_nil(values)
    assert.equal("INVALID_ARGUMENT", err.code)
    assert.has_error(function() router:take("1", 1, 0) end)
    router:close()
  end)

  it("frees what it still holds when closed or collected, and refuses afterwards", function()
    local router = new_router{lanes = 2, lane_queue_size = 1, batch_size = 1}
    for seq = 1, 20 do router:route("k" .. seq, {seq = seq, pad = ("x"):rep(100)}) end
    router:close() -- lanes of one: most values are dropped by the drain
    local ok, reason = router:route("k", 1)
    assert.is_false(ok)
    assert.equal("closed", reason)
    router:close()
    local files = lane_files(2)
    for _ = 1, 5 do
      local r = new_router{lanes = 2, handler = "spec.support.router_function"}
      r:start()
      r:route("k", {file = files.prefix})
      r = nil -- luacheck: ignore
    end
    collectgarbage()
    collectgarbage()
    files.cleanup()
  end)

  if _VERSION == "Lua 5.4" and not jit then
    it("closes a to-be-closed router at the end of its scope", function()
      local chunk = assert(load([[
        local commandbus = ...
        local router <close> = assert(commandbus.message_router{lanes = 1})
        router:route("k", 1)
        return router
      ]]))
      local router = chunk(commandbus)
      local ok, reason = router:route("k", 2)
      assert.is_false(ok)
      assert.equal("closed", reason)
    end)
  end
end)
