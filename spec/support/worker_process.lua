-- A worker in its own OS process, for specs that kill or multiply workers:
--   worker_process.lua <domain> <concurrency> <visibility_timeout> [handlers module]
-- Runs until no command of the domain is PENDING or IN_PROGRESS.
local commandbus = require "commandbus"
local domain, concurrency, vt, module = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4]
local bus = assert(commandbus.connect())
local worker = assert(bus:worker{domain = domain, handlers = module or "spec.support.handlers",
                                 concurrency = concurrency, visibility_timeout = vt,
                                 statement_timeout = vt / 2, poll_interval = 0.1})
local checker = assert(commandbus.connect())
worker:run{tick_interval = 0.1, tick = function()
  return #assert(checker:list_commands{domain = domain, status = "PENDING", limit = 1}) +
         #assert(checker:list_commands{domain = domain, status = "IN_PROGRESS", limit = 1}) > 0
end}
checker:close()
bus:close()
