-- The reply router's lanes load this: process type -> definition.
local order = require "examples.saga.order"
return {[order.type] = order}
