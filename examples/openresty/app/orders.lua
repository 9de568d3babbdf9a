-- The example's HTTP side: orders go over the bus as PlaceOrder commands.
--
--   POST /orders {"sku": "A-1", "quantity": 2}
--     200 {"command": {...}}            the order was placed (the command COMPLETED)
--     422 {"error": "QUANTITY_LIMIT"...} a business rule refused it (FAILED)
--     504 {"command_id": "..."}         no outcome within ?timeout= seconds (default 5)
--     202 {"command_id": "..."}         with ?wait=false: sent, not awaited
--   GET /commands/<id>                  the command (404 when unknown)
local cjson = require("cjson.safe").new()
local cbngx = require "commandbus.ngx"

local DOMAIN = "orders"

local orders = {}

local bus

--- init_worker_by_lua: this nginx worker's bus; the schema; the worker that
-- handles PlaceOrder (on nginx worker 0 only: one is enough here), whose
-- handlers run on its own threads (app/handlers.lua).
function orders.init_worker()
  bus = assert(cbngx.connect(nil, {pool_size = 4, await_thread_pool = "commandbus_await"}))
  assert(bus:setup()) -- blocking here, at startup; idempotent
  assert(require("commandbus.console").init_worker{bus = bus}) -- the console's throughput samples
  if ngx.worker.id() == 0 then
    local worker = assert(bus:worker{domain = DOMAIN, handlers = "app.handlers", concurrency = 2})
    assert(worker:start())
  end
end

--- This nginx worker's bus (for the console's locations).
function orders.bus() return bus end

local function reply(status, body)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.say(cjson.encode(body))
end

function orders.post()
  if ngx.req.get_method() ~= "POST" then return reply(405, {error = "use POST"}) end
  ngx.req.read_body()
  local order = cjson.decode(ngx.req.get_body_data() or "")
  if type(order) ~= "table" or type(order.sku) ~= "string" then
    return reply(400, {error = 'expected a JSON object like {"sku": "A-1", "quantity": 2}'})
  end
  local args = ngx.req.get_uri_args()
  local sent, err = bus:send{domain = DOMAIN, type = "PlaceOrder", data = order}
  if not sent then return reply(500, {error = err.code, message = err.message}) end
  if args.wait == "false" then return reply(202, {command_id = sent.command_id}) end

  local command
  command, err = bus:await(DOMAIN, sent.command_id, {timeout = tonumber(args.timeout) or 5})
  if not command then
    if err.code == "TIMEOUT" then return reply(504, {command_id = sent.command_id, error = err.message}) end
    return reply(500, {command_id = sent.command_id, error = err.code, message = err.message})
  end
  if command.status == "COMPLETED" then return reply(200, {command = command}) end
  if command.status == "FAILED" then
    return reply(422, {command_id = command.command_id, error = command.last_error_code,
                       message = command.last_error_msg})
  end
  return reply(500, {command = command}) -- CANCELED, or waiting for an operator in the troubleshooting queue
end

function orders.get(command_id)
  local command, err = bus:get_command(DOMAIN, command_id)
  if command then return reply(200, command) end
  local status = ({NOT_FOUND = 404, INVALID_ARGUMENT = 400})[err.code] or 500
  return reply(status, {error = err.code, message = err.message})
end

return orders
