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

return helper
