-- Define a process (saga) and start it: the process row, its first command
-- and the audit row are written in one transaction.
--   lua5.4 examples/process_start.lua
-- (The reply router that carries processes forward is not built yet.)
local commandbus = require "commandbus"

local bus = assert(commandbus.connect())
assert(bus:setup())
local order = commandbus.process.define{
  type = "Order", domain = "shop_demo",
  first_step = function(state) return "reserve" end,
  build_command = function(step, state)
    return {type = ({reserve = "ReserveStock", charge = "ChargeCard", release = "ReleaseStock"})[step], data = state}
  end,
  update_state = function(state, step, reply) state[step] = reply.result; return state end,
  next_step = function(step, reply, state) if step == "reserve" then return "charge" end end,
  compensation_step = function(step, state) if step == "reserve" then return "release" end end,
}
local id = assert(order:start(bus, {order = 42, items = 3}))
local p = assert(bus:get_process("shop_demo", id))
print(("process %s: %s at step %s"):format(id, p.status, p.current_step))
for _, a in ipairs(assert(bus:process_audit("shop_demo", id))) do
  print(("  step %s sent %s (%s)"):format(a.step_name, a.command_type, a.command_id))
end
bus:close()
