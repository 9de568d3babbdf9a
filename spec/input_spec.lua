-- Every value checked at the door: each public function and option is called
-- with NaN, infinities, huge, negative and fractional numbers, values of the
-- wrong type, strings holding a NUL byte or invalid UTF-8, and JSON data
-- holding those, and each gets its documented outcome:
--   a value of the wrong type raises;
--   a value of the right type that cannot be used returns nil and an
--   INVALID_ARGUMENT error naming the option (and, for numbers, its range),
--   and writes nothing;
--   the values the README allows are accepted.
local commandbus = require "commandbus"
local helper = require "spec.helper"
local world = require "spec.support.world"

local DELAY_MAX = 31536000  -- 365 days
local TIMING_MAX = 604800   -- 7 days
local AGE_MAX = 3153600000  -- 100 years
local INT_MAX = 2147483647
local INT64_MAX_TEXT = "9223372036854775807"

-- ---- the values --------------------------------------------------------------

-- Each kind of slot gets its list of {label, value, outcome}; outcome is
-- "raise", "invalid" or "ok".
local values = {}

function values.number(case)
  local integral = case.kind == "integer"
  local list = {
    {"NaN", 0 / 0, "invalid"},
    {"+inf", math.huge, "invalid"},
    {"-inf", -math.huge, "invalid"},
    {"huge (1e300)", 1e300, "invalid"},
    {"below the range", case.min - 1, "invalid"},
    {"above the range", integral and case.max + 1 or case.max * 2, "invalid"},
    {"a numeric string", "1", "raise"},
    {"a table", {}, "raise"},
    {"a boolean", true, "raise"},
    {"a NUL-bearing string", "1\0", "raise"},
  }
  if integral then
    list[#list + 1] = {"fractional", case.min + 0.5, "invalid"}
    if case.max < 2 ^ 32 + 1 then list[#list + 1] = {"2^32 + 1 (would wrap to 1)", 2 ^ 32 + 1, "invalid"} end
    if case.max < 2 ^ 31 then list[#list + 1] = {"2^31", 2 ^ 31, "invalid"} end
  end
  if case.min >= 0 then list[#list + 1] = {"negative", -1, "invalid"} end
  if case.min > 0 then list[#list + 1] = {"zero", 0, "invalid"} end
  return list
end
values.integer = values.number
values.seconds = values.number

function values.id(case)
  return {
    {"NaN", 0 / 0, "invalid"},
    {"+inf", math.huge, "invalid"},
    {"-inf", -math.huge, "invalid"},
    {"huge (1e300)", 1e300, "invalid"},
    {"fractional", case.min + 0.5, "invalid"},
    {"below the range", case.min - 1, "invalid"},
    {"a decimal string past 2^63 (would clamp)", "99999999999999999999", "invalid"},
    {"a decimal string with junk", "12abc", "invalid"},
    {"a NUL-bearing string", "1\0", "invalid"},
    {"an empty string", "", "invalid"},
    {"a boolean", true, "raise"},
    {"a function", print, "raise"},
  }
end

function values.text(case)
  local v = case.valid
  return {
    {"a NUL byte inside (would cut)", v .. "\0; drop", "invalid"},
    {"a NUL byte first", "\0" .. v, "invalid"},
    {"invalid UTF-8", v .. "\255", "invalid"},
    {"an overlong UTF-8 form", v .. "\192\175", "invalid"},
    {"a UTF-16 surrogate", v .. "\237\160\128", "invalid"},
    {"a truncated UTF-8 sequence", v .. "\226\130", "invalid"},
    {"a number", 7, "raise"},
    {"a table", {}, "raise"},
    {"a boolean", true, "raise"},
  }
end

function values.json()
  return {
    {"NaN inside", {x = 0 / 0}, "invalid"},
    {"an infinity inside", {x = math.huge}, "invalid"},
    {"a NUL byte in a string", {x = "a\0b"}, "invalid"},
    {"a NUL byte in a key", {["a\0"] = 1}, "invalid"},
    {"invalid UTF-8 in a string", {x = "\255"}, "invalid"},
    {"invalid UTF-8 in a key", {["\255"] = 1}, "invalid"},
    {"a function inside", {f = print}, "invalid"},
    {"a string", "text", "raise"},
    {"a number", 7, "raise"},
    {"a boolean", true, "raise"},
  }
end

function values.options()
  return {{"a string", "x", "raise"}, {"a number", 5, "raise"}, {"a boolean", true, "raise"}}
end

function values.boolean()
  return {{"a string", "no", "raise"}, {"a number", 0, "raise"}, {"a table", {}, "raise"}}
end

-- ---- the world the calls run in ----------------------------------------------

local bus, domain, qname, q, known_id, worker_domain
local UNKNOWN = "01234567-89ab-7def-8123-456789abcdef"

-- What the refused calls could have written: rows of the spec's domain, its
-- queue's messages, and queues named after them.
local function written()
  return helper.sql(([[SELECT (SELECT count(*) FROM commandbus.command WHERE domain = '%s'),
    (SELECT count(*) FROM commandbus.audit WHERE domain = '%s'),
    (SELECT count(*) FROM commandbus.batch WHERE domain = '%s'),
    (SELECT count(*) FROM commandbus.process WHERE domain = '%s'),
    (SELECT count(*) FROM commandbus.process_event WHERE domain = '%s'),
    (SELECT count(*) FROM pgmq.q_%s),
    (SELECT count(*) FROM pgmq.meta WHERE queue_name LIKE '%s%%' OR queue_name LIKE '%s%%')]]):format(
    domain, domain, domain, domain, domain, qname, domain, qname))
end

local function close_result(res)
  if type(res) == "userdata" and res.close then res:close() end
end

-- ---- the cases ------------------------------------------------------------------

-- name: what is called; option: what the message must name; kind: the
-- slot's kind (with min/max for numbers, valid for text); ok: values that
-- are accepted; extra: more {label, value, outcome}; call(v): the call.
local function cases()
  local list = {}
  local function add(case) list[#list + 1] = case end
  local function options_of(call) -- the options table argument of call itself
    add{name = call.name .. " options", option = "options", kind = "options", ok = call.ok or {{}}, call = call.fn,
        cleanup = call.cleanup}
  end

  -- module
  local url = os.getenv("DATABASE_URL")
  add{name = "commandbus.connect dsn", option = "dsn", kind = "text", valid = url, ok = {url},
      call = function(v) return commandbus.connect(v) end, cleanup = close_result}
  add{name = "commandbus.connect pool_size", option = "pool_size", kind = "integer", min = 1, max = 64, ok = {1, 64},
      call = function(v) return commandbus.connect(url, {pool_size = v}) end, cleanup = close_result}
  add{name = "commandbus.connect connect_timeout", option = "connect_timeout", kind = "seconds", min = 0.001,
      max = TIMING_MAX, ok = {0.5, TIMING_MAX},
      call = function(v) return commandbus.connect(url, {connect_timeout = v}) end, cleanup = close_result}
  add{name = "commandbus.connect application_name", option = "application_name", kind = "text", valid = "spec_app",
      call = function(v) return commandbus.connect(url, {application_name = v}) end, cleanup = close_result}
  options_of{name = "commandbus.connect", fn = function(v) return commandbus.connect(url, v) end,
             cleanup = close_result}
  local threads = commandbus.default_threads()
  add{name = "commandbus.configure threads", option = "threads", kind = "integer", min = 1, max = 1024,
      ok = {threads}, call = function(v) return commandbus.configure{threads = v} end}

  -- message routers
  local function router(options) return commandbus.message_router(options) end
  for _, o in ipairs({{"lanes", 1, 1024, {1, 2}}, {"batch_size", 1, 1000000, {1, 100}},
                      {"batch_timeout_ms", 0, INT_MAX, {0, 10}}, {"queue_size", 1, 1000000, {100, 1000000}},
                      {"lane_queue_size", 1, 1000000, {1, 10}}, {"block_timeout_ms", -1, INT_MAX, {0, 1000}}}) do
    add{name = "commandbus.message_router " .. o[1], option = o[1], kind = "integer", min = o[2], max = o[3],
        ok = o[4], call = function(v) return router{[o[1]] = v} end, cleanup = close_result}
  end
  add{name = "commandbus.message_router policy", option = "policy", kind = "text", valid = "drop",
      ok = {"drop", "block"}, extra = {{"an unknown policy", "fast", "invalid"}},
      call = function(v) return router{policy = v} end, cleanup = close_result}
  add{name = "commandbus.message_router handler", option = "handler", kind = "text",
      valid = "spec.support.router_lane", call = function(v) return router{handler = v} end, cleanup = close_result}
  local taker = commandbus.message_router{lanes = 2}
  assert(taker:start())
  add{name = "router:take lane", option = "lane", kind = "integer", min = 1, max = 2, ok = {1, 2},
      call = function(v) return taker:take(v, 1, 0) end}
  add{name = "router:take max", option = "max", kind = "integer", min = 1, max = INT_MAX, ok = {1, INT_MAX},
      call = function(v) return taker:take(1, v, 0) end}
  add{name = "router:take timeout_ms", option = "timeout_ms", kind = "integer", min = -1, max = INT_MAX,
      ok = {0, 1}, call = function(v) return taker:take(1, 1, v) end}

  -- queues
  add{name = "bus:queue name", option = "queue name", kind = "text", valid = qname,
      call = function(v) return bus:queue(v) end}
  add{name = "q:send message", option = "JSON", kind = "json", ok = {{a = 1, s = "h\195\169llo \226\156\147"}},
      call = function(v) return q:send(v) end}
  add{name = "q:send delay", option = "delay", kind = "seconds", min = 0, max = DELAY_MAX, ok = {0, 0.5, DELAY_MAX},
      call = function(v) return q:send({n = 1}, {delay = v}) end}
  options_of{name = "q:send", fn = function(v) return q:send({n = 1}, v) end}
  add{name = "q:send_batch message", option = "message #2", kind = "json", ok = {{b = 2}},
      call = function(v) return q:send_batch({{a = 1}, v}) end}
  add{name = "q:send_batch delay", option = "delay", kind = "seconds", min = 0, max = DELAY_MAX, ok = {0.5},
      call = function(v) return q:send_batch({{a = 1}}, {delay = v}) end}
  add{name = "q:read vt", option = "vt", kind = "seconds", min = 0, max = DELAY_MAX, ok = {0, 0.5},
      call = function(v) return q:read{vt = v} end}
  add{name = "q:read qty", option = "qty", kind = "integer", min = 1, max = 1000000, ok = {1, 1000000},
      call = function(v) return q:read{vt = 0, qty = v} end}
  options_of{name = "q:read", fn = function(v) return q:read(v) end}
  add{name = "q:read_with_poll max_wait", option = "max_wait", kind = "seconds", min = 0, max = DELAY_MAX,
      ok = {0, 0.01}, call = function(v) return q:read_with_poll{vt = 0, max_wait = v} end}
  add{name = "q:read_with_poll poll_interval", option = "poll_interval", kind = "seconds", min = 0.001,
      max = TIMING_MAX, ok = {0.5, TIMING_MAX},
      call = function(v) return q:read_with_poll{vt = 0, max_wait = 0, poll_interval = v} end}
  add{name = "q:pop qty", option = "qty", kind = "integer", min = 1, max = 1000000, ok = {1},
      call = function(v) return q:pop{qty = v} end}
  for _, op in ipairs({"delete", "archive"}) do
    add{name = "q:" .. op .. " id", option = "message id", kind = "id", min = 1, ok = {1, "1", INT64_MAX_TEXT},
        call = function(v) return q[op](q, v) end}
    add{name = "q:" .. op .. " list of ids", option = "message id", kind = "id", min = 1, ok = {1, "2"},
        call = function(v) return q[op](q, {1, v}) end}
  end
  add{name = "q:set_vt id", option = "message id", kind = "id", min = 1, ok = {1, INT64_MAX_TEXT},
      call = function(v) return q:set_vt(v, 0) end}
  add{name = "q:set_vt seconds", option = "seconds", kind = "seconds", min = 0, max = DELAY_MAX, ok = {0, 0.5},
      call = function(v) return q:set_vt(1, v) end}

  -- commands
  local function send(fields)
    local spec = {domain = domain, type = "T"}
    for k, v in pairs(fields) do spec[k] = v end
    return bus:send(spec)
  end
  add{name = "bus:send domain", option = "domain", kind = "text", valid = domain,
      extra = {{"an invalid name", "x'; drop", "invalid"}}, call = function(v) return send{domain = v} end}
  add{name = "bus:send type", option = "type", kind = "text", valid = "T", ok = {"T", "T\226\156\147"},
      call = function(v) return send{type = v} end}
  for _, field in ipairs({"id", "correlation_id", "batch_id"}) do
    add{name = "bus:send " .. field, option = field, kind = "text", valid = known_id,
        ok = field == "id" and {} or {known_id}, call = function(v) return send{[field] = v} end}
  end
  add{name = "bus:send reply_to", option = "reply_to", kind = "text", valid = domain .. "_replies",
      call = function(v) return send{reply_to = v} end}
  add{name = "bus:send max_attempts", option = "max_attempts", kind = "integer", min = 1, max = 1000,
      ok = {1, 1000}, call = function(v) return send{max_attempts = v} end}
  add{name = "bus:send delay", option = "delay", kind = "seconds", min = 0, max = DELAY_MAX, ok = {0.5},
      call = function(v) return send{delay = v} end}
  add{name = "bus:send data", option = "JSON", kind = "json", ok = {{a = 1}}, call = function(v) return send{data = v} end}
  options_of{name = "bus:send", fn = function(v) return bus:send(v) end, ok = {{domain = domain, type = "T"}}}
  add{name = "bus:send_batch domain (no commands)", option = "domain", kind = "text", valid = domain,
      extra = {{"an invalid name", "x'; drop", "invalid"}},
      call = function(v) return bus:send_batch{domain = v, commands = {}} end}
  add{name = "bus:send_batch delay", option = "delay", kind = "seconds", min = 0, max = DELAY_MAX, ok = {0.5},
      call = function(v) return bus:send_batch{domain = domain, delay = v, commands = {{type = "T"}}} end}
  add{name = "bus:send_batch command type", option = "command #2: option 'type'", kind = "text", valid = "T",
      call = function(v) return bus:send_batch{domain = domain, commands = {{type = "T"}, {type = v}}} end}
  add{name = "bus:send_batch command max_attempts", option = "command #2: option 'max_attempts'",
      kind = "integer", min = 1, max = 1000, ok = {2},
      call = function(v)
        return bus:send_batch{domain = domain, commands = {{type = "T"}, {type = "T", max_attempts = v}}}
      end}
  add{name = "bus:create_batch name", option = "name", kind = "text", valid = "nightly",
      call = function(v) return bus:create_batch{domain = domain, name = v, commands = {{type = "T"}}} end}
  add{name = "bus:create_batch custom_data", option = "custom_data", kind = "json", ok = {{k = 1}},
      call = function(v) return bus:create_batch{domain = domain, custom_data = v, commands = {{type = "T"}}} end}

  -- lookups by (domain, id)
  local lookups = {
    get_command = function(d, id) return bus:get_command(d, id) end,
    audit = function(d, id) return bus:audit(d, id) end,
    get_batch = function(d, id) return bus:get_batch(d, id) end,
    get_process = function(d, id) return bus:get_process(d, id) end,
    process_audit = function(d, id) return bus:process_audit(d, id) end,
    process_events = function(d, id) return bus:process_events(d, id) end,
    tsq_retry = function(d, id) return bus:tsq_retry(d, id) end,
    tsq_cancel = function(d, id) return bus:tsq_cancel(d, id, "why") end,
    tsq_complete = function(d, id) return bus:tsq_complete(d, id, {}) end,
    await = function(d, id) return bus:await(d, id, {timeout = 0}) end,
    await_process = function(d, id) return bus:await_process(d, id, {timeout = 0}) end,
    await_event = function(d, id) return bus:await_event(d, id, "X", 0, {timeout = 0}) end,
    append_process_event = function(d, id) return bus:append_process_event(d, id, "x", {}) end,
  }
  for fname, fn in pairs(lookups) do
    add{name = "bus:" .. fname .. " domain", option = "domain", kind = "text", valid = domain,
        call = function(v) return fn(v, UNKNOWN) end}
    add{name = "bus:" .. fname .. " id", option = "id", kind = "text", valid = UNKNOWN,
        call = function(v) return fn(domain, v) end}
  end

  -- lists
  local lists = {
    list_commands = {"status", "type", "correlation_id", "batch_id"},
    list_batches = {"status"},
    tsq_list = {"type"},
    list_processes = {"type", "status"},
  }
  for fname, texts in pairs(lists) do
    local function list(fields)
      local options = {domain = domain}
      for k, v in pairs(fields) do options[k] = v end
      return bus[fname](bus, options)
    end
    add{name = "bus:" .. fname .. " domain", option = "domain", kind = "text", valid = domain,
        call = function(v) return list{domain = v} end}
    for _, field in ipairs(texts) do
      add{name = "bus:" .. fname .. " " .. field, option = field, kind = "text", valid = UNKNOWN,
          ok = field:match("_id$") and {UNKNOWN} or {"PENDING"}, call = function(v) return list{[field] = v} end}
    end
    add{name = "bus:" .. fname .. " limit", option = "limit", kind = "integer", min = 1, max = 1000000,
        ok = {1, 1000000}, call = function(v) return list{limit = v} end}
    add{name = "bus:" .. fname .. " offset", option = "offset", kind = "integer", min = 0, max = INT_MAX,
        ok = {0, INT_MAX}, call = function(v) return list{offset = v} end}
  end

  -- the troubleshooting queue's texts
  add{name = "bus:tsq_cancel reason", option = "reason", kind = "text", valid = "customer withdrew",
      call = function(v) return bus:tsq_cancel(domain, UNKNOWN, v) end}
  add{name = "bus:tsq_complete result", option = "result", kind = "json", ok = {{ok = true}},
      call = function(v) return bus:tsq_complete(domain, UNKNOWN, v) end}
  for fname, fn in pairs({tsq_retry = function(o) return bus:tsq_retry(domain, UNKNOWN, o) end,
                          tsq_cancel = function(o) return bus:tsq_cancel(domain, UNKNOWN, "r", o) end,
                          tsq_complete = function(o) return bus:tsq_complete(domain, UNKNOWN, {}, o) end}) do
    add{name = "bus:" .. fname .. " operator", option = "operator", kind = "text", valid = "ada",
        call = function(v) return fn{operator = v} end}
    options_of{name = "bus:" .. fname, fn = fn}
  end

  -- waiting
  local awaits = {
    await = function(o) return bus:await(domain, UNKNOWN, o) end,
    await_process = function(o) return bus:await_process(domain, UNKNOWN, o) end,
    await_event = function(o) return bus:await_event(domain, UNKNOWN, "X", 0, o) end,
  }
  for fname, fn in pairs(awaits) do
    add{name = "bus:" .. fname .. " timeout", option = "timeout", kind = "seconds", min = 0, max = DELAY_MAX,
        ok = {0, 0.5, DELAY_MAX}, call = function(v) return fn{timeout = v} end}
    add{name = "bus:" .. fname .. " listen", option = "listen", kind = "boolean", ok = {true, false},
        call = function(v) return fn{timeout = 0, listen = v} end}
    options_of{name = "bus:" .. fname, fn = fn}
  end
  add{name = "bus:await_event event_type", option = "event_type", kind = "text", valid = "STEP_STARTED",
      call = function(v) return bus:await_event(domain, UNKNOWN, v, 0, {timeout = 0}) end}
  add{name = "bus:await_event after_sequence", option = "sequence", kind = "id", min = 0, ok = {0, "5", INT64_MAX_TEXT},
      call = function(v) return bus:await_event(domain, UNKNOWN, "X", v, {timeout = 0}) end}
  add{name = "bus:process_events after_sequence", option = "sequence", kind = "id", min = 0, ok = {0, 7},
      call = function(v) return bus:process_events(domain, UNKNOWN, v) end}

  -- processes
  add{name = "bus:append_process_event event_type", option = "event_type", kind = "text", valid = "label_printed",
      call = function(v) return bus:append_process_event(domain, UNKNOWN, v, {}) end}
  add{name = "bus:append_process_event data", option = "event data", kind = "json", ok = {{printer = "P1"}},
      call = function(v) return bus:append_process_event(domain, UNKNOWN, "x", v) end}
  add{name = "bus:purge_processes older_than", option = "older_than", kind = "seconds", min = 0, max = AGE_MAX,
      ok = {0, 0.5, AGE_MAX}, call = function(v) return bus:purge_processes{domain = domain, older_than = v} end}
  add{name = "bus:purge_processes domain", option = "domain", kind = "text", valid = domain,
      call = function(v) return bus:purge_processes{domain = v, older_than = 0} end}
  add{name = "bus:on_process_event capacity", option = "capacity", kind = "integer", min = 1, max = 1000000,
      ok = {1, 1024}, call = function(v) return bus:on_process_event(function() end, {capacity = v}) end,
      cleanup = function() bus:on_process_event(nil) end}
  add{name = "bus:dispatch_process_events max", option = "max", kind = "integer", min = 0, max = 2 ^ 30,
      ok = {0, 10}, call = function(v) return bus:dispatch_process_events(v) end}
  local command_data
  local manager = commandbus.process.define{
    type = "InputSpec", domain = domain,
    first_step = function() return "one" end,
    build_command = function() return {type = "Step", data = command_data} end,
    update_state = function(state) return state end,
    next_step = function() end,
  }
  add{name = "manager:start state", option = "state", kind = "json", ok = {{n = 1}},
      call = function(v) return manager:start(bus, v) end}
  add{name = "manager:start command data", option = "data", kind = "json", ok = {{n = 1}},
      call = function(v)
        command_data = v
        return manager:start(bus, {})
      end}
  add{name = "manager:start batch_id", option = "batch_id", kind = "text", valid = known_id,
      extra = {{"a number", 7, "raise"}}, ok = {},
      call = function(v) return manager:start(bus, {}, {batch_id = v}) end}

  -- workers and reply routers
  local function worker(fields, kind)
    local options = {domain = worker_domain, handlers = {T = function() end}}
    for k, v in pairs(fields) do options[k] = v end
    if kind == "router" then
      options.handlers, options.managers = nil, options.managers or {}
      return bus:reply_router(options)
    end
    return bus:worker(options)
  end
  for _, kind in ipairs({"worker", "router"}) do
    local label = kind == "router" and "bus:reply_router " or "bus:worker "
    local function make(fields) return worker(fields, kind) end
    add{name = label .. "domain", option = "domain", kind = "text", valid = worker_domain,
        call = function(v) return make{domain = v} end, cleanup = close_result}
    add{name = label .. (kind == "router" and "managers" or "handlers") .. " module", option =
        kind == "router" and "managers" or "handlers", kind = "text",
        valid = kind == "router" and "spec.support.saga_managers" or "spec.support.handlers",
        skip = {["a table"] = true}, -- a table of handlers or managers is the other form
        call = function(v) return make(kind == "router" and {managers = v} or {handlers = v}) end,
        cleanup = close_result}
    add{name = label .. "concurrency", option = "concurrency", kind = "integer", min = 1, max = 1024, ok = {1},
        call = function(v) return make{concurrency = v} end, cleanup = close_result}
    add{name = label .. "visibility_timeout", option = "visibility_timeout", kind = "seconds", min = 0.001,
        max = TIMING_MAX, ok = {30.5, TIMING_MAX},
        call = function(v) return make{visibility_timeout = v} end, cleanup = close_result}
    add{name = label .. "statement_timeout", option = "statement_timeout", kind = "seconds", min = 0.001,
        max = TIMING_MAX, ok = {0.001, 2.5},
        call = function(v) return make{statement_timeout = v} end, cleanup = close_result}
    add{name = label .. "poll_interval", option = "poll_interval", kind = "seconds", min = 0.001,
        max = TIMING_MAX, ok = {0.001, 0.5, TIMING_MAX},
        call = function(v) return make{poll_interval = v} end, cleanup = close_result}
    local idle = make{}
    add{name = (kind == "router" and "router" or "worker") .. ":run tick_interval", option = "tick_interval",
        kind = "seconds", min = 0.001, max = TIMING_MAX, ok = {},
        call = function(v) return idle:run{tick_interval = v, tick = function() return false end} end}
    options_of{name = label:sub(1, -2), ok = {},
               fn = function(v) return bus[kind == "router" and "reply_router" or "worker"](bus, v) end}
  end
  add{name = "bus:worker drain_timeout", option = "drain_timeout", kind = "seconds", min = 0, max = TIMING_MAX,
      ok = {0, 0.5, TIMING_MAX}, call = function(v) return worker{drain_timeout = v} end, cleanup = close_result}
  add{name = "bus:worker retry.backoff entry", option = "retry.backoff[2]", kind = "seconds", min = 0,
      max = TIMING_MAX, ok = {0, 0.5, TIMING_MAX},
      call = function(v) return worker{retry = {backoff = {1, v}}} end, cleanup = close_result}
  add{name = "bus:reply_router reply_queue", option = "reply_queue", kind = "text", valid = worker_domain .. "_r",
      call = function(v) return worker({reply_queue = v}, "router") end, cleanup = close_result}
  return list
end

-- ---- the driver ------------------------------------------------------------------

local function describe_value(v)
  if type(v) == "string" then return ("%q"):format(v) end
  return tostring(v)
end

local function check(case)
  local list = values[case.kind](case)
  for _, extra in ipairs(case.extra or {}) do list[#list + 1] = extra end
  for i = #list, 1, -1 do
    if case.skip and case.skip[list[i][1]] then table.remove(list, i) end
  end
  local accepted = case.ok or (case.valid and {case.valid}) or {}
  local before = written()
  for _, entry in ipairs(list) do
    local label, value, outcome = entry[1], entry[2], entry[3]
    local what = ("%s with %s (%s)"):format(case.name, label, describe_value(value))
    local ok, res, err = pcall(case.call, value)
    if outcome == "raise" then
      assert(not ok, what .. ": expected a raise, got " .. tostring(res) .. ", " .. tostring(err))
    else
      assert(ok, what .. ": raised " .. tostring(res))
      assert(res == nil and type(err) == "table", what .. ": expected nil, err; got " .. tostring(res))
      assert(err.code == "INVALID_ARGUMENT", what .. ": expected INVALID_ARGUMENT, got " .. tostring(err))
      assert(err.message:find(case.option, 1, true), what .. ": the message does not name " .. case.option
             .. ": " .. err.message)
      if case.min and case.kind ~= "id" then
        assert(err.message:find("from ", 1, true), what .. ": the message does not give the range: " .. err.message)
      end
    end
  end
  assert.equal(before, written(), case.name .. ": a refused call wrote something")
  for _, value in ipairs(accepted) do
    local what = ("%s with the accepted %s"):format(case.name, describe_value(value))
    local ok, res, err = pcall(case.call, value)
    assert(ok, what .. ": raised " .. tostring(res))
    assert(not (res == nil and type(err) == "table" and err.code == "INVALID_ARGUMENT"),
           what .. ": refused: " .. tostring(err))
    if case.cleanup then case.cleanup(res) end
  end
end

describe("every value checked at the door:", function()
  -- The world is made here, not in setup(): the cases are listed from it,
  -- one test each.
  bus = world.bus()
  domain = world.domain()
  worker_domain = world.domain()
  qname = helper.unique("input_q")
  q = assert(bus:queue(qname))
  assert(q:create())
  known_id = assert(bus:send{domain = domain, type = "T"}).command_id

  teardown(function()
    q:drop()
    bus:close()
  end)

  for _, case in ipairs(cases()) do
    it(case.name .. ": a wrong type raises; an unusable value is INVALID_ARGUMENT and writes nothing", function()
      check(case)
    end)
  end
end)

describe("values found on the way in", function()
  local bus, domain

  before_each(function()
    bus = world.bus()
    domain = world.domain()
  end)

  after_each(function() bus:close() end)

  it("q:send_batch of 30,000 messages completes, one id each, in order", function()
    local q = assert(bus:queue(helper.unique("batch30k")))
    assert(q:create())
    local messages = {}
    for i = 1, 30000 do messages[i] = {n = i, body = "a small message of about sixty bytes"} end
    local ids = assert(q:send_batch(messages))
    assert.equal(30000, #ids)
    for i = 2, #ids do assert(tonumber(ids[i - 1]) < tonumber(ids[i]), "ids out of order at " .. i) end
    assert.equal(30000, assert(q:metrics()).queue_length)
    q:drop()
  end)

  it("a handler's unstorable text or result is recorded, never left to loop", function()
    local handlers = {
      BadMessage = function() error(commandbus.permanent("CODE", "bad \255 text")) end,
      NulCode = function() error(commandbus.permanent("CO\0DE", "has a NUL")) end,
      BadPlain = function() error("plain \255 text") end,
      NulResult = function() return {x = "a\0b"} end,
      NanResult = function() return {x = 0 / 0} end,
    }
    local ids = {}
    for name in pairs(handlers) do
      ids[name] = assert(bus:send{domain = domain, type = name, max_attempts = 1}).command_id
    end
    local list = {}
    for _, id in pairs(ids) do list[#list + 1] = id end
    local worker, met = world.work(bus, domain, world.settled(bus, domain, list), {handlers = handlers})
    worker:close()
    assert.is_true(met)
    local function record(name) return assert(bus:get_command(domain, ids[name])) end
    for name in pairs(handlers) do assert.equal("IN_TROUBLESHOOTING_QUEUE", record(name).status, name) end
    assert.equal("bad \239\191\189 text", record("BadMessage").last_error_msg) -- U+FFFD for the byte
    assert.equal("CO\239\191\189DE", record("NulCode").last_error_code)          -- whole, not cut at the NUL
    assert.matches("plain \239\191\189 text", record("BadPlain").last_error_msg)
    assert.equal("BAD_RESULT", record("NulResult").last_error_code)
    assert.matches("NUL", record("NulResult").last_error_msg)
    assert.equal("BAD_RESULT", record("NanResult").last_error_code)
  end)

  it("ctx:extend_visibility refuses unusable seconds and raises for a wrong type", function()
    local seen = {}
    local handlers = {
      Long = function(_, ctx)
        for _, v in ipairs({0 / 0, math.huge, -1, 0, 1e300, 604801}) do
          local ok, err = ctx:extend_visibility(v)
          seen[#seen + 1] = ok == nil and err.code == "INVALID_ARGUMENT" and err.message:match("seconds") ~= nil
        end
        seen[#seen + 1] = not pcall(ctx.extend_visibility, ctx, "5")
        seen[#seen + 1] = ctx:extend_visibility(0.5) == true
      end,
    }
    local id = assert(bus:send{domain = domain, type = "Long"}).command_id
    local worker, met = world.work(bus, domain, world.settled(bus, domain, {id}), {handlers = handlers})
    worker:close()
    assert.is_true(met)
    assert.same({true, true, true, true, true, true, true, true}, seen)
    assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
  end)

  it("a TSQ action refuses a peer's 60-byte reply queue whole instead of cutting it to 47", function()
    local long = domain .. "_" .. string.rep("r", 60 - #domain - 1)
    local id = assert(bus:send{domain = domain, type = "T"}).command_id
    helper.sql(("UPDATE commandbus.command SET status = 'IN_TROUBLESHOOTING_QUEUE', reply_queue = '%s'"
                .. " WHERE domain = '%s' AND command_id = '%s'"):format(long, domain, id))
    assert.is_true(assert(bus:tsq_complete(domain, id, {done = true})))
    assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
    local cut = long:sub(1, 47)
    assert.equal("0", helper.sql(("SELECT count(*) FROM pgmq.meta WHERE queue_name = '%s'"):format(cut)):match("%d+"))
  end)
end)
