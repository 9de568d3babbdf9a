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

-- Runs one statement with psql on the server of url (maintenance
-- statements with names this file made); raises with psql's message.
local function psql(url, statement)
  local f = assert(io.popen(("psql -X -v ON_ERROR_STOP=1 -qAt '%s' -c '%s' 2>&1; echo \"exit=$?\"")
                            :format(url, statement)))
  local out = f:read("*a")
  f:close()
  local body, code = out:match("^(.-)exit=(%d+)%s*$")
  if code ~= "0" then error(("psql failed: %s (%s)"):format(body, statement), 2) end
  return body
end

--- A new empty database on the server of DATABASE_URL, for a console that
-- shows only what its spec seeded (the test database holds every spec's
-- queues): returns its URL and a function that drops it.
function console_world.database()
  local main = assert(os.getenv("DATABASE_URL"), "DATABASE_URL is not set")
  local name = require("spec.helper").unique("commandbus_console")
  local url, n = main:gsub("^(%a[%w+.-]*://[^/]*/)[^?]*", "%1" .. name)
  assert(n == 1, "cannot find the database name in DATABASE_URL")
  psql(main, "CREATE DATABASE " .. name)
  return url, function() psql(main, ("DROP DATABASE IF EXISTS %s WITH (FORCE)"):format(name)) end
end

--- Starts nginx with the console's locations (see the top of this file).
-- options: database_url (nginx's DATABASE_URL; else the caller's), workers
-- (2), history (seconds of throughput samples, 120), refresh (the page's
-- seconds between updates, 2).
function console_world.start(options)
  options = options or {}
  return nginx.start{
    env = options.database_url and {DATABASE_URL = options.database_url},
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
