-- Handlers for examples/quickstart.lua. Each worker lane loads this module in
-- its own Lua state, so handlers run truly in parallel.
local commandbus = require "commandbus"

local handlers = {}

-- data.kind decides what happens, so the demo can mix outcomes on purpose.
function handlers.Charge(cmd)
  local kind = cmd.data.kind
  if kind == "flaky" and cmd.attempt < 2 then
    -- Worth retrying: the worker backs off and tries again.
    error(commandbus.transient("GATEWAY_TIMEOUT", "the card gateway did not answer"))
  elseif kind == "down" then
    -- Keeps failing: after max_attempts it lands in the troubleshooting queue.
    error(commandbus.transient("GATEWAY_DOWN", "the card gateway is down"))
  elseif kind == "broken" then
    -- Retrying cannot help: straight to the troubleshooting queue.
    error(commandbus.permanent("BAD_CARD_DATA", "card number fails its checksum", {card = cmd.data.card}))
  elseif kind == "poor" then
    -- A business outcome, not a fault: the command ends FAILED.
    error(commandbus.business_rule("INSUFFICIENT_FUNDS", "balance too low", {amount = cmd.data.amount}))
  end
  return {charged = cmd.data.amount, attempt = cmd.attempt}
end

return handlers
