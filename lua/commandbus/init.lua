--- commandbus: a durable command bus on PostgreSQL.
--
--   local commandbus = require "commandbus"
--   local bus = assert(commandbus.connect())          -- DATABASE_URL or PG* variables
--   assert(bus:setup())                               -- idempotent migrations
--   local q = bus:queue("jobs")
--   assert(q:create())
--   q:send{hello = "world"}
--   local msgs = q:read{vt = 30, qty = 10}
--
-- Runtime failures return `nil, err` (err.code, err.message, err.sqlstate);
-- wrong argument types raise. See README.md for the whole API.
local core = require "commandbus.core"

local M = {
  _VERSION = core._VERSION,
}

--- Connects to PostgreSQL and starts the bus's loop thread.
-- @param dsn libpq conninfo or URI (optional: DATABASE_URL, then PG* variables)
-- @param options {pool_size=2, connect_timeout=5, application_name="commandbus",
--   notify_after_commit=false}
-- @return bus | nil, err (err.code == "CONNECTION" when unreachable)
function M.connect(dsn, options)
  if dsn ~= nil and type(dsn) ~= "string" then
    error("bad argument #1 to 'connect' (string expected, got " .. type(dsn) .. ")", 2)
  end
  return core.connect(dsn, options)
end

--- Sets library-wide defaults: {threads = N}, the number of handler lanes
-- (1..1024) workers and routers start when not told (else
-- COMMANDBUS_SYNC_THREADS, else min(32, cores)). Returns true | nil, err.
function M.configure(options)
  if type(options) ~= "table" then
    error("bad argument #1 to 'configure' (table expected, got " .. type(options) .. ")", 2)
  end
  return core.configure(options)
end

--- The default number of handler lanes (see configure).
M.default_threads = core.default_threads

-- Handler failures: raise one of these to say what kind of failure it is.
-- Any other error counts as transient.
local handler_error_mt = {
  __tostring = function(e)
    return string.format("%s error %s: %s", e.kind, tostring(e.code), tostring(e.message))
  end,
}

local function handler_error(kind, code, message, details)
  if type(code) ~= "string" then
    error("bad argument #1 to '" .. kind .. "' (string code expected, got " .. type(code) .. ")", 3)
  end
  return setmetatable({kind = kind, code = code, message = message or code, details = details}, handler_error_mt)
end

--- A failure worth retrying (with the worker's backoff) until attempts run out;
-- then the command goes to the troubleshooting queue.
-- Usage: error(commandbus.transient("TIMEOUT", "bank did not answer"))
function M.transient(code, message)
  return handler_error("transient", code, message)
end

--- A failure that retrying cannot fix: the command goes to the
-- troubleshooting queue at once, for an operator.
function M.permanent(code, message, details)
  return handler_error("permanent", code, message, details)
end

--- A business outcome, not a fault: the command ends FAILED, and its reply
-- (when it has reply_to) carries the code, message and details.
function M.business_rule(code, message, details)
  return handler_error("business_rule", code, message, details)
end

-- The troubleshooting queue of a bus: bus:tsq() returns this view.
local tsq_mt = {}
tsq_mt.__index = tsq_mt

--- Commands waiting for an operator: {items = {...}, total = n}; each item has
-- the command's fields, its error, attempts, and its payload and data.
function tsq_mt:list(options)
  return self.bus:tsq_list(options or {})
end

--- Sends the command again (status PENDING, attempts reset) -> new msg_id.
-- options: {operator = "ada", reason = "fixed the data"}, both recorded in
-- the OPERATOR_RETRY audit event (as for cancel and complete).
function tsq_mt:retry(domain, id, options)
  return self.bus:tsq_retry(domain, id, options)
end

--- Cancels it (status CANCELED, reply CANCELED with the reason);
-- options: {operator=}.
function tsq_mt:cancel(domain, id, reason, options)
  return self.bus:tsq_cancel(domain, id, reason, options)
end

--- Completes it by hand (status COMPLETED, reply SUCCESS with result);
-- options: {operator=, reason=}.
function tsq_mt:complete(domain, id, result, options)
  return self.bus:tsq_complete(domain, id, result, options)
end

core.bus_methods.tsq = function(bus)
  return setmetatable({bus = bus}, tsq_mt)
end

--- An in-process router: values go to one of N lanes by a consistent hash of
-- their key (same key, same lane, in order), in bounded queues, in batches.
--   local router = commandbus.message_router{lanes = 4, handler = "my.lane"}
--   router:start(); router:route("customer-42", {amount = 10}); router:stop()
-- Options: lanes (default_threads()), batch_size=100, batch_timeout_ms=10,
-- queue_size=10000, lane_queue_size=5000, policy="drop"|"block",
-- block_timeout_ms=1000, handler="module.name". The handler module is loaded
-- in each lane's own Lua state and returns function(batch, lane) (or
-- {on_batch = fn, on_stop = fn(lane)}); without one, router:take(lane, max,
-- timeout_ms) hands values to the caller. Values must be JSON-encodable.
-- route(key, value) -> true | false, "full"|"timeout"|"stopped"|"closed".
-- Also lane_for(key), stats(), queue_depths(), start(), stop(), close().
M.message_router = core.message_router

--- Long-running processes (sagas): commandbus.process.define{...} returns a
-- manager whose start(bus, state, {batch_id=}) begins one. Processes are read
-- back with bus:get_process(domain, id), bus:list_processes{domain=, type=,
-- status=, limit=, offset=} and bus:process_audit(domain, id).
M.process = require "commandbus.process"

-- Metrics (bus methods, see README "Metrics"): bus:metrics{all_processes=}
-- -> a snapshot table; bus:metrics_text{all_processes=} -> the Prometheus
-- text exposition (format 0.0.4); bus:runners{domain=} -> workers and reply
-- routers of every process from their heartbeats; bus:queue_metrics() ->
-- every queue's metrics.

--- The newest schema version this build knows.
M.schema_version = core.schema_version

return M
