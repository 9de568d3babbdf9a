-- No-op command handlers for the bench's saga.
local noop = function() return nil end
return {Reserve = noop, Charge = function() return {amount = 42} end, Ship = noop, Release = noop}
