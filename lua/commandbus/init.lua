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
-- @param options {pool_size=2, connect_timeout=5, application_name="commandbus"}
-- @return bus | nil, err (err.code == "CONNECTION" when unreachable)
function M.connect(dsn, options)
  if dsn ~= nil and type(dsn) ~= "string" then
    error("bad argument #1 to 'connect' (string expected, got " .. type(dsn) .. ")", 2)
  end
  return core.connect(dsn, options)
end

--- Sets library-wide defaults: {threads = N}, the number of handler lanes
-- workers and routers start when not told (else COMMANDBUS_SYNC_THREADS,
-- else min(32, cores)).
function M.configure(options)
  if type(options) ~= "table" then
    error("bad argument #1 to 'configure' (table expected, got " .. type(options) .. ")", 2)
  end
  core.configure(options)
end

--- The default number of handler lanes (see configure).
M.default_threads = core.default_threads

--- The newest schema version this build knows.
M.schema_version = core.schema_version

return M
