-- The nginx specs' side of spec/support/ngx_app.lua: nginx started with the
-- application's locations, and calls made through it or with the plain API
-- in the same shape, so that the two compare.
local cjson = require("cjson").new()
local nginx = require "spec.support.nginx"
local app = require "spec.support.ngx_app"
local helper = require "spec.helper"

local ngx_world = {}

local APP = 'require("spec.support.ngx_app")'

local LOCATIONS = ([[
    location = /ping { return 200 "pong\n"; }
    location = /lua_ping { content_by_lua_block { ngx.say("pong") } }
    location = /call { content_by_lua_block { APP.call() } }
    location = /send { content_by_lua_block { APP.send() } }
    location = /await { content_by_lua_block { APP.await() } }
    location = /timer { content_by_lua_block { APP.timer() } }
    location = /start_worker { content_by_lua_block { APP.start_worker() } }
    location = /start_process { content_by_lua_block { APP.start_process() } }
]]):gsub("APP", APP)

--- nginx running the application. options: workers (1), pool_size (2),
-- application_name, worker_domain (a background worker of that domain,
-- started in init_worker_by_lua on nginx worker 0), init (an init_by_lua
-- block's code), server (more locations).
function ngx_world.start(options)
  options = options or {}
  local connect = ("{pool_size = %d, application_name = %q}"):format(options.pool_size or 2,
                                                                     options.application_name or "commandbus")
  local init_worker = ("%s.init_worker(%s)"):format(APP, connect)
  if options.worker_domain then
    init_worker = init_worker .. ([[
      if ngx.worker.id() == 0 then
        local w = assert(%s.bus():worker{domain = %q, handlers = "spec.support.handlers", concurrency = 2,
                                           poll_interval = 0.1, drain_timeout = 10})
        assert(w:start())
      end]]):format(APP, options.worker_domain)
  end
  return nginx.start{
    workers = options.workers or 1,
    http = "lua_shared_dict results 1m;\n"
           .. (options.init and ("init_by_lua_block { " .. options.init .. " }\n") or "")
           .. "init_worker_by_lua_block { " .. init_worker .. " }\n"
           .. "exit_worker_by_lua_block { require('commandbus.ngx').shutdown() }\n",
    server = LOCATIONS .. (options.server or ""),
  }
end

local function encode_args(method, args, queue)
  args = args or {}
  local n = args.n or #args
  local list = {}
  for i = 1, n do list[i] = args[i] == nil and cjson.null or args[i] end
  return {method = method, args = list, n = n, queue = queue}
end

--- A call made in a content handler through commandbus.ngx: {n=,
-- results=, err=} or {raised=} (see app.answer).
function ngx_world.via_nginx(server, method, args, queue)
  local status, body = server:request("POST", "/call", cjson.encode(encode_args(method, args, queue)))
  assert(status == 200, ("POST /call %s: %s %s"):format(method, tostring(status), tostring(body)))
  return cjson.decode(body)
end

--- The same call with the plain API, in the same shape.
function ngx_world.via_plain(bus, method, args, queue)
  local call = cjson.decode(cjson.encode(encode_args(method, args, queue))) -- as nginx received it
  return cjson.decode(app.run(bus, call))
end

--- PostgreSQL sessions of an application_name.
function ngx_world.connections(application_name)
  return tonumber(helper.sql(("SELECT count(*) FROM pg_stat_activity WHERE application_name = '%s'")
                             :format(application_name)):match("%d+"))
end

--- Waits until condition() holds; raises naming `what` after timeout seconds
-- (`what` may be a function, called then, to say what was seen).
function ngx_world.wait_until(what, condition, timeout)
  local deadline = helper.clock() + (timeout or 10)
  while helper.clock() < deadline do
    if condition() then return true end
    nginx.sleep(0.05)
  end
  error("timed out waiting until " .. (type(what) == "function" and what() or what), 2)
end

return ngx_world
