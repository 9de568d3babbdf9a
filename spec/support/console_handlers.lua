-- Handlers of the console specs and screenshots: a charge that fails for
-- good when its data says so, with the error code and message it gives.
local commandbus = require "commandbus"

return {
  Charge = function(cmd)
    if cmd.data.fail then
      error(commandbus.permanent(cmd.data.code or "CARD_DECLINED", cmd.data.message or "the card was declined"))
    end
    return {charged = cmd.data.amount}
  end,
  Ship = function(cmd)
    if cmd.data.work_ms then require("socket").sleep(cmd.data.work_ms / 1000) end
    return {parcel = cmd.data.order}
  end,
}
