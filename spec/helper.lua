-- Shared by the specs: a connected bus on the test database, and unique
-- names so that specs never depend on each other's leftovers.
local commandbus = require "commandbus"

local helper = {}

-- The spec runs of both interpreters go at once (ctest -j): names carry a
-- random token per process so that they never meet.
local token
do
  local f = io.open("/dev/urandom", "rb")
  local bytes = f:read(4)
  f:close()
  token = string.format("%02x%02x%02x%02x", bytes:byte(1, 4))
end

local counter = 0
--- A fresh lower-case name with the given prefix, unique across processes.
function helper.unique(prefix)
  counter = counter + 1
  return string.format("%s_%s_%d", prefix, token, counter)
end

function helper.bus(options)
  local bus, err = commandbus.connect(os.getenv("DATABASE_URL"), options)
  assert(bus, err and tostring(err))
  return bus
end

--- Seconds since an arbitrary origin, sub-millisecond.
--- Wall-clock seconds, sub-millisecond (comparable across processes).
function helper.clock()
  return require("socket").gettime()
end

--- Runs one SQL statement with psql on the test database; its output.
function helper.sql(statement)
  local f = io.popen(("psql -qAt %q -c %q"):format(os.getenv("DATABASE_URL"), statement))
  local out = f:read("*a")
  f:close()
  return out
end

--- Polls `ready()` every 20 ms until it returns true; fails the test if it
-- has not after `seconds` (a safety net for a hang, not a timing check).
function helper.wait_until(ready, seconds)
  local deadline = helper.clock() + seconds
  while not ready() do
    assert(helper.clock() < deadline, "still not ready after " .. seconds .. " s")
    require("socket").sleep(0.02)
  end
end

--- Starts another OS process awaiting a command or process (kind) and
-- returns once it is registered as a waiter. The function returned waits for
-- its answer: the wall-clock time it woke, and the status it saw.
function helper.await_elsewhere(kind, domain, id)
  local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
  local out = os.tmpname()
  os.execute(("%s spec/support/await_elsewhere.lua %s %s %s %s &"):format(lua, kind, domain, id, out))
  for _ = 1, 100 do
    local n = tonumber(helper.sql(("SELECT count(*) FROM commandbus.awaiter WHERE id = '%s'"):format(id)):match("%d+"))
    if n and n > 0 then break end
    os.execute("sleep 0.05")
  end
  return function()
    local line
    for _ = 1, 200 do
      local f = io.open(out)
      line = f and f:read("*a")
      if f then f:close() end
      if line and line ~= "" then break end
      os.execute("sleep 0.05")
    end
    os.remove(out)
    local woke, status = line:match("^(%S+) (%S+)")
    return tonumber(woke), status
  end
end

return helper
