-- The workers' lanes load this: the command handlers of the order saga.
local commandbus = require "commandbus"

return {
  ReserveStock = function(cmd) return {reserved = true} end,
  ChargeCard = function(cmd)
    -- Every tenth order is declined: a business outcome that triggers the
    -- compensation of the reservation.
    if cmd.data.order % 10 == 0 then error(commandbus.business_rule("DECLINED", "card declined")) end
    return {charged = cmd.data.amount}
  end,
  ShipOrder = function(cmd) return {tracking = "TRK-" .. string.format("%d", cmd.data.order)} end,
  ReleaseStock = function(cmd) return {released = true} end,
}
