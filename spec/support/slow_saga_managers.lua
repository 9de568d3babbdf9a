-- The saga managers with a slow update_state (10 ms), so that a spec can kill
-- a router process in the middle of a batch.
local socket = require "socket"
local saga = require "spec.support.saga"
local slow = {}
for k, v in pairs(saga.Order) do slow[k] = v end
local update = saga.Order.update_state
slow.update_state = function(state, step, reply)
  socket.sleep(0.01)
  return update(state, step, reply)
end
return {Order = setmetatable(slow, getmetatable(saga.Order))}
