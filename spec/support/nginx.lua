-- A real nginx for the nginx specs and the nginx benchmark: Debian's nginx
-- with libnginx-mod-http-lua, started on a free loopback port with a
-- generated configuration in a prefix under a temporary folder (never the
-- system's nginx service), loading this build's commandbus for LuaJIT.
--
--   local nginx = require "spec.support.nginx"
--   local server = nginx.start{workers = 1, http = "...", server = "location /t { ... }"}
--   local status, body = server:request("GET", "/t")
--   server:stop()
local socket = require "socket"

local M = {}

local root = os.getenv("COMMANDBUS_ROOT") or (function()
  local here = debug.getinfo(1, "S").source:match("^@(.*)/spec/support/nginx%.lua$")
  return here and (here:sub(1, 1) == "/" and here or os.getenv("PWD") .. "/" .. here) or os.getenv("PWD")
end)()
local build = os.getenv("COMMANDBUS_BUILD") or root .. "/build"
M.root, M.build = root, build

local MODULES = "/usr/lib/nginx/modules"
-- Debian's nginx lives in /usr/sbin, which a user's PATH may lack.
local NGINX = (function()
  local ok = os.execute("test -x /usr/sbin/nginx") -- true in Lua 5.4, 0 in LuaJIT
  return (ok == true or ok == 0) and "/usr/sbin/nginx" or "nginx"
end)()

local function shell(command)
  local f = assert(io.popen(command .. " 2>&1"))
  local out = f:read("*a")
  local ok, _, code = f:close()
  return out, ok == true or code == 0
end

local function sleep(seconds) socket.sleep(seconds) end
M.sleep = sleep

--- A loopback port nobody listens on.
function M.free_port()
  for _ = 1, 50 do
    local s = assert(socket.bind("127.0.0.1", 0))
    local _, port = s:getsockname()
    s:close()
    port = tonumber(port)
    if port and port > 1024 then return port end
  end
  error("no free loopback port")
end

-- The lua_package_path and lua_package_cpath lines that load this build.
function M.package_lines(extra_path)
  return string.format('lua_package_path "%s%s/lua/?.lua;%s/lua/?/init.lua;%s/?.lua;;";\n'
                       .. 'lua_package_cpath "%s/luajit/?.so;;";\n',
                       extra_path and extra_path .. ";" or "", root, root, root, build)
end

--- The directives a generated configuration starts with: Debian's modules,
-- logs and pid file in the prefix, and, as root, workers that run as root
-- (so that they can read the tree wherever it was cloned).
function M.main_lines(workers)
  local lines = {
    "load_module " .. MODULES .. "/ndk_http_module.so;",
    "load_module " .. MODULES .. "/ngx_http_lua_module.so;",
    "worker_processes " .. (workers or 1) .. ";",
    "error_log logs/error.log info;",
    "pid logs/nginx.pid;",
    "env DATABASE_URL;",
    "env COMMANDBUS_LOG;",
  }
  return table.concat(lines, "\n") .. "\n" .. M.run_as_caller()
end

--- As root, a `user root root;` line: nginx's workers would otherwise run as
-- nobody, who may not read the tree where it was cloned. Else "".
function M.run_as_caller()
  return shell("id -u"):match("^0") and "user root root;\n" or ""
end

-- Temporary files of requests stay in the prefix too.
local TEMP_PATHS = [[
client_body_temp_path tmp/body; proxy_temp_path tmp/proxy; fastcgi_temp_path tmp/fastcgi;
uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;
]]
M.TEMP_PATHS = TEMP_PATHS

local server_mt = {}
server_mt.__index = server_mt

--- Generates a configuration and starts nginx. options: workers (1),
-- main (directives of the main context), http (of the http block), server
-- (of the server block: locations), lua_path (extra lua_package_path
-- entries), conf (a whole configuration instead, where %PORT% is replaced),
-- threads (the commandbus thread pool's size, 64), env (variables set in
-- nginx's environment, e.g. {DATABASE_URL = another database's}).
function M.start(options)
  local f = io.open(MODULES .. "/ngx_http_lua_module.so")
  if not f then error("nginx's Lua module is not installed (" .. MODULES .. "): run scripts/deps") end
  f:close()
  local prefix = assert(shell("mktemp -d /tmp/commandbus-nginx.XXXXXX")):gsub("%s+$", "")
  shell(("chmod 755 %q && mkdir -p %q/logs %q/tmp %q/conf"):format(prefix, prefix, prefix, prefix))
  local port = options.port or M.free_port()
  local conf = options.conf
  if conf then
    conf = conf:gsub("%%PORT%%", tostring(port))
  else
    conf = M.main_lines(options.workers) .. (options.main or "")
           .. ("thread_pool commandbus threads=%d;\n"):format(options.threads or 64)
           .. "events { worker_connections 4096; }\n"
           .. "http {\n  access_log off;\n" .. TEMP_PATHS .. M.package_lines(options.lua_path)
           .. "  lua_worker_thread_vm_pool_size 1024;\n" .. (options.http or "")
           .. "\n  server {\n    listen 127.0.0.1:" .. port .. " backlog=1024;\n" .. (options.server or "")
           .. "\n  }\n}\n"
  end
  local f = assert(io.open(prefix .. "/conf/nginx.conf", "w"))
  f:write(conf)
  f:close()
  local server = setmetatable({prefix = prefix, port = port, conf = conf}, server_mt)
  -- Without the caller's LUA_PATH/LUA_CPATH: LuaJIT would take them for the
  -- ";;" (default) part of lua_package_path, and the caller may be Lua 5.4.
  local assignments = {}
  for name, value in pairs(options.env or {}) do
    assert(name:match("^[%a_][%w_]*$"), "bad environment variable name")
    assignments[#assignments + 1] = ("%s='%s'"):format(name, (value:gsub("'", [['\'']])))
  end
  local out, ok = shell(("env -u LUA_PATH -u LUA_CPATH %s %s -p %q -c conf/nginx.conf")
                        :format(table.concat(assignments, " "), NGINX, prefix))
  if not ok then
    error("nginx did not start: " .. out .. "\n" .. server:log())
  end
  server.master = server:read_pid()
  server:wait_ready()
  return server
end

function server_mt:read_pid()
  for _ = 1, 100 do
    local f = io.open(self.prefix .. "/logs/nginx.pid")
    local pid = f and tonumber(f:read("*a"))
    if f then f:close() end
    if pid then return pid end
    sleep(0.02)
  end
  error("nginx wrote no pid file\n" .. self:log())
end

--- Waits until every worker answers (a connection is accepted).
function server_mt:wait_ready()
  for _ = 1, 200 do
    local s = socket.tcp()
    s:settimeout(0.2)
    local ok = s:connect("127.0.0.1", self.port)
    s:close()
    if ok and #self:worker_pids() > 0 then return end
    sleep(0.02)
  end
  error("nginx does not answer on port " .. self.port .. "\n" .. self:log())
end

--- The whole error log.
function server_mt:log()
  local f = io.open(self.prefix .. "/logs/error.log")
  if not f then return "" end
  local text = f:read("*a")
  f:close()
  return text
end

local TROUBLE = {"%[error%]", "%[crit%]", "%[alert%]", "%[emerg%]", "commandbus ERROR", "commandbus WARN"}

local function trouble(line)
  for _, pattern in ipairs(TROUBLE) do
    if line:match(pattern) then return true end
  end
  return false
end

--- Lines of the error log that tell of trouble: nginx's at level error or
-- worse (emerg, alert, crit, error), commandbus's warnings and errors (its
-- log goes to stderr, which nginx sends to the error log); except those
-- matching one of the allowed patterns.
function server_mt:errors(allowed)
  local found = {}
  for line in self:log():gmatch("[^\n]+") do
    if trouble(line) then
      local skip = false
      for _, pattern in ipairs(allowed or {}) do
        if line:match(pattern) then skip = true end
      end
      if not skip then found[#found + 1] = line end
    end
  end
  return found
end

-- The fields of /proc/<pid>/stat after the command name: state, ppid, ...
local function stat(pid)
  local f = io.open(("/proc/%d/stat"):format(pid))
  if not f then return nil end
  local line = f:read("*a") -- nil when the process ended meanwhile
  f:close()
  local state, ppid = (line or ""):match("^%d+ %b() (%a) (%d+)")
  return state, tonumber(ppid)
end

--- Pids of the master's worker processes (its live children), from /proc.
function server_mt:worker_pids()
  local pids = {}
  local ls = assert(io.popen("ls /proc"))
  for name in ls:lines() do
    local pid = tonumber(name)
    if pid then
      local state, ppid = stat(pid)
      if ppid == self.master and state ~= "Z" then pids[#pids + 1] = pid end
    end
  end
  ls:close()
  return pids
end

--- Threads of the master and its workers together, and a line naming each
-- process's count (for a failure message).
function server_mt:threads()
  local n, each = 0, {}
  local pids = self:worker_pids()
  pids[#pids + 1] = self.master
  for _, pid in ipairs(pids) do
    local out = shell(("ls /proc/%d/task 2>/dev/null | wc -l"):format(pid))
    local count = tonumber(out:match("%d+")) or 0
    n = n + count
    each[#each + 1] = ("%d%s: %d"):format(pid, pid == self.master and " (master)" or "", count)
  end
  return n, table.concat(each, ", ")
end

-- Whether pid runs (a zombie, which nobody may reap in a container, does not).
local function alive(pid)
  local state = pid and stat(pid)
  return state ~= nil and state ~= "Z"
end

--- Sends a signal through nginx -s (reload, quit, stop).
function server_mt:signal(name)
  local out, ok = shell(("%s -p %q -c conf/nginx.conf -s %s"):format(NGINX, self.prefix, name))
  assert(ok, "nginx -s " .. name .. ": " .. out)
end

--- Reloads and waits until the workers that were running have exited and
-- new ones answer (or timeout seconds pass). Returns whether they did.
function server_mt:reload(timeout)
  local old = self:worker_pids()
  self:signal("reload")
  local deadline = socket.gettime() + (timeout or 30)
  while socket.gettime() < deadline do
    local left = 0
    for _, pid in ipairs(old) do
      if alive(pid) then left = left + 1 end
    end
    local now = self:worker_pids()
    if left == 0 and #now > 0 then
      self:wait_ready()
      return true
    end
    sleep(0.02)
  end
  return false
end

--- Quits gracefully (or stops at once: how = "stop") and waits until the
-- master has exited; returns whether it did within timeout seconds.
function server_mt:quit(timeout, how)
  if not alive(self.master) then return true end
  self:signal(how or "quit")
  local deadline = socket.gettime() + (timeout or 30)
  while socket.gettime() < deadline do
    if not alive(self.master) then return true end
    sleep(0.02)
  end
  return false
end

--- Ends nginx whatever its state, and deletes the prefix unless keep.
function server_mt:stop(keep)
  if not self:quit(10) then
    shell(("kill -9 %d"):format(self.master))
    for _, pid in ipairs(self:worker_pids()) do shell(("kill -9 %d"):format(pid)) end
  end
  if not keep then shell(("rm -rf %q"):format(self.prefix)) end
end

-- ---- HTTP/1.0 over luasocket: requests that can stay pending ----------------

local pending_mt = {}
pending_mt.__index = pending_mt

--- Sends a request without reading the answer: returns the pending request;
-- pending:finish() reads it (status, body, headers).
function server_mt:open(method, path, body, headers)
  local s = assert(socket.tcp())
  s:settimeout(60)
  assert(s:connect("127.0.0.1", self.port))
  local lines = {("%s %s HTTP/1.0"):format(method, path), "Host: 127.0.0.1"}
  for k, v in pairs(headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  if body then lines[#lines + 1] = "Content-Length: " .. #body end
  assert(s:send(table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")))
  return setmetatable({sock = s}, pending_mt)
end

--- Whether the answer has arrived (without waiting).
function pending_mt:ready()
  local readable = socket.select({self.sock}, nil, 0)
  return #readable > 0
end

function pending_mt:finish(timeout)
  self.sock:settimeout(timeout or 60)
  local data, err, partial = self.sock:receive("*a")
  self.sock:close()
  data = data or partial
  if not data or data == "" then return nil, err end
  local head, body = data:match("^(.-)\r\n\r\n(.*)$")
  local status = tonumber((head or data):match("^HTTP/%d%.%d (%d+)"))
  local headers = {}
  for k, v in (head or ""):gmatch("\r\n([^:]+):%s*([^\r\n]*)") do headers[k:lower()] = v end
  return status, body or "", headers
end

--- One request, answered: status, body, headers.
function server_mt:request(method, path, body, headers)
  return self:open(method, path, body, headers):finish()
end

return M
