-- The in-process message router: same key, same lane, in order; batches;
-- backpressure; statistics.  lua5.4 examples/message_router.lua
local commandbus = require "commandbus"

local router = assert(commandbus.message_router{lanes = 3, batch_size = 4, batch_timeout_ms = 5,
                                                policy = "block", block_timeout_ms = 1000})
router:start()
for i = 1, 12 do
  local customer = "customer-" .. (i % 4)
  assert(router:route(customer, {customer = customer, n = i}))
end
router:stop() -- delivers everything accepted, then ends the lanes

-- Without a handler module, values are pulled from each lane.
for lane = 1, 3 do
  local seen = {}
  for _, v in ipairs(router:take(lane, 100, 0) or {}) do seen[#seen + 1] = ("%s#%d"):format(v.customer, v.n) end
  print(("lane %d: %s"):format(lane, table.concat(seen, " ")))
end
local stats = router:stats()
print(("routed %d, dropped %d, batches %d"):format(stats.routed, stats.dropped, stats.batches_sent))
print("customer-1 always goes to lane " .. router:lane_for("customer-1"))
router:close()
