-- examples/openresty end to end: its nginx.conf (on a free port, logs in a
-- temporary prefix) and its app, with the worker running inside nginx.
local cjson = require("cjson").new()
local nginx = require "spec.support.nginx"
local world = require "spec.support.world"

describe("examples/openresty", function()
  local server, bus

  setup(function()
    bus = world.bus()
    local dir = nginx.root .. "/examples/openresty"
    local conf = assert(io.open(dir .. "/nginx.conf")):read("*a")
    conf = conf:gsub("listen 127%.0%.0%.1:8080;", "listen 127.0.0.1:%%PORT%%;")
               :gsub("%$prefix/", dir .. "/")
               :gsub('lua_package_cpath "[^"]*"', ('lua_package_cpath "%s/luajit/?.so;;"'):format(nginx.build))
    server = nginx.start{conf = nginx.run_as_caller() .. conf}
  end)

  teardown(function()
    server:stop()
    bus:close()
  end)

  local function post(body, query)
    local status, answer = server:request("POST", "/orders" .. (query or ""), body)
    return status, cjson.decode(answer)
  end

  it("places an order and answers 200 with the completed command", function()
    local status, answer = post('{"sku": "A-1", "quantity": 2}')
    assert.are.equal(200, status)
    assert.are.equal("COMPLETED", answer.command.status)
    assert.are.equal("PlaceOrder", answer.command.type)
    local got_status, got = server:request("GET", "/commands/" .. answer.command.command_id)
    assert.are.equal(200, got_status)
    assert.are.same(answer.command, cjson.decode(got))
  end)

  it("answers 422 when a business rule refuses the order", function()
    local status, answer = post('{"sku": "A-1", "quantity": 11}')
    assert.are.equal(422, status)
    assert.are.equal("QUANTITY_LIMIT", answer.error)
    assert.are.equal("FAILED", assert(bus:get_command("orders", answer.command_id)).status)
  end)

  it("answers 504 when no outcome comes in time, and the order completes later", function()
    local status, answer = post('{"sku": "A-1", "slow": 1}', "?timeout=0.2")
    assert.are.equal(504, status)
    local cmd = assert(bus:await("orders", answer.command_id, {timeout = 10}))
    assert.are.equal("COMPLETED", cmd.status)
  end)

  it("answers 202 with the command id when asked not to wait", function()
    local status, answer = post('{"sku": "A-1"}', "?wait=false")
    assert.are.equal(202, status)
    assert.are.equal("COMPLETED", assert(bus:await("orders", answer.command_id, {timeout = 10})).status)
  end)

  it("serves the operator console, read-only, and /metrics", function()
    local status, page = server:request("GET", "/commandbus/")
    assert.are.equal(200, status)
    assert.matches('<meta name="commandbus-actions" content="off">', page, 1, true)
    local text
    status, text = server:request("GET", "/metrics")
    assert.are.equal(200, status)
    assert.matches('commandbus_queue_depth{queue="orders__commands"}', text, 1, true)
  end)

  it("answers 404 for an unknown command and 400 for a malformed id or order", function()
    assert.are.equal(404, (server:request("GET", "/commands/01900000-0000-7000-8000-000000000000")))
    assert.are.equal(400, (server:request("GET", "/commands/not-a-uuid")))
    assert.are.equal(400, (post('["no"]')))
  end)

  it("logs no trouble", function()
    assert.are.same({}, server:errors())
  end)
end)
