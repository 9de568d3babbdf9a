--- commandbus.console: the operator console and the Prometheus /metrics
-- endpoint, served by nginx through commandbus.ngx.
--
--   http {
--       lua_shared_dict commandbus_console 1m;            # throughput history (optional)
--       init_worker_by_lua_block { require("commandbus.console").init_worker() }
--       server {
--           location /commandbus/ { content_by_lua_block { require("commandbus.console").serve() } }
--           location = /metrics  { content_by_lua_block { require("commandbus.console").metrics() } }
--       }
--   }
--
-- The console is one HTML page with its CSS and JavaScript (files in
-- console/ beside this module, no build step, nothing fetched from
-- elsewhere) and a small JSON API under the same prefix that the page reads
-- every few seconds. It is read-only unless serve{actions = {...}} enables
-- the troubleshooting queue's retry, cancel and complete, each of which
-- then needs the configured token (or a user nginx authenticated) and a
-- CSRF token, only as a POST from the console's own origin.
--
-- Throughput history: init_worker() starts a timer in every nginx worker;
-- every sample_interval seconds one of them (the first to claim the slot in
-- the shared dict) reads every queue's depth and message counter
-- (bus:queue_metrics(), two cheap round trips whatever the traffic) and
-- keeps the sample for `history` seconds. Messages in per second is the
-- counter's rise, messages out the rise less the depth's. Counting rows
-- changed per minute in the database instead would cost in proportion to
-- the traffic, on every refresh of every open console.
local M = {
  _VERSION = require("commandbus.core")._VERSION,
}

local type, tostring, tonumber, pairs, ipairs, error, pcall = type, tostring, tonumber, pairs, ipairs, error, pcall
local format, floor = string.format, math.floor

local cjson = require("cjson").new()

local DEFAULT_PREFIX = "/commandbus/"
local DEFAULT_DICT = "commandbus_console"
local CSRF_COOKIE = "commandbus_csrf"
local MAX_BODY = 65536
local MAX_LIST = 500

-- ---------------------------------------------------------------------------
-- Options

local function bad_option(fname, name, want, got)
  error(format("bad option '%s' to '%s': %s expected, got %s", name, fname, want, got), 4) -- the caller's caller's caller
end

-- Checks options against spec {name = "type"}; returns a copy.
local function check_options(fname, options, spec)
  if options == nil then return {} end
  if type(options) ~= "table" then
    error(format("bad argument #1 to '%s' (table expected, got %s)", fname, type(options)), 3)
  end
  local copy = {}
  for k, v in pairs(options) do
    local want = spec[k]
    if want == nil then error(format("bad argument #1 to '%s' (unknown option '%s')", fname, tostring(k)), 3) end
    if type(v) ~= want and not (want == "table" and k == "actions" and v == false) then
      bad_option(fname, k, want, type(v))
    end
    copy[k] = v
  end
  return copy
end

-- This VM's default bus (DATABASE_URL), made on first use.
local default_bus
local function bus_of(options)
  if options.bus then return options.bus end
  if default_bus == nil then default_bus = assert(require("commandbus.ngx").connect()) end
  return default_bus
end

-- ---------------------------------------------------------------------------
-- Responses

local SECURITY_HEADERS = {
  -- Only this prefix's own files run; inline script and style never do, so
  -- text that slipped into the page could not run even if it were markup.
  ["Content-Security-Policy"] = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
                                .. " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
  ["X-Content-Type-Options"] = "nosniff",
  ["X-Frame-Options"] = "DENY",
  ["Referrer-Policy"] = "no-referrer",
}

local function send(status, content_type, body, cache)
  ngx.status = status
  ngx.header["Content-Type"] = content_type
  ngx.header["Cache-Control"] = cache or "no-store"
  for k, v in pairs(SECURITY_HEADERS) do ngx.header[k] = v end
  if ngx.req.get_method() ~= "HEAD" then ngx.print(body) end
  return ngx.exit(status)
end

local function send_json(status, value)
  return send(status, "application/json; charset=utf-8", cjson.encode(value))
end

local function refuse(status, code, message, ...)
  return send_json(status, {error = {code = code, message = format(message, ...)}})
end

-- HTTP status for a bus error code.
local STATUS_OF = {INVALID_ARGUMENT = 400, NOT_FOUND = 404, INVALID_STATE = 409, DUPLICATE_COMMAND = 409,
                   TIMEOUT = 504}

local function bus_failure(err)
  local code = type(err) == "table" and err.code or "ERROR"
  local status = STATUS_OF[code] or 503
  if status == 503 then ngx.log(ngx.ERR, "commandbus console: ", tostring(err)) end
  return send_json(status, {error = {code = code, message = type(err) == "table" and err.message or tostring(err)}})
end

-- The text with the characters that mean something in HTML replaced by
-- character references (for text and for quoted attribute values).
local HTML_ESCAPES = {["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;"}
local function html_escape(text)
  return (tostring(text):gsub("[&<>\"']", HTML_ESCAPES))
end

-- ---------------------------------------------------------------------------
-- The shipped files (console/ beside this module), read once per VM.

local files = {}

local function asset_dir()
  local path = package.searchpath("commandbus.console", package.path)
  if path == nil then return nil end
  return path:gsub("%.lua$", "") .. "/"
end

local function read_asset(name)
  local text = files[name]
  if text then return text end
  local dir = asset_dir()
  local f = dir and io.open(dir .. name, "rb")
  if not f then return nil, format("commandbus console: cannot read %s%s", dir or "?/", name) end
  text = f:read("*a")
  f:close()
  files[name] = text
  return text
end

local ASSETS = {["console.js"] = "application/javascript; charset=utf-8", ["console.css"] = "text/css; charset=utf-8"}

-- ---------------------------------------------------------------------------
-- Request helpers

local function random_hex(bytes)
  local f = assert(io.open("/dev/urandom", "rb"))
  local raw = f:read(bytes)
  f:close()
  return (raw:gsub(".", function(c) return format("%02x", c:byte()) end))
end

-- Compares two secrets by their HMACs under a key of this VM, so that the
-- time taken says nothing about how much of a guess was right.
local compare_key
local function same_secret(a, b)
  if type(a) ~= "string" or type(b) ~= "string" or a == "" then return false end
  compare_key = compare_key or random_hex(32)
  return ngx.hmac_sha1(compare_key, a) == ngx.hmac_sha1(compare_key, b)
end

local function first(v)
  if type(v) == "table" then return v[1] end
  return v
end

local function query()
  local args = ngx.req.get_uri_args(32)
  local out = {}
  for k, v in pairs(args) do
    v = first(v)
    if type(v) == "string" and v ~= "" then out[k] = v end
  end
  return out
end

local function query_integer(q, name, default, max)
  local v = q[name]
  if v == nil then return default end
  local n = v:match("^%d+$") and tonumber(v)
  if not n or n > max then return nil, format("`%s` must be a whole number from 0 to %d", name, max) end
  return n
end

local function csrf_cookie()
  local v = ngx.var["cookie_" .. CSRF_COOKIE]
  if type(v) == "string" and v:match("^%x+$") and #v == 32 then return v end
  return nil
end

-- ---------------------------------------------------------------------------
-- Actions: who may, from where

-- The action settings in effect: {mode = "token"|"remote_user", token=} or
-- {mode = "off", why=}.
local function action_settings(actions)
  if not actions then return {mode = "off", why = "actions are not enabled in the nginx configuration"} end
  if actions.remote_user then return {mode = "remote_user", token = actions.token} end
  if type(actions.token) == "string" and actions.token ~= "" then return {mode = "token", token = actions.token} end
  return {mode = "off", why = "actions are enabled without a token (actions.token is empty) or remote_user"}
end

-- Whether the request comes from a page of this server: browsers send
-- Origin with every POST (and Sec-Fetch-Site); the host must be the one the
-- request was sent to. Clients that are not browsers send neither, and are
-- not what CSRF is about; they still need the CSRF pair and the token.
local function same_origin()
  local site = ngx.var.http_sec_fetch_site
  if site ~= nil and site ~= "same-origin" then return false end
  local origin = ngx.var.http_origin
  if origin == nil then return true end
  local host = origin:match("^https?://([^/]+)$")
  return host ~= nil and host:lower() == (ngx.var.http_host or ""):lower()
end

local ACTIONS = {retry = true, cancel = true, complete = true}

-- A copy of decoded JSON without its nulls (cjson.null cannot cross to the
-- thread the call runs on): dropped from objects; in a list, an error.
local function without_nulls(value)
  if type(value) ~= "table" then return value end
  local n, copy = #value, {}
  for k, v in pairs(value) do
    if v == cjson.null then
      if type(k) == "number" and k >= 1 and k <= n then return nil, "may not hold null in a list" end
    else
      local err
      copy[k], err = without_nulls(v)
      if err then return nil, err end
    end
  end
  return copy
end

local function text_field(body, name, max, required)
  local v = body[name]
  if v == nil or v == cjson.null or v == "" then
    if required then return nil, format("`%s` is required", name) end
    return nil
  end
  if type(v) ~= "string" then return nil, format("`%s` must be a string", name) end
  if #v > max then return nil, format("`%s` is longer than %d bytes", name, max) end
  return v
end

local function run_action(bus, settings, kind)
  if settings.mode == "off" then
    return refuse(403, "READ_ONLY", "this console is read-only: %s", settings.why)
  end
  if not same_origin() then
    return refuse(403, "FORBIDDEN", "the request does not come from this console's origin")
  end
  local cookie = csrf_cookie()
  if not cookie or not same_secret(ngx.var.http_x_csrf_token, cookie) then
    return refuse(403, "CSRF", "missing or wrong CSRF token: reload the console")
  end
  local operator
  if settings.mode == "remote_user" then
    operator = ngx.var.remote_user
    if operator == nil or operator == "" then
      return refuse(401, "UNAUTHORIZED", "actions need a user authenticated by nginx (auth_basic or the like)")
    end
  end
  if settings.token and not same_secret(ngx.var.http_x_commandbus_token, settings.token) then
    return refuse(401, "UNAUTHORIZED", "missing or wrong console token")
  end

  ngx.req.read_body()
  local raw = ngx.req.get_body_data()
  if raw == nil and ngx.req.get_body_file() then return refuse(413, "INVALID_ARGUMENT", "the body is too large") end
  if raw == nil or #raw > MAX_BODY then return refuse(400, "INVALID_ARGUMENT", "expected a JSON body") end
  local ok, body = pcall(cjson.decode, raw)
  if not ok or type(body) ~= "table" then return refuse(400, "INVALID_ARGUMENT", "the body is not a JSON object") end
  local domain, command_id, reason, typed, err
  domain, err = text_field(body, "domain", 200, true)
  if err == nil then command_id, err = text_field(body, "command_id", 100, true) end
  if err == nil then reason, err = text_field(body, "reason", 2000, false) end
  if err == nil then typed, err = text_field(body, "operator", 200, operator == nil) end
  if err then return refuse(400, "INVALID_ARGUMENT", "%s", err) end
  operator = operator or typed
  local result = body.result
  if result == cjson.null then result = nil end
  if kind == "complete" and result ~= nil then
    if type(result) ~= "table" then return refuse(400, "INVALID_ARGUMENT", "`result` must be a JSON object") end
    result, err = without_nulls(result)
    if err then return refuse(400, "INVALID_ARGUMENT", "`result` %s", err) end
  end

  local res
  if kind == "retry" then
    res, err = bus:tsq_retry(domain, command_id, {operator = operator, reason = reason})
  elseif kind == "cancel" then
    res, err = bus:tsq_cancel(domain, command_id, reason, {operator = operator})
  else
    res, err = bus:tsq_complete(domain, command_id, result, {operator = operator, reason = reason})
  end
  if res == nil then return bus_failure(err) end
  local line = format("commandbus console: %s %s command %s of %s%s", operator, kind == "retry" and "retried"
                      or kind == "cancel" and "canceled" or "completed", command_id, domain,
                      reason and (" (" .. reason .. ")") or "")
  ngx.log(ngx.NOTICE, (line:gsub("%c", "?"))) -- one line whatever the operator typed
  return send_json(200, {ok = true, action = kind, domain = domain, command_id = command_id, operator = operator})
end

-- ---------------------------------------------------------------------------
-- Throughput history (see the top of this file)

local sampler = {interval = 10, history = 900, dict = nil, started = false}

local function sample(premature)
  if premature or ngx.worker.exiting() then return end
  local dict, interval = ngx.shared[sampler.dict], sampler.interval
  local slot = floor(ngx.now() / interval)
  -- One sample a slot for the whole server: the first worker to claim it.
  if not dict:add("claim:" .. slot, true, interval * 3) then return end
  local metrics, err = sampler.bus:queue_metrics()
  if metrics == nil then
    if not ngx.worker.exiting() then ngx.log(ngx.WARN, "commandbus console: no throughput sample: ", tostring(err)) end
    return
  end
  local queues = {}
  for _, m in ipairs(metrics) do queues[m.queue_name] = {m.total_messages, m.queue_length} end
  local ok, why = dict:set("sample:" .. slot, cjson.encode{t = ngx.now(), q = queues}, sampler.history + interval * 3)
  if not ok then ngx.log(ngx.WARN, "commandbus console: lua_shared_dict ", sampler.dict, " is full: ", why) end
end

-- Per queue, {t, in per second, out per second, messages in, messages out}
-- for each pair of consecutive samples in the history, oldest first; or
-- nil and why there is none.
local function throughput(dict_name)
  if not sampler.started then
    return nil, "no history: call require(\"commandbus.console\").init_worker() in init_worker_by_lua"
  end
  local dict, interval = ngx.shared[dict_name], sampler.interval
  local now_slot = floor(ngx.now() / interval)
  local series, previous = {}, nil
  for slot = now_slot - floor(sampler.history / interval), now_slot do
    local ok, s = pcall(cjson.decode, dict:get("sample:" .. slot) or "null")
    if ok and type(s) == "table" then
      local dt = previous and s.t - previous.t or 0
      for name, now in pairs(dt > 0 and s.q or {}) do
        local before = previous.q[name]
        -- A counter that went down is a queue made anew: no figure there.
        if before and now[1] >= before[1] then
          local sent = now[1] - before[1]
          local left = math.max(0, sent - (now[2] - before[2]))
          local list = series[name] or {}
          list[#list + 1] = {s.t, sent / dt, left / dt, sent, left}
          series[name] = list
        end
      end
      previous = s
    end
  end
  return series
end

--- Starts the throughput sampler in this nginx worker (call it from
-- init_worker_by_lua in every worker; one sample a slot is taken for the
-- whole server). Options: dict ("commandbus_console", a lua_shared_dict),
-- sample_interval (10 s), history (900 s), bus (a commandbus.ngx bus; else
-- one for DATABASE_URL). Returns true, or nil and an error when the shared
-- dict is missing.
function M.init_worker(options)
  options = check_options("init_worker", options, {dict = "string", sample_interval = "number", history = "number",
                                                    bus = "table"})
  local interval, history = options.sample_interval or 10, options.history or 900
  if interval < 1 or interval > 3600 or interval ~= interval then
    error(format("bad option 'sample_interval' to 'init_worker': 1 to 3600 seconds expected, got %s", interval), 2)
  end
  if history < interval or history > 86400 or history ~= history then
    error(format("bad option 'history' to 'init_worker': sample_interval to 86400 seconds expected, got %s",
                 history), 2)
  end
  local dict_name = options.dict or DEFAULT_DICT
  if ngx.shared[dict_name] == nil then
    return nil, setmetatable({code = "INVALID_STATE", message = format(
      "commandbus console: no lua_shared_dict `%s`: add `lua_shared_dict %s 1m;` to the http block", dict_name,
      dict_name)}, require("commandbus.core").error_metatable)
  end
  sampler.interval, sampler.history, sampler.dict = interval, history, dict_name
  sampler.bus = bus_of(options)
  if not sampler.started then
    local ok, err = ngx.timer.every(interval, sample)
    if not ok then return nil, err end
    sampler.started = true
  end
  return true
end

-- ---------------------------------------------------------------------------
-- The JSON API

-- Domains that have a command or process reply queue: a cheap list (pgmq's
-- catalogue), whatever the number of commands.
local function known_domains(bus)
  local queues, err = bus:list_queues()
  if queues == nil then return nil, err end
  local seen, list = {}, {}
  for _, q in ipairs(queues) do
    local domain = q.queue_name:match("^(.-)__commands$") or q.queue_name:match("^(.-)__process_replies$")
    if domain and not seen[domain] then
      seen[domain] = true
      list[#list + 1] = domain
    end
  end
  table.sort(list)
  return list
end

-- The domains a list request is about: ?domain= or every known domain.
local function domains_of(bus, q)
  if q.domain then return {q.domain} end
  return known_domains(bus)
end

-- Calls list(domain) for each domain and joins the rows, newest first by key.
local function gather(bus, q, list, sort_key)
  local domains, err = domains_of(bus, q)
  if domains == nil then return nil, err end
  local rows = {}
  for _, domain in ipairs(domains) do
    local got
    got, err = list(domain)
    if got == nil then return nil, err end
    for _, row in ipairs(got) do rows[#rows + 1] = row end
  end
  if sort_key then
    table.sort(rows, function(a, b) return tostring(a[sort_key] or "") > tostring(b[sort_key] or "") end)
  end
  return rows, domains
end

local api = {}

function api.overview(bus, _, options)
  local m, err = bus:metrics{all_processes = true}
  if m == nil then return bus_failure(err) end
  local series, why = throughput(options.dict or DEFAULT_DICT)
  local queues = {}
  for i, q in ipairs(m.queues) do
    local history = series and series[q.queue_name] or {}
    local last = history[#history]
    queues[i] = {name = q.queue_name, depth = q.queue_length, oldest_age = q.oldest_msg_age_sec,
                 total = q.total_messages, rate_in = last and last[2], rate_out = last and last[3],
                 history = history}
  end
  local runners = {}
  for _, list in ipairs({m.workers, m.reply_routers}) do
    for _, r in ipairs(list) do runners[#runners + 1] = r end
  end
  return send_json(200, {now = ngx.now(), domains = m.domains, queues = queues, runners = runners,
                         history = {available = series ~= nil, reason = why, interval = sampler.interval,
                                    seconds = sampler.history}})
end

function api.domains(bus)
  local list, err = known_domains(bus)
  if list == nil then return bus_failure(err) end
  return send_json(200, {domains = list})
end

function api.tsq(bus, q)
  local limit, err = query_integer(q, "limit", 50, MAX_LIST)
  if not limit then return refuse(400, "INVALID_ARGUMENT", "%s", err) end
  local domains
  domains, err = domains_of(bus, q)
  if domains == nil then return bus_failure(err) end
  local items, total = {}, 0
  for _, domain in ipairs(domains) do
    local page
    page, err = bus:tsq_list{domain = domain, type = q.type, limit = limit}
    if page == nil then return bus_failure(err) end
    total = total + page.total
    for _, item in ipairs(page.items) do items[#items + 1] = item end
  end
  return send_json(200, {items = items, total = total, domains = domains})
end

function api.command(bus, q)
  if not q.domain or not q.id then return refuse(400, "INVALID_ARGUMENT", "`domain` and `id` are required") end
  local command, err = bus:get_command(q.domain, q.id)
  if command == nil then return bus_failure(err) end
  local audit
  audit, err = bus:audit(q.domain, q.id)
  if audit == nil then return bus_failure(err) end
  return send_json(200, {command = command, audit = audit})
end

-- A list method of the bus across domains (?domain= or every known one),
-- newest first by sort_key, with the query's filters that the method takes.
local function across_domains(method, sort_key, filters)
  return function(bus, q)
    local limit, err = query_integer(q, "limit", 50, MAX_LIST)
    if not limit then return refuse(400, "INVALID_ARGUMENT", "%s", err) end
    local rows, domains = gather(bus, q, function(domain)
      local options = {domain = domain, limit = limit}
      for _, name in ipairs(filters) do options[name] = q[name] end
      return bus[method](bus, options)
    end, sort_key)
    if rows == nil then return bus_failure(domains) end
    return send_json(200, {items = rows, domains = domains})
  end
end

api.batches = across_domains("list_batches", "created_at", {"status"})
api.processes = across_domains("list_processes", "updated_at", {"status", "type"})

function api.process(bus, q)
  if not q.domain or not q.id then return refuse(400, "INVALID_ARGUMENT", "`domain` and `id` are required") end
  local process, err = bus:get_process(q.domain, q.id)
  if process == nil then return bus_failure(err) end
  local events, steps
  events, err = bus:process_events(q.domain, q.id, 0)
  if events == nil then return bus_failure(err) end
  steps, err = bus:process_audit(q.domain, q.id)
  if steps == nil then return bus_failure(err) end
  return send_json(200, {process = process, events = events, steps = steps})
end

function api.workers(bus, q)
  local runners, err = bus:runners{domain = q.domain}
  if runners == nil then return bus_failure(err) end
  return send_json(200, {now = ngx.now(), runners = runners})
end

-- ---------------------------------------------------------------------------
-- The page

local function page(settings, options)
  local template, err = read_asset("index.html")
  if template == nil then
    ngx.log(ngx.ERR, err)
    return send(500, "text/plain; charset=utf-8", "commandbus console: its files are missing (see the error log)\n")
  end
  local token = csrf_cookie()
  if token == nil then
    token = random_hex(16)
    ngx.header["Set-Cookie"] = format("%s=%s; Path=%s; HttpOnly; SameSite=Strict%s", CSRF_COOKIE, token,
                                      options.prefix or DEFAULT_PREFIX, ngx.var.scheme == "https" and "; Secure" or "")
  end
  local values = {
    csrf = token,
    actions = settings.mode,
    read_only_reason = settings.why or "",
    operator = settings.mode == "remote_user" and (ngx.var.remote_user or "") or "",
    refresh = tostring(options.refresh or 10),
    version = require("commandbus.core")._VERSION,
  }
  local html = template:gsub("{{(%w[%w_]*)}}", function(name) return html_escape(values[name] or "") end)
  return send(200, "text/html; charset=utf-8", html)
end

--- The console's content handler: serves the page, its files and its JSON
-- API under the location's prefix. Options: prefix ("/commandbus/", the
-- location's path), actions (nil: read-only; {token = "..."}: retry, cancel
-- and complete for whoever gives the token; {remote_user = true}: for users
-- nginx authenticated, named by $remote_user; both may be given), refresh
-- (seconds between the page's updates, 10), dict (the sampler's shared
-- dict), bus (a commandbus.ngx bus; else one for DATABASE_URL).
function M.serve(options)
  options = check_options("serve", options, {prefix = "string", actions = "table", refresh = "number",
                                            dict = "string", bus = "table"})
  if options.refresh and not (options.refresh >= 1 and options.refresh <= 3600) then
    error(format("bad option 'refresh' to 'serve': 1 to 3600 seconds expected, got %s", options.refresh), 2)
  end
  local prefix = options.prefix or DEFAULT_PREFIX
  if prefix:sub(-1) ~= "/" then prefix = prefix .. "/" end
  options.prefix = prefix
  local uri, method = ngx.var.uri, ngx.req.get_method()
  if uri == prefix:sub(1, -2) then return ngx.redirect(prefix, 301) end
  if uri:sub(1, #prefix) ~= prefix then
    ngx.log(ngx.ERR, "commandbus console: ", uri, " is outside its prefix ", prefix, ": set serve{prefix = ...}")
    return refuse(404, "NOT_FOUND", "no such page")
  end
  local path = uri:sub(#prefix + 1)
  local settings = action_settings(options.actions)
  local reading = method == "GET" or method == "HEAD"

  local action = path:match("^api/tsq/(%a+)$")
  if action and ACTIONS[action] then
    if method ~= "POST" then
      ngx.header["Allow"] = "POST"
      return refuse(405, "METHOD_NOT_ALLOWED", "actions are POST requests")
    end
    return run_action(bus_of(options), settings, action)
  end
  if not reading then
    ngx.header["Allow"] = "GET, HEAD"
    return refuse(405, "METHOD_NOT_ALLOWED", "only GET and HEAD here")
  end
  if path == "" or path == "index.html" then return page(settings, options) end
  if ASSETS[path] then
    local text, err = read_asset(path)
    if text == nil then
      ngx.log(ngx.ERR, err)
      return refuse(500, "MISSING", "the console's files are missing (see the error log)")
    end
    return send(200, ASSETS[path], text, "no-cache")
  end
  local handler = path:match("^api/(%a+)$")
  handler = handler and api[handler]
  if handler == nil then return refuse(404, "NOT_FOUND", "no such page") end
  return handler(bus_of(options), query(), options)
end

--- The /metrics content handler: the Prometheus text exposition (format
-- 0.0.4) of bus:metrics_text, for GET and HEAD only. Options: all_processes
-- (true: workers and reply routers of every process, from their
-- heartbeats; false: this nginx worker's own), bus.
function M.metrics(options)
  options = check_options("metrics", options, {all_processes = "boolean", bus = "table"})
  local method = ngx.req.get_method()
  if method ~= "GET" and method ~= "HEAD" then
    ngx.header["Allow"] = "GET, HEAD"
    return send(405, "text/plain; charset=utf-8", "only GET and HEAD here\n")
  end
  local all = options.all_processes
  if all == nil then all = true end
  local text, err = bus_of(options):metrics_text{all_processes = all}
  if text == nil then
    ngx.log(ngx.ERR, "commandbus metrics: ", tostring(err))
    return send(503, "text/plain; charset=utf-8", "commandbus metrics unavailable: " .. tostring(err) .. "\n")
  end
  return send(200, "text/plain; version=0.0.4; charset=utf-8", text)
end

return M
