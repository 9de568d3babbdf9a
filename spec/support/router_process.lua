-- A reply router in its own OS process: router_process.lua <domain> <managers module>
local commandbus = require "commandbus"
local bus = assert(commandbus.connect())
local router = assert(bus:reply_router{domain = arg[1], managers = arg[2], concurrency = 2, poll_interval = 0.05,
                                       visibility_timeout = 2, statement_timeout = 1})
router:run()
