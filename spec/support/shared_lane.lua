-- A message router handler for spec/background_spec.lua, run in a lane's own
-- Lua state: takes a handle on the process's shared runtime for the given
-- parameters and sends one command through it.
local core = require "commandbus.core"

return function(batch)
  for _, v in ipairs(batch) do
    local bus = assert(core.shared(v.dsn, {application_name = v.application_name}))
    assert(bus:send{domain = v.domain, type = "Echo"})
    bus:close() -- this handle only
  end
end
