-- A three-step order process with a compensation: reserve stock, charge the
-- card, ship; when charging fails, the reservation is released.
local commandbus = require "commandbus"

local STEP_COMMANDS = {reserve = "ReserveStock", charge = "ChargeCard", ship = "ShipOrder", release = "ReleaseStock"}

return commandbus.process.define{
  type = "Order",
  domain = "saga_demo",
  first_step = function(state) return "reserve" end,
  build_command = function(step, state)
    return {type = STEP_COMMANDS[step], data = {order = state.order, amount = state.amount}}
  end,
  update_state = function(state, step, reply)
    state[step] = reply.result
    return state
  end,
  next_step = function(step, reply, state)
    if step == "reserve" then return "charge" end
    if step == "charge" then return "ship" end
  end,
  compensation_step = function(step, state)
    if step == "reserve" then return "release" end
  end,
}
