-- The worker process of bench/request_path: bench/peers' signal handlers at
-- concurrency 1; prints "ready <pid>" once running, stops on a Stop command.
local commandbus = require "commandbus"

local function own_pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("l"):match("^(%d+)")
  f:close()
  return pid
end

local bus = assert(commandbus.connect())
local worker = assert(bus:worker{domain = arg[1], handlers = "bench.peers.signal_handlers", concurrency = 1})
local ready = false
worker:run{tick_interval = 0.05, tick = function()
  if not ready then
    io.write("ready ", own_pid(), "\n")
    io.flush()
    ready = true
  end
  return true
end}
worker:close()
bus:close()
