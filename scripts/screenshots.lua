-- scripts/screenshots does the set-up; this seeds a small shop (payments and
-- shipping with their workers, a nightly batch, order processes of which some
-- were compensated and some wait for an operator), starts its traffic in a
-- second process, and photographs the console while the traffic still flows,
-- so that the throughput charts and figures are those of a live system.
--   luajit scripts/screenshots.lua OUTPUT_FOLDER
--   luajit scripts/screenshots.lua --traffic SECONDS   (the second process)
local commandbus = require "commandbus"
local socket = require "socket"

-- Card failures the payments handler gives, by the data of the command.
local DECLINED = {
  {code = "CARD_DECLINED", message = "the card was declined"},
  {code = "ACCOUNT_CLOSED", message = "the account was closed on 2026-10-02"},
  {code = "FRAUD_SUSPECTED", message = "the issuer asks for a review"},
}

-- Sends orders for `seconds` at a rate that rises and falls; every 53rd
-- charge fails for good, every other order is shipped (which takes time).
local function traffic(bus, seconds)
  local started, order = socket.gettime(), 0
  while socket.gettime() - started < seconds do
    local t = socket.gettime() - started
    for _ = 1, math.floor(8 + 7 * math.sin(t / 5)) do
      order = order + 1
      local failure = order % 53 == 0 and DECLINED[math.floor(order / 53) % #DECLINED + 1] or nil
      assert(bus:send{domain = "payments", type = "Charge",
                      data = {order = order, amount = order % 90 + 10, currency = "EUR", fail = failure ~= nil,
                              code = failure and failure.code, message = failure and failure.message}})
      if order % 2 == 0 then
        assert(bus:send{domain = "shipping", type = "Ship", data = {order = order, work_ms = 120}})
      end
    end
    socket.sleep(0.25)
  end
end

if arg[1] == "--traffic" then
  local bus = assert(commandbus.connect())
  traffic(bus, assert(tonumber(arg[2]), "usage: screenshots.lua --traffic SECONDS"))
  bus:close()
  return
end

local chromium = require "spec.support.chromium"
local console_world = require "spec.support.console_world"
local saga = require "spec.support.saga"

local TRAFFIC_SECONDS = 40 -- photographed after about 30 of them

local out = assert(arg[1], "usage: screenshots.lua OUTPUT_FOLDER")
local bus = assert(commandbus.connect())
assert(bus:setup())
local server = console_world.start{history = 60, refresh = 5}
local browser, workers, sender = nil, {}, nil

-- Orders run as processes: most complete, declined charges are compensated,
-- a broken gateway leaves some waiting for an operator, the last few wait
-- for a worker that is not there yet.
local function orders()
  local order = saga.for_domain("orders")
  for i = 1, 24 do
    local fail = i % 7 == 0 and "charge" or i % 11 == 0 and "charge_tsq" or nil
    assert(order:start(bus, {order = 1000 + i, fail = fail}))
  end
  saga.settle(bus, "orders")
  for i = 25, 27 do assert(order:start(bus, {order = 1000 + i})) end
end

local ok, err = pcall(function()
  orders()
  workers = {
    assert(bus:worker{domain = "payments", handlers = "spec.support.console_handlers", concurrency = 4,
                      poll_interval = 0.2}),
    assert(bus:worker{domain = "shipping", handlers = "spec.support.console_handlers", concurrency = 1,
                      poll_interval = 0.2}),
  }
  for _, w in ipairs(workers) do assert(w:start()) end
  assert(bus:create_batch{domain = "payments", name = "nightly-settlement", commands = (function()
    local list = {}
    for i = 1, 40 do list[i] = {type = "Charge", data = {amount = i, fail = i % 17 == 0}} end
    return list
  end)()})
  local interpreter = arg[-1] or "luajit"
  sender = assert(io.popen(("%q scripts/screenshots.lua --traffic %d"):format(interpreter, TRAFFIC_SECONDS)))
  local started = socket.gettime()
  browser = chromium.start{width = 1280, height = 860}
  local page = browser:page()
  local base = ("http://127.0.0.1:%d/ops/"):format(server.port)
  socket.sleep(math.max(0, started + TRAFFIC_SECONDS - 10 - socket.gettime()))
  page:navigate(base)
  page:wait("document.querySelector('#view[data-view=overview] tr[data-queue=\"shipping__commands\"] polyline')")
  page:screenshot(out .. "/console-overview.png")
  page:navigate(base .. "#/tsq")
  page:wait("document.querySelector('#view[data-view=tsq] tr[data-command]')")
  page:screenshot(out .. "/console-tsq.png")
  page:eval("document.querySelector('tr[data-command] button[data-action=retry]').click()")
  page:wait("document.getElementById('confirm').open")
  page:eval("document.getElementById('operator').value = 'ada'")
  page:eval("document.getElementById('reason').value = 'the gateway answers again (INC-2291)'")
  page:screenshot(out .. "/console-retry.png")
end)
if sender then assert(sender:close(), "the traffic process failed") end
for _, w in ipairs(workers) do w:close() end
if browser then browser:stop() end
server:stop()
bus:close()
assert(ok, err)
print(("wrote %s/console-overview.png, console-tsq.png and console-retry.png"):format(out))
