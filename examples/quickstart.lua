-- commandbus quickstart: send a few thousand commands, run a worker whose Lua
-- handlers succeed, fail transiently, fail permanently and break a business
-- rule, then look at the outcome and operate the troubleshooting queue.
--
--   make demo      (or: eval "$(scripts/env lua5.4)"; lua5.4 examples/quickstart.lua)
local commandbus = require "commandbus"

local TOTAL = tonumber(os.getenv("QUICKSTART_COMMANDS")) or 3000
local domain = "payments_demo"

local bus = assert(commandbus.connect())
assert(bus:setup())
print(("commandbus %s: connected, schema version %d"):format(commandbus._VERSION, commandbus.schema_version()))

-- 1. Send the commands as one tracked batch (one transaction, one round trip).
local mix = { {"ok", 0.85}, {"flaky", 0.07}, {"down", 0.03}, {"broken", 0.03}, {"poor", 0.02} }
local commands = {}
for i = 1, TOTAL do
  local r, kind = (i * 7919 % 1000) / 1000, "ok"   -- a fixed, even spread
  local acc = 0
  for _, m in ipairs(mix) do
    acc = acc + m[2]
    if r < acc then kind = m[1]; break end
  end
  commands[i] = {type = "Charge", data = {kind = kind, amount = i % 90 + 10, card = "4111-" .. i},
                 max_attempts = 3, reply_to = domain .. "__replies"}
end
local t0 = os.clock()
assert(bus:queue(domain .. "__replies"):create())
bus:queue(domain .. "__replies"):purge()   -- a clean slate for counting replies
local batch = assert(bus:create_batch{domain = domain, name = "quickstart", commands = commands})
print(("sent %d commands in batch %s"):format(TOTAL, batch.batch_id))

-- 2. Run a worker: lanes load the handler module; the tick draws progress.
local worker = assert(bus:worker{domain = domain, handlers = "examples.quickstart_handlers",
                                 concurrency = 4, poll_interval = 0.1, retry = {backoff = {0.2, 0.5}}})
local function bar(done, total)
  local width = 40
  local filled = math.floor(width * done / total)
  return "[" .. string.rep("#", filled) .. string.rep(".", width - filled) .. "]"
end
local started = os.time()
worker:run{tick_interval = 0.2, tick = function()
  local b = assert(bus:get_batch(domain, batch.batch_id))
  local settled = b.completed_count + b.failed_count + b.canceled_count + b.in_troubleshooting_count
  io.write(("\r%s %d/%d settled"):format(bar(settled, TOTAL), settled, TOTAL))
  io.flush()
  return settled < TOTAL and os.time() - started < 120  -- false stops the worker
end}
print()

-- 3. The outcome.
local b = assert(bus:get_batch(domain, batch.batch_id))
print(("batch %s: %d completed, %d failed (business rule), %d in the troubleshooting queue, %d canceled"):format(
  b.status, b.completed_count, b.failed_count, b.in_troubleshooting_count, b.canceled_count))
local h = worker:health()
print(("worker: %d successes, %d failures, %d stuck, state %s"):format(h.successes, h.failures, h.stuck, h.state))

-- 4. The troubleshooting queue: what an operator sees.
local tsq = bus:tsq()
local waiting = assert(tsq:list{domain = domain, limit = 3})
print(("troubleshooting queue: %d commands; the first %d:"):format(waiting.total, #waiting.items))
for _, item in ipairs(waiting.items) do
  print(("  %s  %s after %d attempt(s): %s: %s"):format(item.command_id, item.type, item.attempts,
    item.last_error_code, item.last_error_msg))
end

-- 5. An operator retries one that failed for a passing reason, and completes
--    one by hand; a worker then finishes the retried command.
for _, item in ipairs(waiting.items) do
  if item.last_error_code == "GATEWAY_DOWN" then
    local msg_id = assert(tsq:retry(domain, item.command_id, {operator = "demo"}))
    print(("retried %s (new message %s); its status is now %s"):format(item.command_id, msg_id,
      assert(bus:get_command(domain, item.command_id)).status))
    break
  end
end
for _, item in ipairs(waiting.items) do
  if item.last_error_code == "BAD_CARD_DATA" then
    assert(tsq:complete(domain, item.command_id, {charged = 0, note = "refunded by hand"}, {operator = "demo"}))
    print(("completed %s by hand: %s"):format(item.command_id, assert(bus:get_command(domain, item.command_id)).status))
    break
  end
end
local audit = assert(bus:audit(domain, waiting.items[1].command_id))
local events = {}
for _, e in ipairs(audit) do events[#events + 1] = e.event_type end
print(("audit trail of %s: %s"):format(waiting.items[1].command_id, table.concat(events, " -> ")))
print(("replies waiting on %s__replies: %d"):format(domain, assert(bus:queue(domain .. "__replies"):metrics()).queue_length))
print(("done in %.1f s of CPU"):format(os.clock() - t0))
bus:close()
