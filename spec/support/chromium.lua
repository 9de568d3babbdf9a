-- A real browser for the console specs: Debian's chromium, headless, with a
-- new empty profile, driven through the DevTools protocol over its
-- WebSocket (a minimal client on luasocket; no Node, no npm).
--
--   local chromium = require "spec.support.chromium"
--   local browser = chromium.start()
--   local page = browser:page()
--   page:navigate("http://127.0.0.1:8080/commandbus/")
--   page:wait("document.querySelector('[data-view=overview]') !== null")
--   print(page:eval("document.title"))
--   page:screenshot("/tmp/overview.png")
--   browser:stop()
local socket = require "socket"
local cjson = require("cjson").new()

local M = {}

local bxor = (function()
  local ok, bit = pcall(require, "bit") -- LuaJIT
  if ok then return bit.bxor end
  return load("return function(a, b) return a ~ b end")() -- Lua 5.4
end)()

-- The proxy is a closed port: the browser reaches loopback addresses (which
-- chromium never sends through a proxy) and nothing else, as on a machine
-- without a network; a page that fetched anything from elsewhere would fail
-- to load it, and page:errors() would say so.
local CHROMIUM_FLAGS = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run"
                       .. " --proxy-server=http://127.0.0.1:9"
                       .. " --disable-background-networking --disable-component-update --disable-sync"
                       .. " --disable-dev-shm-usage --hide-scrollbars --remote-debugging-address=127.0.0.1"
                       .. " --remote-debugging-port=0 --window-size=%d,%d"

local function shell(command)
  local f = assert(io.popen("(" .. command .. ") 2>&1"))
  local out = f:read("*a")
  f:close()
  return out
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("*a")
  f:close()
  return text
end

-- ---- WebSocket (RFC 6455), client side, text frames ------------------------

local ws_mt = {}
ws_mt.__index = ws_mt

local function ws_connect(port, path, timeout)
  local sock = assert(socket.tcp())
  sock:settimeout(timeout)
  assert(sock:connect("127.0.0.1", port))
  -- The key is a nonce the server echoes hashed; a fixed one is fine for a test client.
  assert(sock:send(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    .. "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
                   :format(path, port)))
  local status = assert(sock:receive("*l"))
  assert(status:match("^HTTP/1%.1 101"), "DevTools refused the WebSocket: " .. status)
  repeat
    local line = assert(sock:receive("*l"))
  until line == ""
  return setmetatable({sock = sock}, ws_mt)
end

local function be_bytes(n, count)
  local bytes = {}
  for i = count, 1, -1 do
    bytes[i] = n % 256
    n = math.floor(n / 256)
  end
  return string.char((table.unpack or unpack)(bytes))
end

-- Sends a frame: fin, the opcode, masked (clients must mask).
function ws_mt:send_frame(opcode, payload)
  local n = #payload
  local head = string.char(0x80 + opcode)
  if n < 126 then
    head = head .. string.char(0x80 + n)
  elseif n < 65536 then
    head = head .. string.char(0x80 + 126) .. be_bytes(n, 2)
  else
    head = head .. string.char(0x80 + 127) .. be_bytes(n, 8)
  end
  local mask = {math.random(0, 255), math.random(0, 255), math.random(0, 255), math.random(0, 255)}
  local out = {}
  for i = 1, n do out[i] = string.char(bxor(payload:byte(i), mask[(i - 1) % 4 + 1])) end
  assert(self.sock:send(head .. string.char(mask[1], mask[2], mask[3], mask[4]) .. table.concat(out)))
end

local function number_of(bytes)
  local n = 0
  for i = 1, #bytes do n = n * 256 + bytes:byte(i) end
  return n
end

-- The next whole text message (pings answered, fragments joined).
function ws_mt:receive()
  local parts = {}
  while true do
    local head = assert(self.sock:receive(2))
    local b1, b2 = head:byte(1, 2)
    local fin, opcode, n = b1 >= 0x80, b1 % 16, b2 % 128
    if n == 126 then n = number_of(assert(self.sock:receive(2)))
    elseif n == 127 then n = number_of(assert(self.sock:receive(8))) end
    local payload = n > 0 and assert(self.sock:receive(n)) or ""
    if opcode == 9 then
      self:send_frame(10, payload)
    elseif opcode == 8 then
      error("DevTools closed the WebSocket")
    elseif opcode == 1 or opcode == 0 then
      parts[#parts + 1] = payload
      if fin then return table.concat(parts) end
    end
  end
end

function ws_mt:close()
  pcall(self.send_frame, self, 8, "")
  self.sock:close()
end

-- ---- the browser -----------------------------------------------------------

local browser_mt = {}
browser_mt.__index = browser_mt

--- Starts chromium headless in a new session (its own process group) with a
-- new profile under a temporary folder. options: width (1280), height (900).
function M.start(options)
  options = options or {}
  local dir = shell("mktemp -d /tmp/commandbus-chromium.XXXXXX"):gsub("%s+$", "")
  local flags = CHROMIUM_FLAGS:format(options.width or 1280, options.height or 900)
  local pid = tonumber(shell(("HOME=%q setsid chromium %s --user-data-dir=%q about:blank >%q 2>&1 & echo $!")
                             :format(dir, flags, dir .. "/profile", dir .. "/chromium.log")):match("%d+"))
  assert(pid, "chromium did not start")
  local browser = setmetatable({dir = dir, pid = pid, next_id = 0, events = {}}, browser_mt)
  -- With port 0, chromium writes the port it chose and the browser's path here.
  local port, path
  for _ = 1, 600 do
    local text = read_file(dir .. "/profile/DevToolsActivePort")
    if text then port, path = text:match("^(%d+)\n(%S+)") end
    if port then break end
    socket.sleep(0.05)
  end
  if not port then
    browser:stop()
    error("chromium did not open its DevTools port:\n" .. (read_file(dir .. "/chromium.log") or ""))
  end
  browser.ws = ws_connect(tonumber(port), path, 60)
  return browser
end

--- Sends a DevTools command (to a page's session when given) and returns its
-- result; events met on the way are kept for events().
function browser_mt:call(method, params, session)
  self.next_id = self.next_id + 1
  local id = self.next_id
  self.ws:send_frame(1, cjson.encode{id = id, method = method, params = params or {},
                                     sessionId = session})
  while true do
    local message = cjson.decode(self.ws:receive())
    if message.id == id then
      if message.error then error(("%s: %s"):format(method, cjson.encode(message.error)), 2) end
      return message.result
    elseif message.method then
      self.events[#self.events + 1] = message
    end
  end
end

--- The events received so far with that method (for a session when given).
function browser_mt:received(method, session)
  local found = {}
  for _, e in ipairs(self.events) do
    if e.method == method and (session == nil or e.sessionId == session) then found[#found + 1] = e end
  end
  return found
end

--- Ends the browser and everything it started (its process group), and
-- deletes its profile.
function browser_mt:stop()
  if self.ws then pcall(self.ws.close, self.ws) end
  shell(("kill -TERM -%d"):format(self.pid))
  for _ = 1, 100 do
    if shell(("kill -0 -%d && echo alive"):format(self.pid)):match("alive") == nil then break end
    socket.sleep(0.05)
  end
  shell(("kill -KILL -%d"):format(self.pid))
  shell(("rm -rf %q"):format(self.dir))
end

-- ---- a page (a tab) ------------------------------------------------------------

local page_mt = {}
page_mt.__index = page_mt

--- A new tab, attached, with the Page, Runtime and Log domains on.
function browser_mt:page()
  local target = self:call("Target.createTarget", {url = "about:blank"})
  local attached = self:call("Target.attachToTarget", {targetId = target.targetId, flatten = true})
  local page = setmetatable({browser = self, session = attached.sessionId}, page_mt)
  page:call("Page.enable")
  page:call("Runtime.enable")
  page:call("Log.enable")
  return page
end

function page_mt:call(method, params)
  return self.browser:call(method, params, self.session)
end

function page_mt:received(method)
  return self.browser:received(method, self.session)
end

--- Evaluates a JavaScript expression in the page (promises awaited) and
-- returns its value; raises what the page threw.
function page_mt:eval(expression)
  local r = self:call("Runtime.evaluate", {expression = expression, returnByValue = true, awaitPromise = true})
  if r.exceptionDetails then
    local d = r.exceptionDetails
    error(("page threw: %s"):format(d.exception and d.exception.description or d.text or cjson.encode(d)), 2)
  end
  local v = r.result.value
  if v == cjson.null then return nil end
  return v
end

--- Waits until the expression is true in the page (up to timeout seconds,
-- 20); raises naming it otherwise.
function page_mt:wait(expression, timeout)
  local deadline = socket.gettime() + (timeout or 20)
  while true do
    local ok, v = pcall(self.eval, self, "!!(" .. expression .. ")")
    if ok and v then return true end
    if socket.gettime() > deadline then
      error(("the page never had %s%s"):format(expression, ok and "" or " (" .. tostring(v) .. ")"), 2)
    end
    socket.sleep(0.05)
  end
end

--- Opens url and waits for its load event (none comes when only the
-- fragment changed: the same document stays).
function page_mt:navigate(url)
  local before = #self:received("Page.loadEventFired")
  local r = self:call("Page.navigate", {url = url})
  if r.errorText then error(("cannot open %s: %s"):format(url, r.errorText), 2) end
  if r.loaderId == nil then return end
  local deadline = socket.gettime() + 30
  while #self:received("Page.loadEventFired") == before do
    assert(socket.gettime() < deadline, "the page did not load: " .. url)
    self:eval("1") -- lets events arrive
    socket.sleep(0.05)
  end
end

--- Writes a PNG of the page's viewport to path.
function page_mt:screenshot(path)
  local shot = self:call("Page.captureScreenshot", {format = "png"})
  local tmp = os.tmpname()
  local f = assert(io.open(tmp, "wb"))
  f:write(shot.data)
  f:close()
  shell(("base64 -d %q > %q"):format(tmp, path))
  os.remove(tmp)
  local png = read_file(path)
  assert(png and png:sub(1, 8) == "\137PNG\r\n\26\n", "no PNG written to " .. path)
  return path
end

--- Messages the page logged as errors or threw (uncaught exceptions, CSP
-- violations, failed loads), as text, except those matching allowed patterns.
function page_mt:errors(allowed)
  local found = {}
  local function add(text)
    for _, pattern in ipairs(allowed or {}) do
      if text:match(pattern) then return end
    end
    found[#found + 1] = text
  end
  for _, e in ipairs(self:received("Runtime.exceptionThrown")) do
    local d = e.params.exceptionDetails
    add("exception: " .. tostring(d.exception and d.exception.description or d.text))
  end
  for _, e in ipairs(self:received("Log.entryAdded")) do
    if e.params.entry.level == "error" then
      add(("log: %s (%s)"):format(tostring(e.params.entry.text), tostring(e.params.entry.url)))
    end
  end
  return found
end

return M
