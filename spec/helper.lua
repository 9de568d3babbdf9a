-- Shared by the specs: a connected bus on the test database, and unique
-- names so that specs never depend on each other's leftovers.
local commandbus = require "commandbus"

local helper = {}

local counter = 0
--- A fresh lower-case name with the given prefix, unique within the run.
function helper.unique(prefix)
  counter = counter + 1
  return string.format("%s_%d_%d", prefix, os.time() % 100000, counter)
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
