-- The nginx specs' application: content handlers that call commandbus.ngx
-- and answer in JSON, so that the spec can compare with the plain API.
local cjson = require("cjson").new()
local cbngx = require "commandbus.ngx"

local app = {}

local bus -- this nginx worker's bus, connected in init_worker

local unpack = unpack or table.unpack

local function pack(...) return {n = select("#", ...), ...} end

function app.bus() return bus end

function app.init_worker(options)
  local err
  bus, err = cbngx.connect(nil, options)
  if not bus then ngx.log(ngx.ERR, "cannot connect: ", tostring(err)) end
end

local function describe_error(err)
  if type(err) ~= "table" then return err end
  return {code = err.code, message = err.message, sqlstate = err.sqlstate, command_id = err.command_id, text = tostring(err),
          has_metatable = getmetatable(err) ~= nil}
end

--- What a call returned, from pack(pcall(...)), as JSON text:
-- {n=, results={... JSON null for nil}, err=} or {raised=message}. The
-- specs shape the plain API's answers with it too.
function app.answer(packed)
  if not packed[1] then return cjson.encode{raised = tostring(packed[2])} end
  local out = {n = packed.n - 1, results = {}}
  for i = 2, packed.n do out.results[i - 1] = packed[i] == nil and cjson.null or packed[i] end
  if packed[2] == nil then out.err = describe_error(packed[3]) end
  return cjson.encode(out)
end

--- Runs {method=, args={...} (JSON null for nil), n=#args, queue=} on
-- target (a bus, plain or not); app.answer's JSON.
function app.run(target, call)
  if call.queue then
    local q, err = target:queue(call.queue)
    if not q then return app.answer(pack(true, nil, err)) end
    target = q
  end
  local args, n = call.args or {}, call.n or #(call.args or {})
  for i = 1, n do
    if args[i] == cjson.null then args[i] = nil end
  end
  local method = call.method
  return app.answer(pack(pcall(function() return target[method](target, unpack(args, 1, n)) end)))
end

--- POST /call: one call, described in the request body.
function app.call()
  ngx.req.read_body()
  ngx.say(app.run(bus, cjson.decode(ngx.req.get_body_data())))
end

--- GET /await?domain=&id=&timeout=: the awaited command's status, or the error code.
function app.await()
  local a = ngx.req.get_uri_args()
  local cmd, err = bus:await(a.domain, a.id, {timeout = tonumber(a.timeout) or 30})
  ngx.say(cmd and cmd.status or err.code)
end

--- POST /send?domain=: sends one command of type Echo.
function app.send()
  local a = ngx.req.get_uri_args()
  local res, err = bus:send{domain = a.domain, type = a.type or "Echo", data = {n = tonumber(a.n) or 0}}
  if not res then
    ngx.status = 500
    ngx.say(tostring(err))
    return
  end
  ngx.say(res.command_id)
end

-- Answers what a timer left in the shared dict under key (waiting up to 5 s).
local function say_result(key)
  for _ = 1, 500 do
    local v = ngx.shared.results:get(key)
    if v then return ngx.say(v) end
    ngx.sleep(0.01)
  end
  ngx.say("timeout")
end

--- GET /timer?domain=: sends from an ngx.timer callback; the answer is the
-- command id the timer got (through a shared dict).
function app.timer()
  local a = ngx.req.get_uri_args()
  local key = "timer:" .. ngx.now() .. ":" .. math.random()
  local ok, err = ngx.timer.at(0, function(premature)
    if premature then return end
    local res, send_err = bus:send{domain = a.domain, type = "Echo", data = {from = "timer"}}
    local got = res and bus:get_command(a.domain, res.command_id)
    ngx.shared.results:set(key, got and got.command_id or tostring(send_err))
  end)
  if not ok then return ngx.say("no timer: ", err) end
  say_result(key)
end

--- GET /start_worker?domain=: starts a worker of domain in this nginx
-- worker, in the background, from a timer.
function app.start_worker()
  local a = ngx.req.get_uri_args()
  local key = "worker:" .. a.domain
  ngx.timer.at(0, function()
    local w, err = bus:worker{domain = a.domain, handlers = a.handlers or "spec.support.handlers",
                             concurrency = tonumber(a.concurrency) or 2, poll_interval = 0.1, drain_timeout = 10}
    if w then w, err = w:start() end
    ngx.shared.results:set(key, w and "started" or tostring(err))
  end)
  say_result(key)
end

--- GET /start_process?domain=: starts an order process (spec/support/saga),
-- its hooks running here, in the request's VM; answers its id.
function app.start_process()
  local a = ngx.req.get_uri_args()
  local order = require("spec.support.saga").for_domain(a.domain)
  local id, err = order:start(bus, {order = tonumber(a.order) or 1})
  ngx.say(id or tostring(err))
end

return app
