-- The operator console and /metrics (commandbus.console) in a real nginx,
-- the console's page driven in a real browser: Debian's chromium, headless,
-- through the DevTools protocol. Operators click, type and read what the
-- page shows; the database says what their actions did.
local cjson = require("cjson").new()
local commandbus = require "commandbus"
local chromium = require "spec.support.chromium"
local console_world = require "spec.support.console_world"
local nginx = require "spec.support.nginx"
local prometheus = require "spec.support.prometheus"
local saga = require "spec.support.saga"
local world = require "spec.support.world"
local socket = require "socket"

local HOSTILE_DATA = "<script>alert(1)</script>"
local HOSTILE_ERROR = "<img src=x onerror=alert(2)>"

-- A JavaScript string literal of s.
local function js(s) return cjson.encode(s) end

describe("the operator console in nginx", function()
  local bus, server, browser, domain, process_domain, process_id, drop_database
  local hostile, failed = nil, {}

  setup(function()
    -- A database of its own: the console shows every queue of its database,
    -- and the test database holds those of every other spec.
    local url
    url, drop_database = console_world.database()
    bus = assert(commandbus.connect(url))
    assert(bus:setup())
    server = console_world.start{database_url = url}
    domain = world.domain()
    for i = 1, 3 do assert(bus:send{domain = domain, type = "Charge", data = {amount = i}}) end
    for i = 1, 4 do
      failed[i] = assert(bus:send{domain = domain, type = "Charge", data = {fail = true, amount = 10 + i}}).command_id
    end
    hostile = assert(bus:send{domain = domain, type = "Charge",
                              data = {fail = true, note = HOSTILE_DATA, message = HOSTILE_ERROR}}).command_id
    assert(bus:create_batch{domain = domain, name = "nightly", commands = {
      {type = "Charge", data = {amount = 1}}, {type = "Charge", data = {amount = 2}}}})
    console_world.settle(bus, domain)
    process_domain = world.domain() -- no worker: the process waits at its first step
    process_id = assert(saga.for_domain(process_domain):start(bus, {order = 7}))
    browser = chromium.start()
  end)

  teardown(function()
    if browser then browser:stop() end
    if server then server:stop() end
    if bus then bus:close() end
    if drop_database then drop_database() end
  end)

  after_each(function() assert.are.same({}, server:errors()) end)

  local function url(prefix, hash) return ("http://127.0.0.1:%d%s%s"):format(server.port, prefix, hash or "") end

  -- A new tab (its own sessionStorage) showing the console's view at hash.
  local function open(prefix, hash, ready)
    local page = browser:page()
    page:navigate(url(prefix, hash))
    page:wait(ready)
    return page
  end

  local function status_of(id) return assert(bus:get_command(domain, id)).status end

  local function row(id) return ("document.querySelector('tr[data-command=%s]')"):format(js(id)) end

  -- Clicks the action's button in the row of command id and waits for the dialog.
  local function start_action(page, action, id)
    page:eval(("%s.querySelector('button[data-action=%s]').click()"):format(row(id), action))
    page:wait("document.getElementById('confirm').open")
  end

  -- Types text into the field as a person would (focus, then key input).
  local function type_into(page, field, text)
    page:eval(("(() => { const f = document.getElementById(%s); f.focus(); f.select(); })()"):format(js(field)))
    page:call("Input.insertText", {text = text})
  end

  local function no_page_trouble(page)
    assert.are.same({}, page:received("Page.javascriptDialogOpening"))
    assert.are.same({}, page:errors())
  end

  it("lists the queues and domains of the database on its overview", function()
    local queue = domain .. "__commands"
    local page = open("/ops/", "#/", ("document.querySelector('tr[data-queue=%s]')"):format(js(queue)))
    local cells = page:eval(("Array.from(document.querySelector('tr[data-queue=%s]').cells).map(c => c.textContent)")
                            :format(js(queue)))
    local metrics = assert(assert(bus:queue(queue)):metrics())
    assert.are.equal(queue, cells[1])
    assert.are.equal(tostring(metrics.queue_length), cells[2])
    assert.are.equal(tostring(metrics.total_messages), cells[4]) -- messages sent ever
    local domain_row = ("document.querySelector('tr[data-domain=%s]')"):format(js(domain))
    assert.are.equal(tostring(assert(bus:tsq_list{domain = domain}).total),
                     page:eval(domain_row .. ".cells[2].textContent")) -- in the troubleshooting queue
    local completed = #assert(bus:list_commands{domain = domain, status = "COMPLETED"})
    assert.matches("completed " .. completed, page:eval(domain_row .. ".cells[1].textContent"))
    -- Drawn as a small chart, a bar per status.
    local bars = page:eval(domain_row .. ".cells[1].querySelectorAll('svg rect').length")
    local titles = page:eval("Array.from(" .. domain_row .. ".cells[1].querySelectorAll('svg rect title'))"
                             .. ".map(t => t.textContent).sort()")
    assert.are.equal(#titles, bars)
    assert.are.same({"COMPLETED: " .. completed,
                     "IN_TROUBLESHOOTING_QUEUE: " .. assert(bus:tsq_list{domain = domain}).total}, titles)
    -- Everything it loaded came from its own origin (no CDN, no web font),
    -- in a browser that reaches nothing but loopback: it works offline.
    assert.is_true(page:eval("performance.getEntriesByType('resource').length") >= 3) -- CSS, JS, the API
    assert.are.same({}, page:eval("performance.getEntriesByType('resource').map(e => e.name)"
                                  .. ".filter(n => !n.startsWith(location.origin + '/ops/'))"))
    -- It reads again by itself: a queue made now appears without a reload.
    local later = world.domain()
    assert(bus:send{domain = later, type = "Charge"})
    page:wait(("document.querySelector('tr[data-queue=%s]')"):format(js(later .. "__commands")))
    assert.are.equal(1, #page:received("Page.loadEventFired"))
    no_page_trouble(page)
  end)

  it("shows a hostile payload and error as text and runs none of it", function()
    local page = open("/ops/", "#/tsq?domain=" .. domain, row(hostile))
    assert.matches(HOSTILE_DATA, page:eval(row(hostile) .. ".querySelector('.payload').textContent"), 1, true)
    assert.are.equal(HOSTILE_ERROR, page:eval(row(hostile) .. ".querySelector('.error-message').textContent"))
    assert.are.equal(1, page:eval("document.scripts.length"))      -- console.js alone
    assert.are.equal(0, page:eval("document.querySelectorAll('main img, main script').length"))

    start_action(page, "retry", hostile) -- the dialog shows the error and the payload, as text too
    local shown = page:eval("document.getElementById('confirm-body').textContent")
    assert.matches(HOSTILE_DATA, shown, 1, true)
    assert.matches(HOSTILE_ERROR, shown, 1, true)
    assert.are.equal(0, page:eval("document.querySelectorAll('dialog img, dialog script').length"))
    page:eval("document.getElementById('confirm-cancel').click()")
    page:wait("!document.getElementById('confirm').open")
    assert.are.equal("IN_TROUBLESHOOTING_QUEUE", status_of(hostile))

    page:navigate(url("/ops/", ("#/command/%s/%s"):format(domain, hostile)))
    page:wait("document.querySelector('#view[data-view=command] ol.timeline')")
    assert.matches("MOVED_TO_TSQ", page:eval("document.querySelector('ol.timeline').textContent"))
    assert.matches(HOSTILE_ERROR, page:eval("document.querySelector('dl.record').textContent"), 1, true)
    no_page_trouble(page)
  end)

  it("retries a command of the troubleshooting queue from the page: PENDING, audited with the operator", function()
    local id = failed[1]
    local page = open("/ops/", "#/tsq?domain=" .. domain, row(id))
    start_action(page, "retry", id)
    type_into(page, "operator", "Ada Lovelace")
    type_into(page, "reason", "the card was replaced")
    type_into(page, "token", console_world.TOKEN)
    page:eval("document.getElementById('confirm-ok').click()")
    page:wait("!document.getElementById('confirm').open")
    assert.are.equal("PENDING", status_of(id))
    local retries = world.details(bus, domain, id, "OPERATOR_RETRY")
    assert.are.equal(1, #retries)
    assert.are.equal("Ada Lovelace", retries[1].operator)
    assert.are.equal("the card was replaced", retries[1].reason)
    page:wait("!" .. row(id)) -- the page redrew without it
    no_page_trouble(page)
  end)

  it("refuses an action without the token in the page, and nothing changes", function()
    local id = failed[2]
    local page = open("/ops/", "#/tsq?domain=" .. domain, row(id))
    start_action(page, "cancel", id)
    type_into(page, "operator", "mallory")
    page:eval("document.getElementById('confirm-ok').click()")
    page:wait("!document.getElementById('confirm-error').hidden")
    assert.matches("UNAUTHORIZED", page:eval("document.getElementById('confirm-error').textContent"))
    assert.is_true(page:eval("document.getElementById('confirm').open"))
    assert.are.equal("IN_TROUBLESHOOTING_QUEUE", status_of(id))
    assert.are.same({}, world.details(bus, domain, id, "OPERATOR_CANCEL"))
    page:eval("document.getElementById('confirm-cancel').click()")
    assert.are.same({}, page:received("Page.javascriptDialogOpening"))
  end)

  -- The console page's CSRF cookie and token, as a browser gets them.
  local function csrf(prefix)
    local status, body, headers = server:request("GET", prefix)
    assert.are.equal(200, status)
    local cookie = assert((headers["set-cookie"] or ""):match("^(commandbus_csrf=%x+);"))
    local token = assert(body:match('<meta name="commandbus%-csrf" content="(%x+)">'))
    assert.are.equal(cookie:match("=(%x+)$"), token)
    return cookie, token
  end

  it("takes an action only as a POST with the token, the CSRF token and its own origin", function()
    local id = failed[3]
    local cookie, token = csrf("/ops/")
    local body = cjson.encode{domain = domain, command_id = id, reason = "customer withdrew", operator = "grace"}
    local host = "127.0.0.1"
    local good = {Cookie = cookie, ["X-CSRF-Token"] = token, ["X-Commandbus-Token"] = console_world.TOKEN,
                  Origin = "http://" .. host, ["Content-Type"] = "application/json"}
    local function without(name, replacement)
      local h = {}
      for k, v in pairs(good) do h[k] = v end
      h[name] = replacement
      return h
    end
    local refusals = {
      {"POST", without("X-Commandbus-Token"), 401, "UNAUTHORIZED"},
      {"POST", without("X-Commandbus-Token", "wrong-token"), 401, "UNAUTHORIZED"},
      {"POST", without("X-CSRF-Token"), 403, "CSRF"},
      {"POST", without("Cookie"), 403, "CSRF"},
      {"POST", without("X-CSRF-Token", string.rep("0", 32)), 403, "CSRF"},
      {"POST", without("Origin", "http://evil.example"), 403, "FORBIDDEN"},
      {"POST", without("Sec-Fetch-Site", "cross-site"), 403, "FORBIDDEN"},
      {"GET", good, 405, "METHOD_NOT_ALLOWED"},
    }
    for _, r in ipairs(refusals) do
      local status, answer = server:request(r[1], "/ops/api/tsq/cancel", r[1] == "POST" and body or nil, r[2])
      assert.are.equal(r[3], status, answer)
      assert.are.equal(r[4], cjson.decode(answer).error.code)
      assert.are.equal("IN_TROUBLESHOOTING_QUEUE", status_of(id))
    end
    assert.are.same({}, world.details(bus, domain, id, "OPERATOR_CANCEL"))

    local status, answer = server:request("POST", "/ops/api/tsq/cancel", body, good)
    assert.are.equal(200, status, answer)
    assert.are.equal("CANCELED", status_of(id))
    local canceled = world.details(bus, domain, id, "OPERATOR_CANCEL")
    assert.are.equal(1, #canceled)
    assert.are.equal("grace", canceled[1].operator)
    -- Acting on a command no longer in the queue says so.
    status, answer = server:request("POST", "/ops/api/tsq/cancel", body, good)
    assert.are.equal(409, status)
    assert.are.equal("INVALID_STATE", cjson.decode(answer).error.code)
  end)

  it("shows batches with progress bars, processes with their event timeline, workers from their heartbeats", function()
    local page = open("/ops/", "#/batches?domain=" .. domain, "document.querySelector('#view[data-view=batches] tr[data-batch]')")
    local batch = page:eval("document.querySelector('tr[data-batch]').textContent")
    assert.matches("nightly", batch)
    assert.matches("COMPLETED", batch)
    assert.matches("2 / 2 done", batch)
    assert.is_true(page:eval("document.querySelector('tr[data-batch] svg rect') !== null"))

    page:navigate(url("/ops/", "#/processes?domain=" .. process_domain))
    local link = ("document.querySelector('tr[data-process=%s] a')"):format(js(process_id))
    page:wait(link)
    page:eval(link .. ".click()")
    page:wait("document.querySelector('#view[data-view=process] ol.timeline')")
    local events = page:eval("Array.from(document.querySelectorAll('ol.timeline li strong')).map(e => e.textContent)")
    local expected = {}
    for i, e in ipairs(assert(bus:process_events(process_domain, process_id))) do expected[i] = e.event_type end
    assert.are.same(expected, events)
    assert.matches("reserve", page:eval("document.querySelector('#view table').textContent"))

    page:navigate(url("/ops/", "#/workers"))
    page:wait("document.querySelector('#view[data-view=workers] tr[data-runner]')")
    local states = page:eval(("Array.from(document.querySelectorAll('tr[data-runner]'))"
                              .. ".filter(r => r.cells[1].textContent === %s).map(r => r.cells[3].textContent)")
                             :format(js(domain)))
    assert.are.same({"stopped"}, states) -- the worker that settled the domain said goodbye
    no_page_trouble(page)
  end)

  it("acts as the user nginx authenticated (auth_basic), whose name the page shows escaped", function()
    local id = failed[4]
    assert.are.equal(401, (server:request("GET", "/staff/"))) -- nginx refuses before the console runs
    local f = assert(io.popen(("printf %%s %q | base64 -w0"):format(console_world.USER .. ":" .. console_world.PASSWORD)))
    local auth = "Basic " .. f:read("*a")
    f:close()
    local status, page, headers = server:request("GET", "/staff/", nil, {Authorization = auth})
    assert.are.equal(200, status)
    assert.matches('<meta name="commandbus-operator" content="&lt;script&gt;alert(3)&lt;/script&gt;">', page, 1, true)
    assert.is_nil(page:find(console_world.USER, 1, true))
    local cookie = headers["set-cookie"]:match("^(commandbus_csrf=%x+);")
    local token = page:match('<meta name="commandbus%-csrf" content="(%x+)">')
    local body = cjson.encode{domain = domain, command_id = id, operator = "someone else", reason = "refunded by phone",
                              result = {refunded = true, voucher = cjson.null}}
    status = server:request("POST", "/staff/api/tsq/complete", body, {Cookie = cookie, ["X-CSRF-Token"] = token})
    assert.are.equal(401, status) -- without credentials, nginx refuses it
    assert.are.equal("IN_TROUBLESHOOTING_QUEUE", status_of(id))
    local answer
    status, answer = server:request("POST", "/staff/api/tsq/complete", body,
                                    {Cookie = cookie, ["X-CSRF-Token"] = token, Authorization = auth})
    assert.are.equal(200, status, answer)
    assert.are.equal("COMPLETED", status_of(id))
    local completed = world.details(bus, domain, id, "OPERATOR_COMPLETE")
    assert.are.equal(1, #completed)
    assert.are.equal(console_world.USER, completed[1].operator)
    assert.are.equal("refunded by phone", completed[1].reason)
  end)

  it("is read-only where the configuration enables no actions (the shipped snippet)", function()
    local cookie, token = csrf("/commandbus/")
    local status, answer = server:request("POST", "/commandbus/api/tsq/retry",
                                          cjson.encode{domain = domain, command_id = hostile, operator = "eve"},
                                          {Cookie = cookie, ["X-CSRF-Token"] = token,
                                           ["X-Commandbus-Token"] = console_world.TOKEN})
    assert.are.equal(403, status)
    assert.are.equal("READ_ONLY", cjson.decode(answer).error.code)
    assert.are.equal("IN_TROUBLESHOOTING_QUEUE", status_of(hostile))

    local page = open("/commandbus/", "#/tsq?domain=" .. domain, row(hostile))
    assert.is_true(page:eval(row(hostile) .. ".querySelector('button[data-action=retry]').disabled"))
    assert.matches("read%-only", page:eval("document.getElementById('mode').textContent"))
    no_page_trouble(page)
  end)

  it("keeps its pages to themselves: CSP, no framing, an HttpOnly SameSite cookie, reads only by GET", function()
    local _, _, headers = server:request("GET", "/ops/")
    assert.matches("script%-src 'self'", headers["content-security-policy"])
    assert.matches("frame%-ancestors 'none'", headers["content-security-policy"])
    assert.are.equal("nosniff", headers["x-content-type-options"])
    assert.matches("HttpOnly", headers["set-cookie"])
    assert.matches("SameSite=Strict", headers["set-cookie"])
    assert.matches("Path=/ops/", headers["set-cookie"])
    local status = server:request("POST", "/ops/api/overview", "{}")
    assert.are.equal(405, status)
    status = server:request("GET", "/ops/api/nothing")
    assert.are.equal(404, status)
  end)

  it("serves /metrics as Prometheus text whose numbers are the database's, read-only", function()
    local status, text, headers = server:request("GET", "/metrics")
    assert.are.equal(200, status)
    assert.are.equal("text/plain; version=0.0.4; charset=utf-8", headers["content-type"])
    local families = prometheus.parse(text)
    local tsq = assert(bus:tsq_list{domain = domain}).total
    assert.are.equal(tsq, prometheus.value(families, "commandbus_tsq_commands", {domain = domain}))
    local completed = #assert(bus:list_commands{domain = domain, status = "COMPLETED"})
    assert.are.equal(completed, prometheus.value(families, "commandbus_commands", {domain = domain, status = "COMPLETED"}))
    local queue = domain .. "__commands"
    assert.are.equal(assert(assert(bus:queue(queue)):metrics()).queue_length,
                     prometheus.value(families, "commandbus_queue_depth", {queue = queue}))
    for _, method in ipairs({"POST", "PUT", "DELETE"}) do
      assert.are.equal(405, (server:request(method, "/metrics", "")))
    end
  end)

  it("draws throughput from samples of the queue counters", function()
    local quiet = world.domain() -- no worker: what is sent stays
    local queue = quiet .. "__commands"
    assert(bus:send{domain = quiet, type = "Charge"})
    local function history()
      local status, body = server:request("GET", "/ops/api/overview")
      assert.are.equal(200, status)
      local overview = cjson.decode(body)
      assert.is_true(overview.history.available)
      for _, q in ipairs(overview.queues) do
        if q.name == queue then
          local sent, left = 0, 0
          for _, point in ipairs(q.history) do sent, left = sent + point[4], left + point[5] end
          return #q.history, sent, left
        end
      end
      return 0, 0, 0
    end
    local function wait_for(done)
      local deadline = socket.gettime() + 30
      while not done() do
        assert(socket.gettime() < deadline, "the sampler never saw it")
        socket.sleep(0.2)
      end
    end
    wait_for(function() return history() > 0 end) -- sampled twice since the queue was made
    local _, before = history()
    for i = 1, 5 do assert(bus:send{domain = quiet, type = "Charge", data = {amount = i}}) end
    wait_for(function() return select(2, history()) == before + 5 end)
    assert.are.equal(0, select(3, history())) -- nothing left the queue
    -- Two points at least (the 5 came after the first): the page draws them.
    local spark = ("document.querySelector('tr[data-queue=%s] svg polyline')"):format(js(queue))
    local page = open("/ops/", "#/", spark)
    assert.matches("msg/s", page:eval(spark .. ".parentNode.querySelector('title').textContent"))
    no_page_trouble(page)
  end)
end)

describe("commandbus.console's options", function()
  it("are checked at once: a wrong one raises, naming the line of nginx.conf that gave it", function()
    local server = nginx.start{server = [[
      location = /refresh { content_by_lua_block { require("commandbus.console").serve{refresh = "often"} } }
      location = /unknown { content_by_lua_block { require("commandbus.console").serve{colour = "blue"} } }
      location = /range { content_by_lua_block { require("commandbus.console").serve{refresh = 0} } }
      location = /metrics { content_by_lua_block { require("commandbus.console").metrics{all_processes = 1} } }
      location = /sampler { content_by_lua_block { require("commandbus.console").init_worker{history = "1h"} } }
    ]]}
    finally(function() server:stop() end)
    local expected = {
      refresh = "bad option 'refresh' to 'serve': number expected, got string",
      unknown = "bad argument #1 to 'serve' (unknown option 'colour')",
      range = "bad option 'refresh' to 'serve': 1 to 3600 seconds expected, got 0",
      metrics = "bad option 'all_processes' to 'metrics': boolean expected, got number",
      sampler = "bad option 'history' to 'init_worker': number expected, got string",
    }
    for path, message in pairs(expected) do
      assert.are.equal(500, (server:request("GET", "/" .. path)))
      local line
      for _, l in ipairs(server:errors()) do
        if l:find(message, 1, true) then line = l end
      end
      assert.is_not_nil(line, message)
      assert.matches("content_by_lua%(nginx%.conf:%d+%):1: " .. message:gsub("%p", "%%%0"), line)
    end
  end)
end)
