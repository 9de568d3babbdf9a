-- bench/nginx's locations: the same send written with commandbus.ngx and
-- with the blocking plain API, and an await (the example app serves
-- POST /orders).
local cbngx = require "commandbus.ngx"
local commandbus = require "commandbus"

local app = {}

local bus, plain

-- The example app's connection parameters: the same shared runtime.
function app.init_worker()
  bus = assert(cbngx.connect(nil, {pool_size = 4, await_thread_pool = "commandbus_await"}))
end

--- POST /send?domain=: one command through commandbus.ngx.
function app.send()
  local res, err = bus:send{domain = ngx.var.arg_domain, type = "Echo", data = {n = 1}}
  if not res then ngx.status = 500 end
  ngx.say(res and res.command_id or tostring(err))
end

--- POST /send_blocking?domain=: the same with the plain API, which holds
-- nginx's event loop until the commit.
function app.send_blocking()
  plain = plain or assert(commandbus.connect(nil, {pool_size = 1, application_name = "bench_nginx_blocking"}))
  local res, err = plain:send{domain = ngx.var.arg_domain, type = "Echo", data = {n = 1}}
  if not res then ngx.status = 500 end
  ngx.say(res and res.command_id or tostring(err))
end

--- GET /await?domain=&id=: the command's status once final.
function app.await()
  local cmd, err = bus:await(ngx.var.arg_domain, ngx.var.arg_id, {timeout = 30})
  ngx.say(cmd and cmd.status or err.code)
end

return app
