-- A worker in its own OS process for spec/request_spec.lua:
--   request_worker.lua <domain> <count>
-- Prints "ready" once running and runs until <count> commands of the domain
-- are COMPLETED (60 s at most). Its one handler, Registered, completes a
-- command only when the command's caller is registered as its waiter by
-- the time the worker has it (else it sends it to the troubleshooting queue).
local commandbus = require "commandbus"
local helper = require "spec.helper"

local domain, count = arg[1], tonumber(arg[2])
local bus = assert(commandbus.connect())
local worker = assert(bus:worker{domain = domain, concurrency = 1, poll_interval = 0.05, handlers = {
  Registered = function(cmd)
    local waiters = tonumber(helper.sql(("SELECT count(*) FROM commandbus.awaiter WHERE domain = '%s' AND id = '%s'")
                                        :format(domain, cmd.id)):match("%d+"))
    if waiters ~= 1 then error(commandbus.permanent("NOT_REGISTERED", waiters .. " waiters")) end
  end,
}})
local deadline = helper.clock() + 60
local ready = false
worker:run{tick_interval = 0.05, tick = function()
  if not ready then
    io.write("ready\n")
    io.flush()
    ready = true
  end
  return helper.clock() < deadline
     and #assert(bus:list_commands{domain = domain, status = "COMPLETED", limit = count}) < count
end}
worker:close()
bus:close()
