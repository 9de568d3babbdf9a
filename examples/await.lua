-- Send a command and wait for its outcome while a worker (in this process,
-- on its own lane threads) handles it.
--   eval "$(scripts/env lua5.4)"; lua5.4 examples/await.lua
local commandbus = require "commandbus"

local bus = assert(commandbus.connect())
assert(bus:setup())
local domain = "await_demo"

local sent = assert(bus:send{domain = domain, type = "Charge", data = {kind = "ok", amount = 12}})
print("sent " .. sent.command_id)

-- A second bus runs the worker: one bus per thread of control keeps the
-- example simple (the worker's run() blocks its caller).
local worker_bus = assert(commandbus.connect())
local worker = assert(worker_bus:worker{domain = domain, handlers = "examples.quickstart_handlers",
                                        concurrency = 1, poll_interval = 0.1})
local queue = assert(bus:queue(domain .. "__commands"))
worker:run{tick_interval = 0.05, tick = function()
  return assert(queue:metrics()).queue_length > 0
end}

-- Returns at once here (the command already finished); from another thread
-- or process it would block until the worker recorded the outcome.
local cmd, err = bus:await(domain, sent.command_id, {timeout = 10})
assert(cmd, err and tostring(err))
print(("command %s is %s after %d attempt(s)"):format(cmd.command_id, cmd.status, cmd.attempts))

local missing, why = bus:await(domain, "01234567-89ab-7def-8123-456789abcdef", {timeout = 1})
print(("awaiting an unknown id: %s (%s)"):format(tostring(missing), why.code))
worker_bus:close()
bus:close()
