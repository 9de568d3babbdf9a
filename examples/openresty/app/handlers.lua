-- The example's command handlers. They run on the worker's lane threads,
-- each lane with a Lua state of its own: plain LuaJIT, no ngx API.
local commandbus = require "commandbus"

return {
  PlaceOrder = function(cmd)
    local order = cmd.data
    if (order.quantity or 1) > 10 then
      error(commandbus.business_rule("QUANTITY_LIMIT", "at most 10 of an item per order"))
    end
    if order.slow then require("socket").sleep(order.slow) end -- a warehouse taking its time
    return {sku = order.sku, quantity = order.quantity or 1}
  end,
}
