-- scripts/screenshots does the set-up; this seeds the shop, runs its
-- workers in the background for half a minute of traffic (so that the
-- throughput charts have a shape), then photographs the console.
local chromium = require "spec.support.chromium"
local console_world = require "spec.support.console_world"
local commandbus = require "commandbus"
local socket = require "socket"

local out = assert(arg[1], "usage: screenshots.lua OUTPUT_FOLDER")
local bus = assert(commandbus.connect())
assert(bus:setup())
local server = console_world.start{history = 60, refresh = 5}
local browser

local function shop()
  local workers = {
    assert(bus:worker{domain = "payments", handlers = "spec.support.console_handlers", concurrency = 4,
                      poll_interval = 0.2}),
    assert(bus:worker{domain = "shipping", handlers = "spec.support.console_handlers", concurrency = 1,
                      poll_interval = 0.2}),
  }
  for _, w in ipairs(workers) do assert(w:start()) end
  local declined = {
    {code = "CARD_DECLINED", message = "the card was declined"},
    {code = "ACCOUNT_CLOSED", message = "the account was closed on 2026-10-02"},
    {code = "FRAUD_SUSPECTED", message = "the issuer asks for a review"},
  }
  assert(bus:create_batch{domain = "payments", name = "nightly-settlement", commands = (function()
    local list = {}
    for i = 1, 40 do list[i] = {type = "Charge", data = {amount = i, fail = i % 17 == 0}} end
    return list
  end)()})
  -- Half a minute of traffic that rises and falls; shipping takes its time.
  local started = socket.gettime()
  local order = 0
  while socket.gettime() - started < 30 do
    local t = socket.gettime() - started
    local wave = math.floor(8 + 7 * math.sin(t / 5))
    for _ = 1, wave do
      order = order + 1
      local failure = order % 53 == 0 and declined[math.floor(order / 53) % #declined + 1] or nil
      assert(bus:send{domain = "payments", type = "Charge",
                      data = {order = order, amount = order % 90 + 10, currency = "EUR", fail = failure ~= nil,
                              code = failure and failure.code, message = failure and failure.message}})
      if order % 2 == 0 then
        assert(bus:send{domain = "shipping", type = "Ship", data = {order = order, work_ms = 120}})
      end
    end
    socket.sleep(0.25)
  end
  return workers
end

local ok, err = pcall(function()
  local workers = shop()
  browser = chromium.start{width = 1280, height = 860}
  local page = browser:page()
  local base = ("http://127.0.0.1:%d/ops/"):format(server.port)
  page:navigate(base)
  page:wait("document.querySelector('#view[data-view=overview] tr[data-queue=\"shipping__commands\"]')")
  page:screenshot(out .. "/console-overview.png")
  page:navigate(base .. "#/tsq")
  page:wait("document.querySelector('#view[data-view=tsq] tr[data-command]')")
  page:screenshot(out .. "/console-tsq.png")
  page:eval("document.querySelector('tr[data-command] button[data-action=retry]').click()")
  page:wait("document.getElementById('confirm').open")
  page:eval("document.getElementById('operator').value = 'ada'")
  page:eval("document.getElementById('reason').value = 'the customer updated the card'")
  page:screenshot(out .. "/console-retry.png")
  for _, w in ipairs(workers) do w:close() end
end)
if browser then browser:stop() end
server:stop()
bus:close()
assert(ok, err)
print(("wrote %s/console-overview.png, console-tsq.png and console-retry.png"):format(out))
