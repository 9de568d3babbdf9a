-- nginx serving the operator console and /metrics, for the console specs and
-- scripts/screenshots: the console with actions (a token) at /ops/, the
-- console at /staff/ behind nginx's auth_basic, acting as the user nginx
-- authenticated, the read-only console of the shipped snippet
-- (lua/commandbus/console/locations.conf) at /commandbus/ and /metrics; two
-- nginx workers, each sampling throughput every second.
local nginx = require "spec.support.nginx"
local socket = require "socket"

local console_world = {}

console_world.TOKEN = "console-spec-token-7f3a9c"
-- A user nginx knows (auth_basic) for the console at /staff/, whose actions
-- are those of the user nginx authenticated; a name that is also markup.
console_world.USER, console_world.PASSWORD = "<script>alert(3)</script>", "staff-secret"

local function users_file()
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(console_world.USER, ":{PLAIN}", console_world.PASSWORD, "\n")
  f:close()
  os.execute(("chmod 644 %q"):format(path))
  return path
end

function console_world.start(options)
  options = options or {}
  return nginx.start{
    workers = options.workers or 2,
    http = "lua_shared_dict commandbus_console 1m;\n"
           .. "init_worker_by_lua_block { assert(require('commandbus.console').init_worker{sample_interval = 1,"
           .. " history = " .. (options.history or 120) .. "}) }\n"
           .. "exit_worker_by_lua_block { require('commandbus.ngx').shutdown() }\n",
    server = ([[
      location /ops/ {
        content_by_lua_block {
          require("commandbus.console").serve{prefix = "/ops/", refresh = %d, actions = {token = %q}}
        }
      }
      location /staff/ {
        auth_basic "commandbus";
        auth_basic_user_file %s;
        content_by_lua_block {
          require("commandbus.console").serve{prefix = "/staff/", actions = {remote_user = true}}
        }
      }
      include %s/lua/commandbus/console/locations.conf;
    ]]):format(options.refresh or 2, console_world.TOKEN, users_file(), nginx.root),
  }
end

--- Runs a plain worker of the console handlers until every command of the
-- domain has left PENDING and IN_PROGRESS.
function console_world.settle(bus, domain)
  local worker = assert(bus:worker{domain = domain, handlers = "spec.support.console_handlers", concurrency = 2,
                                   poll_interval = 0.1, retry = {backoff = {0}}})
  local deadline = socket.gettime() + 30
  assert(worker:run{tick_interval = 0.05, tick = function()
    for _, status in ipairs({"PENDING", "IN_PROGRESS"}) do
      if #assert(bus:list_commands{domain = domain, status = status, limit = 1}) > 0 then
        return socket.gettime() < deadline
      end
    end
    return false
  end})
  worker:close()
end

return console_world
