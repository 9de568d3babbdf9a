--- commandbus.ngx: the bus inside OpenResty/nginx, without blocking nginx.
--
--   -- nginx.conf (main context):  thread_pool commandbus threads=32;
--   local cbngx = require "commandbus.ngx"
--   local bus = assert(cbngx.connect())          -- DATABASE_URL (declare `env DATABASE_URL;`)
--   local res, err = bus:send{domain = "orders", type = "Place", data = {sku = "A-1"}}
--   local cmd, err = bus:await("orders", res.command_id, {timeout = 5})
--
-- Same methods, arguments, results and `nil, err` as the plain bus
-- (require "commandbus"), for request handlers (rewrite, access, content)
-- and ngx.timer callbacks. Each call yields the request's coroutine; nginx
-- serves other requests meanwhile.
--
-- How: each call runs with ngx.run_worker_thread on a thread of nginx's
-- thread pool, where it uses the blocking API over the process's *shared*
-- runtime (core.shared): the main Lua VM and every worker-thread VM of one
-- nginx worker process hold handles on the same runtime, so an nginx worker
-- has one loop thread and one pool of `pool_size` connections (plus one
-- LISTEN connection) whatever the number of VMs and threads. Arguments and
-- results cross between the VMs as plain values; errors get their metatable
-- back, so tostring(err) and err.code behave as with the plain API.
--
-- Limits (docs/nginx.md says more): a waiting call (await, await_process,
-- await_event, request, read_with_poll) holds a pool thread for as long as it
-- waits, so size the await pool for the waits you expect at once; process event
-- sinks (on_process_event) are not offered; the bus cannot be used in
-- init_by_lua (before nginx forks its workers), nor in phases that cannot
-- yield (set, header/body filter, log). In init_worker_by_lua calls block
-- (startup only).
--
-- Workers and reply routers run inside nginx in the background:
--   init_worker_by_lua:  if ngx.worker.id() == 0 then
--                          assert(bus:worker{domain = "orders", handlers = "app.handlers"}):start()
--                        end
--   exit_worker_by_lua:  require("commandbus.ngx").shutdown()   -- drains them, closes the bus
local core = require "commandbus.core"

local type, error, setmetatable, tostring, pcall, pairs, ipairs = type, error, setmetatable, tostring, pcall, pairs, ipairs
local format = string.format
local loadstring = loadstring or load -- nginx runs LuaJIT; Lua 5.4 may load this module too (the API reference)

local M = {
  _VERSION = core._VERSION,
}

local MODULE = "commandbus.ngx" -- what ngx.run_worker_thread requires in its VMs
local DEFAULT_POOL = "commandbus"

local error_mt = core.error_metatable

local function bus_error(code, message, ...)
  return setmetatable({code = code, message = format(message, ...)}, error_mt)
end

-- ---------------------------------------------------------------------------
-- The worker-thread side: runs in the VMs of nginx's thread pool, which have
-- no request and only a few ngx functions.

local handles = {} -- this VM's handles on shared runtimes, by connection key
local queues = {}  -- queue objects over them, by connection key, then name

local function connection_key(dsn, options)
  return format("%s\31%s\31%s\31%s\31%s", dsn, tostring(options.pool_size), tostring(options.connect_timeout),
                tostring(options.application_name), tostring(options.notify_after_commit))
end

-- This VM's handle for the connection key (made on first use), or nil, err.
local function shared_handle(key, dsn, options)
  local bus = handles[key]
  if bus == nil or bus:is_closed() then
    local err
    bus, err = core.shared(dsn, options)
    if bus == nil then return nil, err end
    handles[key], queues[key] = bus, {}
  end
  return bus
end

local CHUNK = "commandbus.ngx"

local function relay(ok, ...)
  if ok then return true, ... end
  -- A raise (misuse) is re-raised on the nginx side, where the caller's
  -- position is added: this chunk's own is dropped.
  local message = tostring((...))
  return false, message:sub(1, #CHUNK + 1) == CHUNK .. ":" and message:gsub("^[^:]*:%d+: ", "", 1) or message
end

-- One caller per method, calling it as a method (target:name(...)), so that
-- argument errors read as they do with the plain API: "bad argument #1 to
-- 'send' (table expected, got number)".
local callers = setmetatable({}, {__index = function(t, method)
  if type(method) ~= "string" or not method:match("^[%a_][%w_]*$") then
    error("commandbus.ngx: no method " .. tostring(method), 2)
  end
  local f = assert(loadstring(("local relay, pcall, keep = ... return function(target, ...) return relay(pcall("
                               .. "function(...) return keep(target:%s(...)) end, ...)) end"):format(method), "=" .. CHUNK))
  t[method] = f(relay, pcall, function(...) return ... end)
  return t[method]
end})

--- Internal: what ngx.run_worker_thread runs. Calls method on the shared bus
-- (or on its queue queue_name) and returns true and the method's results,
-- or false and the message of what it raised.
function M._thread_call(dsn, options, queue_name, method, ...)
  local key = connection_key(dsn, options)
  local bus, err = shared_handle(key, dsn, options)
  if bus == nil then return true, nil, err end
  local target = bus
  if queue_name then
    target = queues[key][queue_name]
    if target == nil then
      target, err = bus:queue(queue_name)
      if target == nil then return true, nil, err end
      queues[key][queue_name] = target
    end
  end
  return callers[method](target, ...)
end

-- ---------------------------------------------------------------------------
-- The nginx side.

-- Phases whose handlers may yield, so that ngx.run_worker_thread works.
local YIELDING = {rewrite = true, server_rewrite = true, access = true, content = true, timer = true}

local background = {} -- workers and reply routers made here, stopped by shutdown()

local function pool_error(pool, why)
  if why == "thread_pool not found" then
    return bus_error("INVALID_STATE", "commandbus.ngx: nginx has no thread pool `%s`: add `thread_pool %s threads=32;`"
                     .. " to the main context of nginx.conf", pool, pool)
  elseif why == "no available Lua vm" then
    return bus_error("NO_MEMORY", "commandbus.ngx: no Lua VM free for another call in this nginx worker (more calls at"
                     .. " once than lua_worker_thread_vm_pool_size allows)")
  end
  return bus_error("INVALID_STATE", "commandbus.ngx: ngx.run_worker_thread failed: %s", tostring(why))
end

-- The results of a call that crossed from a worker thread.
local function finish(pool, ran, ok, ...)
  if not ran then return nil, pool_error(pool, ok) end
  if not ok then error((...), 2) end -- level 2: the line that called the bus method (the calls between are tail calls)
  local first, err = ...
  if first == nil and type(err) == "table" then setmetatable(err, error_mt) end
  return ...
end

-- lua-nginx-module watches for the worker's shutdown with a placeholder
-- connection (fd -2) that it makes on the worker's first ngx.timer.at, and
-- that nginx closes when the shutdown begins (with the idle connections).
-- One made after that is never closed: the worker then ends with the alerts
-- "open socket #-2 left in connection N" and "aborting". A new worker's first
-- call can come after a reload's signal (a request read just before it), so
-- timers are started here only once one was started before the shutdown
-- began (the placeholder is there, and closed); until then an exiting worker
-- gets none from us, and does without (see below).
local timer_made = false

local function start_timer(f, arg)
  if not timer_made and ngx.worker.exiting() then return nil end
  local ok = ngx.timer.at(0, f, arg)
  if ok then timer_made = true end
  return ok
end

-- nginx ends a worker that is shutting down (reload, quit) once no timer is
-- left, and a request waiting for ngx.run_worker_thread holds none: it would
-- be cut off. While calls are in flight, a timer sleeps in short steps, so
-- that the worker waits for them as it does for any request. When no timer
-- can be started, the call spawns a light thread that sleeps in its stead
-- until the call returns.
local in_flight, keeper_running = 0, false

local function keeper()
  while in_flight > 0 do ngx.sleep(0.05) end
  keeper_running = false
end

local function ended(...)
  in_flight = in_flight - 1
  return ...
end

local function guard()
  while true do ngx.sleep(0.05) end
end

local function guarded_end(guard_thread, called, ...)
  in_flight = in_flight - 1
  ngx.thread.kill(guard_thread)
  if not called then error((...), 0) end
  return ...
end

local function run_in_thread(pool, ...)
  in_flight = in_flight + 1
  if not keeper_running then keeper_running = start_timer(keeper) and true end
  if keeper_running then return ended(ngx.run_worker_thread(pool, MODULE, "_thread_call", ...)) end
  return guarded_end(ngx.thread.spawn(guard), pcall(ngx.run_worker_thread, pool, MODULE, "_thread_call", ...))
end

local function init_phase_error()
  return bus_error("INVALID_STATE", "commandbus.ngx: the bus cannot be used in init_by_lua: nginx forks its workers"
                   .. " after it, and a connection made there would be the master's; connect in init_worker_by_lua"
                   .. " or on first use")
end

local bus_mt = {}
bus_mt.__index = bus_mt

--- This VM's handle on the shared runtime (the blocking plain bus), made on
-- first use. For startup work and for workers and reply routers.
function bus_mt:handle()
  if self.closed then return nil, bus_error("CLOSED", "the bus is closed") end
  local handle = self.local_handle
  if handle == nil or handle:is_closed() then
    local err
    handle, err = core.shared(self.dsn, self.options)
    if handle == nil then return nil, err end
    self.local_handle = handle
  end
  return handle
end

-- Runs method (on the queue queue_name when given) where this phase allows.
local function call(self, waits, queue_name, method, ...)
  if self.closed then return nil, bus_error("CLOSED", "the bus is closed") end
  local phase = ngx.get_phase()
  if YIELDING[phase] then
    local pool = waits and self.await_pool or self.pool
    return finish(pool, run_in_thread(pool, self.dsn, self.options, queue_name, method, ...))
  end
  if phase == "init_worker" then -- startup: nothing to keep waiting yet, so a blocking call is fine
    local target, err = self:handle()
    if target and queue_name then target, err = target:queue(queue_name) end
    if target == nil then return nil, err end
    return target[method](target, ...)
  end
  if phase == "init" then return nil, init_phase_error() end
  return nil, bus_error("INVALID_STATE", "commandbus.ngx: nginx's %s phase cannot wait for the database: call the"
                        .. " bus from rewrite, access or content handlers, or from an ngx.timer callback", phase)
end

local CALLS = {
  "setup", "list_queues", "send", "send_batch", "create_batch", "get_batch", "list_batches", "get_command",
  "list_commands", "audit", "tsq_list", "tsq_retry", "tsq_cancel", "tsq_complete", "process_start", "get_process",
  "list_processes", "process_audit", "process_events", "append_process_event", "purge_processes", "queue_metrics",
  "metrics", "metrics_text", "runners",
}
local WAITS = {"await", "await_process", "await_event", "request"}
local QUEUE_CALLS = {"create", "drop", "send", "send_batch", "read", "pop", "delete", "archive", "set_vt", "metrics",
                     "purge"}
local QUEUE_WAITS = {"read_with_poll"}

for _, name in ipairs(CALLS) do
  bus_mt[name] = function(self, ...) return call(self, false, nil, name, ...) end
end
for _, name in ipairs(WAITS) do
  bus_mt[name] = function(self, ...) return call(self, true, nil, name, ...) end
end

-- ---------------------------------------------------------------------------
-- Sends share transactions. The blocking API commits each send on its own,
-- and a commit waits for the disk. Here at most pool_size send transactions
-- (one per connection) are on their way at a time, per shared runtime and
-- thread pool (bus objects of the same parameters count together); the
-- sends that arrive meanwhile (same domain and delay) wait together and then
-- go as one send_batch: one transaction, one commit to wait for. When calls are few,
-- each send goes at once, alone; under load the batches grow with it.
-- Each caller still gets its own answer, a duplicate id failing only its own
-- send. When the shared transaction is refused (a bad field, an unencodable
-- payload, a database error), nothing of it was written and each send is
-- made alone, so that one bad command never fails the others.

local ANSWER_WAIT_S = 3600 -- a batch always answers; this only bounds a wait that something broke

-- Per connection key and thread pool: {open = {[domain\31delay] = batch},
-- out = transactions on their way, max = pool_size}.
local send_states = {}

local function send_state(key, pool_size)
  local state = send_states[key]
  if state == nil then
    state = {open = {}, out = 0, max = pool_size or 2}
    send_states[key] = state
  end
  return state
end

local flush

-- The error a plain send gives for a duplicate in the batch's result r: the
-- id already sent, or a dedup key another command holds; err.command_id is
-- the command that is there.
local function duplicate_error(r, command, domain)
  local holder = r.duplicate_of or r.command_id
  local err
  if holder ~= r.command_id then
    err = bus_error("DUPLICATE_COMMAND", "dedup key `%s` is held by command %s in domain %s until its window ends",
                    tostring(command.dedup_key):sub(1, 200), holder, domain)
  else
    err = bus_error("DUPLICATE_COMMAND", "command %s already exists in domain %s", r.command_id, domain)
  end
  err.command_id = holder
  return err
end

-- Starts sending a batch (from a timer, in this turn's wake, so that the
-- sends of this turn join it, and no request's fate decides it).
local function schedule(sends, batch)
  batch.scheduled = true
  sends.out = sends.out + 1
  if not start_timer(flush, batch) then flush(false, batch) end -- exiting: no timer to start; send it now
end

-- One command sent alone: its answer, {true, res, err} or {false, message}.
local function send_alone(bus, command)
  local ran, ok, res, err = run_in_thread(bus.pool, bus.dsn, bus.options, nil, "send", command)
  if not ran then return {true, nil, pool_error(bus.pool, ok)} end
  if not ok then return {false, res} end
  if res == nil and type(err) == "table" then setmetatable(err, error_mt) end
  return {true, res, err}
end

-- Sends a batch and wakes its senders; then starts a batch that waited.
function flush(_, batch)
  local bus, commands, answers = batch.bus, batch.commands, batch.answers
  local sends = bus.sends
  if sends.open[batch.key] == batch then sends.open[batch.key] = nil end
  local ran, ok, results, err = run_in_thread(bus.pool, bus.dsn, bus.options, nil, "send_batch",
                                              {domain = batch.domain, delay = batch.delay, commands = commands})
  if ran and ok and results then
    for i, r in ipairs(results) do
      answers[i] = r.duplicate and {true, nil, duplicate_error(r, commands[i], batch.domain)} or {true, r}
    end
  elseif not ran or (ok and (err.code == "CONNECTION" or err.code == "CLOSED")) then
    -- No thread to run it, or the outcome is unknown (a send made again
    -- could be made twice): every sender gets the error.
    local failure = ran and setmetatable(err, error_mt) or pool_error(bus.pool, ok)
    for i = 1, #commands do answers[i] = {true, nil, failure} end
  else
    for i = 1, #commands do answers[i] = send_alone(bus, commands[i]) end
  end
  batch.done = true
  batch.sema:post(#commands)
  sends.out = sends.out - 1
  for _, waiting in pairs(sends.open) do
    if not waiting.scheduled and sends.out < sends.max then schedule(sends, waiting) end
  end
end

function bus_mt:send(command)
  if type(command) ~= "table" then
    error("bad argument #1 to 'send' (table expected, got " .. type(command) .. ")", 2)
  end
  local domain, delay = command.domain, command.delay
  if self.closed or not YIELDING[ngx.get_phase()] or type(domain) ~= "string"
     or (delay ~= nil and type(delay) ~= "number") then
    return call(self, false, nil, "send", command) -- answered (or refused) as a single send
  end
  local sends, key = self.sends, format("%s\31%s", domain, tostring(delay))
  local batch = sends.open[key]
  if batch == nil then
    batch = {bus = self, key = key, domain = domain, delay = delay, commands = {}, answers = {},
             sema = require("ngx.semaphore").new()}
    sends.open[key] = batch
  end
  local i = #batch.commands + 1
  batch.commands[i] = command
  if not batch.scheduled and sends.out < sends.max then schedule(sends, batch) end
  while not batch.done do batch.sema:wait(ANSWER_WAIT_S) end
  local answer = batch.answers[i]
  if not answer[1] then error(answer[2], 2) end
  return answer[2], answer[3]
end

--- The troubleshooting queue view, as bus:tsq() of the plain API.
function bus_mt:tsq()
  require "commandbus" -- defines the view
  return core.bus_methods.tsq(self)
end

local queue_mt = {}
queue_mt.__index = queue_mt
for _, name in ipairs(QUEUE_CALLS) do
  queue_mt[name] = function(self, ...) return call(self.bus, false, self.queue_name, name, ...) end
end
for _, name in ipairs(QUEUE_WAITS) do
  queue_mt[name] = function(self, ...) return call(self.bus, true, self.queue_name, name, ...) end
end
function queue_mt:name() return self.queue_name end

--- bus:queue(name) -> queue | nil, err: a pgmq queue, as the plain API's.
function bus_mt:queue(name)
  if type(name) ~= "string" then
    error("bad argument #1 to 'queue' (string expected, got " .. type(name) .. ")", 2)
  end
  local checked, err = call(self, false, name, "name") -- the name is checked where the queue is made
  if checked == nil then return nil, err end
  return setmetatable({bus = self, queue_name = name}, queue_mt)
end

--- Closes this bus object: later calls return CLOSED. The process's shared
-- runtime stays open for the others (see shutdown).
function bus_mt:close()
  self.closed = true
  if self.local_handle then self.local_handle:close() end
  self.local_handle = nil
end

function bus_mt:is_closed() return self.closed == true end

-- Background runners: made on this VM's handle, started with :start().
local function runner(self, kind, options)
  if type(options) ~= "table" then
    error(format("bad argument #1 to '%s' (table expected, got %s)", kind, type(options)), 3)
  end
  local phase = ngx.get_phase()
  if phase ~= "init_worker" and phase ~= "timer" then
    return nil, bus_error("INVALID_STATE", "commandbus.ngx: make %ss in init_worker_by_lua or an ngx.timer callback"
                          .. " (it takes a few blocking round trips), not in the %s phase", kind, phase)
  end
  local handle, err = self:handle()
  if handle == nil then return nil, err end
  local made
  made, err = handle[kind](handle, options)
  if made == nil then return nil, err end
  background[#background + 1] = made
  return made
end

--- bus:worker{...} -> worker | nil, err: a worker of the plain API over the
-- shared runtime; worker:start() runs it in the background (handlers must be
-- a module name: they run on lane threads, each with its own Lua state and
-- no ngx API). Stopped with a drain by shutdown().
function bus_mt:worker(options) return runner(self, "worker", options) end

--- bus:reply_router{...} -> router | nil, err: likewise for process replies.
function bus_mt:reply_router(options) return runner(self, "reply_router", options) end

function bus_mt.__tostring(self)
  return format("commandbus.ngx bus (%s)", self.closed and "closed" or "open")
end

local CONNECT_OPTIONS = {pool_size = "number", connect_timeout = "number", application_name = "string",
                         notify_after_commit = "boolean", thread_pool = "string", await_thread_pool = "string"}

--- Connects: returns a bus for this nginx worker process.
-- @param dsn libpq conninfo or URI (else DATABASE_URL, which nginx passes on
--   only when nginx.conf says `env DATABASE_URL;`, else PG* variables)
-- @param options pool_size (2), connect_timeout (5 s), application_name
--   ("commandbus"), notify_after_commit (false): as commandbus.connect;
--   thread_pool ("commandbus"): the
--   nginx thread pool calls run on; await_thread_pool (thread_pool): the one
--   waiting calls run on.
-- @return bus | nil, err. In init_worker_by_lua it connects at once (and
--   reports an unreachable database); elsewhere on first use, in a pool
--   thread. In init_by_lua it returns INVALID_STATE.
function M.connect(dsn, options)
  if dsn ~= nil and type(dsn) ~= "string" then
    error("bad argument #1 to 'connect' (string expected, got " .. type(dsn) .. ")", 2)
  end
  if options ~= nil and type(options) ~= "table" then
    error("bad argument #2 to 'connect' (table expected, got " .. type(options) .. ")", 2)
  end
  local copy = {}
  for k, v in pairs(options or {}) do
    local want = CONNECT_OPTIONS[k]
    if want == nil then error(format("bad argument #2 to 'connect' (unknown option '%s')", tostring(k)), 2) end
    if type(v) ~= want then
      error(format("bad argument #2 to 'connect' (option '%s': %s expected, got %s)", k, want, type(v)), 2)
    end
    copy[k] = v
  end
  local phase = ngx.get_phase()
  if phase == "init" then return nil, init_phase_error() end
  local pool = copy.thread_pool or DEFAULT_POOL
  local bus = setmetatable({
    dsn = dsn or os.getenv("DATABASE_URL") or "",
    options = {pool_size = copy.pool_size, connect_timeout = copy.connect_timeout,
               application_name = copy.application_name, notify_after_commit = copy.notify_after_commit},
    pool = pool,
    await_pool = copy.await_thread_pool or pool,
  }, bus_mt)
  bus.sends = send_state(connection_key(bus.dsn, bus.options) .. "\31" .. pool, copy.pool_size)
  if phase == "init_worker" then
    local handle, err = bus:handle()
    if handle == nil then return nil, err end
  end
  return bus
end

--- For exit_worker_by_lua: stops the workers and reply routers made here,
-- each draining what it took (up to its drain_timeout), joins their threads,
-- then closes the shared runtimes of this nginx worker process (joining
-- their loop threads, closing every connection). Returns how many runtimes
-- it closed.
function M.shutdown()
  for _, made in ipairs(background) do made:stop() end -- all drains at once
  for _, made in ipairs(background) do made:close() end
  background = {}
  return core.close_shared()
end

return M
