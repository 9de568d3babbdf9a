--- commandbus command-line tool: look at a bus, operate it, and run its
-- workers and reply routers from a shell (see `commandbus --help`).
--
-- Output is for people by default (aligned tables, ISO 8601 times), or one
-- JSON document with --json (keys sorted, lists always [...]). Arguments are
-- all checked before connecting. Connects to --dsn, else DATABASE_URL, else
-- libpq's PG* variables; a password never appears in what is printed.
-- Exit status: 0 done, 1 the operation failed or was refused (the error is
-- printed), 2 a usage error.
local commandbus = require "commandbus"
local cjson = require "cjson"

local cli = {}

---------------------------------------------------------------------------
-- Values: checks of arguments and options (before connecting)
---------------------------------------------------------------------------

local COMMAND_STATUSES = {"PENDING", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELED", "IN_TROUBLESHOOTING_QUEUE"}
local BATCH_STATUSES = {"PENDING", "IN_PROGRESS", "COMPLETED", "COMPLETED_WITH_FAILURES"}
local PROCESS_STATUSES = {"PENDING", "WAITING", "WAITING_FOR_TSQ", "COMPENSATING", "COMPLETED", "COMPENSATED",
                          "FAILED", "CANCELED"}
local MAX_LIMIT = 10000

local function escape_pattern(s) return (s:gsub("%p", "%%%0")) end

-- A usage error: main prints it with the usage and exits 2.
local usage_mt = {}
local function usage_error(fmt, ...)
  error(setmetatable({message = string.format(fmt, ...)}, usage_mt), 0)
end

local function name_check(what, max)
  return function(v, label)
    if not v:match("^[a-z_][a-z0-9_]*$") or #v > max then
      usage_error("%s must be a %s (lower-case letters, digits and _, not starting with a digit, at most %d bytes),"
                  .. " got `%s`", label, what, max, v)
    end
    return v
  end
end

local function uuid(v, label)
  if not v:match("^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$") then
    usage_error("%s must be a UUID, got `%s`", label, v)
  end
  return v:lower()
end

local function integer(min, max)
  return function(v, label)
    local n = v:match("^%d+$") and tonumber(v)
    if not n or n < min or n > max then
      usage_error("%s must be a whole number from %d to %d, got `%s`", label, min, max, v)
    end
    return math.floor(n)
  end
end

local function one_of(values)
  return function(v, label)
    local upper = v:upper()
    for _, s in ipairs(values) do
      if s == upper then return s end
    end
    usage_error("%s must be one of %s, got `%s`", label, table.concat(values, ", "), v)
  end
end

local function text(v, label)
  if v == "" then usage_error("%s must not be empty", label) end
  return v
end

local function json_object(v, label)
  local ok, value = pcall(cjson.decode, v)
  if not ok or type(value) ~= "table" or v:match("^%s*%[") then
    usage_error("%s must be a JSON object, got `%s`", label, v)
  end
  return value
end

local function module_name(v, label)
  if not v:match("^[%w_][%w_%.%-]*$") then usage_error("%s must be a Lua module name, got `%s`", label, v) end
  return v
end

-- A schedule's name: any text of 1 to 200 bytes.
local function schedule_name(v, label)
  if v == "" or #v > 200 then usage_error("%s must be a schedule name of 1 to 200 bytes, got `%s`", label, v) end
  return v
end

local CHECKS = {
  domain = name_check("domain name", 37),
  name = schedule_name,
  queue = name_check("queue name", 47),
  id = uuid,
  status = text, -- per command, below
  type = text,
  limit = integer(1, MAX_LIMIT),
  offset = integer(0, 2147483647),
  after = integer(0, 2 ^ 53),
  concurrency = integer(1, 1024),
  operator = text,
  reason = text,
  result = json_object,
  handlers = module_name,
  managers = module_name,
}

---------------------------------------------------------------------------
-- Output
---------------------------------------------------------------------------

-- Fields that hold lists of records; anything else nested (data, state,
-- details, payload) is the user's and printed as it is.
local LISTS = {items = true, queues = true, domains = true, workers = true, reply_routers = true,
               message_routers = true, lane_depths = true}

local function is_time_key(k)
  return type(k) == "string" and (k:match("_at$") or k == "ts" or k == "scrape_time")
end

-- PostgreSQL's timestamptz text ("2026-11-30 19:32:22.906334+00") or Unix
-- seconds, as ISO 8601 ("2026-11-30T19:32:22.906334Z").
local function iso8601(v)
  if type(v) == "number" then
    local whole = math.floor(v)
    return os.date("!%Y-%m-%dT%H:%M:%S", whole) .. string.format(".%03dZ", math.floor((v - whole) * 1000))
  end
  if type(v) ~= "string" then return v end
  local date, time, zone = v:match("^(%d%d%d%d%-%d%d%-%d%d) (%d%d:%d%d:%d%d[%.%d]*)(.*)$")
  if not date then return v end
  if zone == "+00" or zone == "+00:00" or zone == "" then
    zone = "Z"
  elseif zone:match("^[+-]%d%d$") then
    zone = zone .. ":00"
  end
  return date .. "T" .. time .. zone
end

-- A copy of a result with its times in ISO 8601 (records, lists of records,
-- and the known lists inside them).
local function normalize(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do
    if is_time_key(k) then
      out[k] = iso8601(x)
    elseif type(k) == "number" or LISTS[k] then
      out[k] = normalize(x)
    else
      out[k] = x
    end
  end
  return out
end

local function is_list(t, known)
  if known then return true end
  if next(t) == nil then return false end
  local n = 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then return false end
    n = n + 1
  end
  return n == #t
end

local function number_json(v)
  if v ~= v or v == math.huge or v == -math.huge then return "null" end
  if math.type and math.type(v) == "integer" then return string.format("%d", v) end
  if v % 1 == 0 and v > -2 ^ 53 and v < 2 ^ 53 then return string.format("%.0f", v) end
  return string.format("%.17g", v)
end

--- JSON with sorted keys, so that the same data always prints the same; a
-- list (known by its place or by its keys) is always [...], even empty.
local function encode(v, known_list, out)
  local t = type(v)
  if t == "table" then
    if is_list(v, known_list) then
      out[#out + 1] = "["
      for i = 1, #v do
        if i > 1 then out[#out + 1] = "," end
        encode(v[i], false, out)
      end
      out[#out + 1] = "]"
    else
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = tostring(k) end
      table.sort(keys)
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        local x = v[k]
        if x == nil then x = v[tonumber(k)] end
        out[#out + 1] = cjson.encode(k) .. ":"
        encode(x, LISTS[k] ~= nil, out)
      end
      out[#out + 1] = "}"
    end
  elseif t == "number" then
    out[#out + 1] = number_json(v)
  elseif t == "string" then
    out[#out + 1] = cjson.encode(v)
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  else
    out[#out + 1] = "null"
  end
  return out
end

local function to_json(v, list)
  return table.concat(encode(v, list, {}))
end

local function compact(v)
  if type(v) == "table" then return to_json(v) end
  return v == nil and "" or tostring(v)
end

-- "2026-11-30T19:32:22Z": seconds are enough in a table.
local function short_time(v)
  return (iso8601(v) or ""):gsub("%.%d+", "")
end

local function age(seconds)
  if seconds == nil or seconds < 0 then return "-" end
  local floor = math.floor
  seconds = floor(seconds)
  if seconds < 60 then return seconds .. "s" end
  if seconds < 3600 then return string.format("%dm%02ds", floor(seconds / 60), seconds % 60) end
  if seconds < 86400 then return string.format("%dh%02dm", floor(seconds / 3600), floor(seconds % 3600 / 60)) end
  return string.format("%dd%02dh", floor(seconds / 86400), floor(seconds % 86400 / 3600))
end

--- Prints rows as a table: columns are {header, function(row) -> value,
-- right-aligned?}. Cells are clipped to 60 characters.
local function print_table(out, columns, rows, empty)
  if #rows == 0 then
    out:write(empty, "\n")
    return
  end
  local cells, widths = {}, {}
  for c, col in ipairs(columns) do widths[c] = #col[1] end
  for r, row in ipairs(rows) do
    cells[r] = {}
    for c, col in ipairs(columns) do
      local s = compact(col[2](row)):gsub("[\r\n]+", " ")
      if #s > 60 then s = s:sub(1, 57) .. "..." end
      cells[r][c] = s
      if #s > widths[c] then widths[c] = #s end
    end
  end
  local function line(values)
    local parts = {}
    for c, col in ipairs(columns) do
      local s = values[c]
      local pad = string.rep(" ", widths[c] - #s)
      parts[c] = col[3] and pad .. s or (c < #columns and s .. pad or s)
    end
    out:write(table.concat(parts, "  "), "\n")
  end
  local headers = {}
  for c, col in ipairs(columns) do headers[c] = col[1] end
  line(headers)
  for r = 1, #rows do line(cells[r]) end
end

local function field(name)
  return function(row) return row[name] end
end

local function time_field(name)
  return function(row) return row[name] and short_time(row[name]) end
end

--- Prints one record as aligned "key  value" lines, in the given order,
-- then any other fields sorted by name.
local function print_record(out, record, order)
  local keys, seen = {}, {}
  for _, k in ipairs(order or {}) do
    if record[k] ~= nil then keys[#keys + 1], seen[k] = k, true end
  end
  local rest = {}
  for k in pairs(record) do
    if not seen[k] then rest[#rest + 1] = k end
  end
  table.sort(rest)
  for _, k in ipairs(rest) do keys[#keys + 1] = k end
  local width = 0
  for _, k in ipairs(keys) do width = math.max(width, #k) end
  for _, k in ipairs(keys) do
    local v = record[k]
    if is_time_key(k) then v = iso8601(v) end
    out:write(k, string.rep(" ", width - #k + 2), compact(v), "\n")
  end
end

---------------------------------------------------------------------------
-- Commands
---------------------------------------------------------------------------

local function login_name()
  local name = os.getenv("USER") or os.getenv("LOGNAME")
  if not name or name == "" then
    local p = io.popen("id -un 2>/dev/null")
    name = p and p:read("*l")
    if p then p:close() end
  end
  return (name and name ~= "") and name or "operator"
end

local function actor(o)
  return {operator = o.operator or login_name(), reason = o.reason}
end

local COMMAND_ORDER = {"domain", "command_id", "type", "status", "attempts", "max_attempts", "correlation_id",
                       "batch_id", "reply_to", "msg_id", "queue_name", "last_error_type", "last_error_code",
                       "last_error_msg", "created_at", "updated_at"}
local PROCESS_ORDER = {"domain", "process_id", "type", "status", "current_step", "error_code", "error_message",
                       "batch_id", "created_at", "updated_at", "completed_at", "state"}
local BATCH_ORDER = {"domain", "batch_id", "name", "status", "batch_type", "total_count", "pending_count",
                     "in_progress_count", "completed_count", "failed_count", "canceled_count",
                     "in_troubleshooting_count", "created_at", "started_at", "completed_at", "custom_data"}

local COMMAND_COLUMNS = {
  {"COMMAND", field("command_id")},
  {"TYPE", field("type")},
  {"STATUS", field("status")},
  {"ATTEMPTS", function(c) return string.format("%s/%s", c.attempts or 0, c.max_attempts or "?") end, true},
  {"UPDATED", time_field("updated_at")},
  {"ERROR", function(c) return c.last_error_code and (c.last_error_code .. ": " .. (c.last_error_msg or "")) end},
}

local function runner_id(row) return row.runner_id end

-- What a worker's retention passes removed, all kinds together.
local function removed_total(row)
  if not row.removed then return nil end
  local n = 0
  for _, v in pairs(row.removed) do n = n + v end
  return n
end

-- A schedule's timing: "*/5 * * * * (Europe/Paris)" or "every 30s".
local function schedule_timing(s)
  if s.cron then return s.timezone ~= "UTC" and ("%s (%s)"):format(s.cron, s.timezone) or s.cron end
  return ("every %ss"):format(number_json(s.every))
end

-- A schedule's pause or resume, or its removal.
local function schedule_change(method, paused)
  return function(bus, a)
    local ok, err = bus[method](bus, a.name)
    if ok == false then return nil, ("NOT_FOUND: no schedule named `%s`"):format(a.name) end
    if not ok then return nil, err end
    return {name = a.name, paused = paused, removed = method == "unschedule" or nil}
  end
end

local function heartbeat_age(row)
  return age(os.time() - math.floor(row.heartbeat_at or 0))
end

-- The options of a domain's list (commands, batches, processes), and its call.
local function filters(statuses, typed)
  return {status = one_of(statuses), type = typed and text or nil, limit = CHECKS.limit, offset = CHECKS.offset}
end

local function list_call(method)
  return function(bus, a, o)
    return bus[method](bus, {domain = a.domain, status = o.status, type = o.type, limit = o.limit, offset = o.offset})
  end
end

-- A command that makes a worker or reply router and runs it until a signal
-- stops it (run() watches SIGINT and SIGTERM, then drains).
local function foreground(make)
  return function(bus, _, o)
    local runner, err = make(bus, o)
    if not runner then return nil, err end
    local ok, rerr = runner:run()
    runner:close()
    return ok, rerr
  end
end

-- Each command: words, positional arguments, options (name -> check),
-- what it does, and how its result prints (human; JSON prints the result).
-- run(bus, a, o) returns the result or nil, err.
local COMMANDS = {
  {
    words = "queues", summary = "queues with their depth, oldest message age and messages sent",
    list = true,
    run = function(bus) return bus:queue_metrics() end,
    show = function(out, rows)
      print_table(out, {
        {"QUEUE", field("queue_name")},
        {"DEPTH", field("queue_length"), true},
        {"OLDEST", function(q) return age(q.oldest_msg_age_sec) end, true},
        {"NEWEST", function(q) return age(q.newest_msg_age_sec) end, true},
        {"SENT", field("total_messages"), true},
      }, rows, "no queues")
    end,
  },
  {
    words = "queue metrics", args = {"queue"}, summary = "one queue's depth, message ages and messages sent",
    run = function(bus, a)
      local q, err = bus:queue(a.queue)
      if not q then return nil, err end
      return q:metrics()
    end,
    order = {"queue_name", "queue_length", "oldest_msg_age_sec", "newest_msg_age_sec", "total_messages"},
  },
  {
    words = "commands", args = {"domain"}, options = filters(COMMAND_STATUSES, true),
    summary = "a domain's commands, newest first", list = true,
    run = list_call("list_commands"),
    show = function(out, rows) print_table(out, COMMAND_COLUMNS, rows, "no commands") end,
  },
  {
    words = "command show", args = {"domain", "id"}, summary = "one command",
    run = function(bus, a) return bus:get_command(a.domain, a.id) end,
    order = COMMAND_ORDER,
  },
  {
    words = "command audit", args = {"domain", "id"}, summary = "a command's audit trail, oldest first",
    list = true,
    run = function(bus, a) return bus:audit(a.domain, a.id) end,
    show = function(out, rows)
      print_table(out, {{"TIME", time_field("ts")}, {"EVENT", field("event_type")}, {"DETAILS", field("details")}},
                  rows, "no audit events")
    end,
  },
  {
    words = "batches", args = {"domain"}, options = filters(BATCH_STATUSES, false),
    summary = "a domain's batches with their progress, newest first", list = true,
    run = list_call("list_batches"),
    show = function(out, rows)
      print_table(out, {
        {"BATCH", field("batch_id")},
        {"NAME", field("name")},
        {"STATUS", field("status")},
        {"TOTAL", field("total_count"), true},
        {"DONE", field("completed_count"), true},
        {"FAILED", field("failed_count"), true},
        {"CANCELED", field("canceled_count"), true},
        {"TSQ", field("in_troubleshooting_count"), true},
        {"CREATED", time_field("created_at")},
      }, rows, "no batches")
    end,
  },
  {
    words = "batch show", args = {"domain", "id"}, summary = "one batch with exact counts",
    run = function(bus, a) return bus:get_batch(a.domain, a.id) end,
    order = BATCH_ORDER,
  },
  {
    words = "processes", args = {"domain"}, options = filters(PROCESS_STATUSES, true),
    summary = "a domain's processes (sagas), newest first", list = true,
    run = list_call("list_processes"),
    show = function(out, rows)
      print_table(out, {
        {"PROCESS", field("process_id")},
        {"TYPE", field("type")},
        {"STATUS", field("status")},
        {"STEP", field("current_step")},
        {"UPDATED", time_field("updated_at")},
        {"ERROR", function(p) return p.error_code and (p.error_code .. ": " .. (p.error_message or "")) end},
      }, rows, "no processes")
    end,
  },
  {
    words = "process show", args = {"domain", "id"}, summary = "one process",
    run = function(bus, a) return bus:get_process(a.domain, a.id) end,
    order = PROCESS_ORDER,
  },
  {
    words = "process events", args = {"domain", "id"}, options = {after = CHECKS.after},
    summary = "a process's events after #N (default 0), oldest first", list = true,
    run = function(bus, a, o) return bus:process_events(a.domain, a.id, o.after or 0) end,
    show = function(out, rows)
      print_table(out, {
        {"#", field("sequence"), true},
        {"TIME", time_field("created_at")},
        {"EVENT", field("event_type")},
        {"STEP", field("step")},
        {"STATUS", field("status")},
        {"DATA", field("data")},
      }, rows, "no events")
    end,
  },
  {
    words = "tsq list", args = {"domain"}, options = {type = text, limit = CHECKS.limit, offset = CHECKS.offset},
    summary = "commands waiting in the troubleshooting queue",
    run = function(bus, a, o)
      return bus:tsq():list{domain = a.domain, type = o.type, limit = o.limit, offset = o.offset}
    end,
    show = function(out, page, a)
      print_table(out, {
        {"COMMAND", field("command_id")},
        {"TYPE", field("type")},
        {"ATTEMPTS", function(c) return string.format("%s/%s", c.attempts or 0, c.max_attempts or "?") end, true},
        {"ERROR", function(c) return (c.last_error_code or "") .. ": " .. (c.last_error_msg or "") end},
        {"SINCE", time_field("updated_at")},
      }, page.items, "no commands in the troubleshooting queue of " .. a.domain)
      if #page.items > 0 then out:write(string.format("(%d of %d)\n", #page.items, page.total)) end
    end,
  },
  {
    words = "tsq retry", args = {"domain", "id"}, options = {operator = text, reason = text},
    summary = "send it again (attempts reset)",
    run = function(bus, a, o)
      local msg_id, err = bus:tsq():retry(a.domain, a.id, actor(o))
      return msg_id and {command_id = a.id, status = "PENDING", msg_id = msg_id}, err
    end,
    show = function(out, r) out:write("command ", r.command_id, " sent again (message ", r.msg_id, ")\n") end,
  },
  {
    words = "tsq cancel", args = {"domain", "id"}, options = {operator = text, reason = text},
    summary = "cancel it (its reply says CANCELED, with the reason)",
    run = function(bus, a, o)
      local ok, err = bus:tsq():cancel(a.domain, a.id, o.reason or "", {operator = actor(o).operator})
      return ok and {command_id = a.id, status = "CANCELED"}, err
    end,
    show = function(out, r) out:write("command ", r.command_id, " canceled\n") end,
  },
  {
    words = "tsq complete", args = {"domain", "id"}, options = {result = json_object, operator = text, reason = text},
    summary = "complete it by hand (its reply says SUCCESS, with the result)",
    run = function(bus, a, o)
      local ok, err = bus:tsq():complete(a.domain, a.id, o.result, actor(o))
      return ok and {command_id = a.id, status = "COMPLETED"}, err
    end,
    show = function(out, r) out:write("command ", r.command_id, " completed\n") end,
  },
  {
    words = "health", options = {domain = CHECKS.domain},
    summary = "workers and reply routers of every process, from their heartbeats", list = true,
    run = function(bus, _, o) return bus:runners{domain = o.domain} end,
    show = function(out, rows)
      print_table(out, {
        {"KIND", field("kind")},
        {"DOMAIN", field("domain")},
        {"RUNNER", runner_id},
        {"HOST", field("host")},
        {"PID", field("pid"), true},
        {"STATE", field("state")},
        {"LANES", field("lanes"), true},
        {"IN_FLIGHT", field("in_flight"), true},
        {"DONE", function(r) return r.successes or r.applied end, true},
        {"FAILED", field("failures"), true},
        {"RETRIED", field("retries"), true},
        {"STUCK", field("stuck"), true},
        {"SET_ASIDE", function(r) return r.poison or r.rejected end, true},
        {"REMOVED", removed_total, true},
        {"HEARTBEAT", heartbeat_age, true},
      }, rows, "no workers or reply routers have run in the last day")
    end,
  },
  {
    words = "schedules list", options = {domain = CHECKS.domain},
    summary = "schedules (of one domain, or all) with their timing and next due time, by name", list = true,
    run = function(bus, _, o) return bus:list_schedules{domain = o.domain} end,
    show = function(out, rows)
      print_table(out, {
        {"NAME", field("name")},
        {"DOMAIN", field("domain")},
        {"TYPE", field("type")},
        {"WHEN", schedule_timing},
        {"MISSED", field("missed")},
        {"STATE", function(r) return r.paused and "paused" or "active" end},
        {"NEXT_DUE", function(r) return r.paused and "-" or short_time(r.next_due_at) end},
        {"LAST_DUE", time_field("last_due_at")},
      }, rows, "no schedules")
    end,
  },
  {
    words = "schedules pause", args = {"name"}, summary = "stop sending a schedule until it is resumed",
    run = schedule_change("pause_schedule", true),
    show = function(out, r) out:write("schedule ", r.name, " paused\n") end,
  },
  {
    words = "schedules resume", args = {"name"},
    summary = "send a paused schedule again (the due times it missed go as its `missed` says)",
    run = schedule_change("resume_schedule", false),
    show = function(out, r) out:write("schedule ", r.name, " resumed\n") end,
  },
  {
    words = "schedules remove", args = {"name"}, summary = "remove a schedule and its record of sent due times",
    run = schedule_change("unschedule", nil),
    show = function(out, r) out:write("schedule ", r.name, " removed\n") end,
  },
  {
    words = "metrics", summary = "metrics in Prometheus text format (workers of every process)",
    run = function(bus, _, o)
      if o.json then return bus:metrics{all_processes = true} end
      return bus:metrics_text{all_processes = true}
    end,
    show = function(out, text_) out:write(text_) end,
  },
  {
    words = "setup", summary = "apply the schema migrations (idempotent)",
    run = function(bus)
      local ok, applied = bus:setup()
      if not ok then return nil, applied end
      return {applied = applied, schema_version = commandbus.schema_version()}
    end,
    show = function(out, r)
      out:write(string.format("schema at version %d (%d migration(s) applied now)\n", r.schema_version, r.applied))
    end,
  },
  {
    words = "worker", options = {domain = CHECKS.domain, handlers = module_name, concurrency = CHECKS.concurrency},
    required = {"domain", "handlers"}, runs = "handlers",
    summary = "run a worker in the foreground until SIGTERM or SIGINT, then drain",
    run = foreground(function(bus, o)
      return bus:worker{domain = o.domain, handlers = o.handlers, concurrency = o.concurrency}
    end),
  },
  {
    words = "reply-router", options = {domain = CHECKS.domain, managers = module_name,
      concurrency = CHECKS.concurrency},
    required = {"domain", "managers"}, runs = "managers",
    summary = "run a process reply router in the foreground until SIGTERM or SIGINT, then drain",
    run = foreground(function(bus, o)
      return bus:reply_router{domain = o.domain, managers = o.managers, concurrency = o.concurrency}
    end),
  },
}

local GLOBAL_OPTIONS = {dsn = text, json = true, help = true, version = true}

local PLACEHOLDERS = {limit = "N", offset = "N", after = "N", concurrency = "N", handlers = "MODULE",
                      managers = "MODULE", operator = "NAME", reason = "TEXT", result = "JSON"}

-- "commandbus tsq list <domain> [--limit N] ...": required options
-- first, in their order, then the others by name.
local function synopsis(c)
  local parts = {"commandbus", c.words}
  for _, a in ipairs(c.args or {}) do parts[#parts + 1] = "<" .. a .. ">" end
  local required, optional = {}, {}
  for _, name in ipairs(c.required or {}) do required[name] = true end
  for name in pairs(c.options or {}) do
    if not required[name] then optional[#optional + 1] = name end
  end
  table.sort(optional)
  local function word(name) return "--" .. name .. " " .. (PLACEHOLDERS[name] or name:upper()) end
  for _, name in ipairs(c.required or {}) do parts[#parts + 1] = word(name) end
  for _, name in ipairs(optional) do parts[#parts + 1] = "[" .. word(name) .. "]" end
  return table.concat(parts, " ")
end

local function help_text()
  local lines = {
    "usage: commandbus [--dsn DSN] [--json] <command> ...",
    "",
    "Look at a commandbus database, operate it, and run its workers.",
    "",
    "Commands:",
  }
  for _, c in ipairs(COMMANDS) do
    lines[#lines + 1] = "  " .. synopsis(c):gsub("^commandbus ", "")
    lines[#lines + 1] = "      " .. c.summary
  end
  for _, l in ipairs{
    "",
    "Options:",
    "  --dsn DSN      libpq connection string or URI (default: DATABASE_URL, then PG* variables)",
    "  --json         print one JSON document instead of tables",
    "  --operator N   who acts (default: your login name); --reason R says why",
    "  --help, -h     this help; --version: the version",
    "",
    "Statuses: commands " .. table.concat(COMMAND_STATUSES, ", "),
    "          batches " .. table.concat(BATCH_STATUSES, ", "),
    "          processes " .. table.concat(PROCESS_STATUSES, ", "),
    "Exit status: 0 done, 1 failed or refused (the error is printed), 2 usage error.",
  } do lines[#lines + 1] = l end
  return table.concat(lines, "\n") .. "\n"
end

---------------------------------------------------------------------------
-- Parsing
---------------------------------------------------------------------------

local FLAGS = {json = true, help = true, version = true}

-- Splits arguments into words and options (--name value, --name=value).
local function split(args)
  local words, options = {}, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--" then
      for j = i + 1, #args do words[#words + 1] = args[j] end
      break
    elseif a == "-h" then
      options.help = true
    elseif a:sub(1, 2) == "--" and #a > 2 then
      local name, value = a:match("^%-%-([^=]+)=(.*)$")
      name = name or a:sub(3)
      if FLAGS[name] then
        if value then usage_error("--%s takes no value", name) end
        value = true
      elseif value == nil then
        i = i + 1
        value = args[i]
        if value == nil then usage_error("--%s needs a value", name) end
      end
      if options[name] ~= nil and not FLAGS[name] then usage_error("--%s is given twice", name) end
      options[name] = value
    elseif a:match("^%-%a") then
      usage_error("unknown option %s", a)
    else
      words[#words + 1] = a
    end
    i = i + 1
  end
  return words, options
end

local function unknown_command(words)
  if #words == 0 then return "no command given" end
  local subcommands = {}
  for _, c in ipairs(COMMANDS) do
    local sub = c.words:match("^" .. escape_pattern(words[1]) .. " (%S+)$")
    if sub then subcommands[#subcommands + 1] = sub end
  end
  if #subcommands > 0 and (#words == 1 or not words[2]:match("^%a")) then
    return string.format("`%s` needs one of: %s", words[1], table.concat(subcommands, ", "))
  end
  return "unknown command `" .. table.concat(words, " ") .. "`"
end

local function find_command(words)
  for _, c in ipairs(COMMANDS) do
    local n = select(2, c.words:gsub("%S+", ""))
    if table.concat(words, " ", 1, math.min(n, #words)) == c.words and #words >= n then return c, n end
  end
end

-- Checks everything against the command; returns positional values by name
-- and options by name.
local function check(c, words, first, options)
  local a, o = {}, {}
  local args = c.args or {}
  local given = #words - first
  if given ~= #args then
    usage_error("`%s` takes %d argument(s), got %d", c.words, #args, given)
  end
  for i, name in ipairs(args) do a[name] = CHECKS[name](words[first + i], "<" .. name .. ">") end
  for name, value in pairs(options) do
    local check_value = (c.options or {})[name] or GLOBAL_OPTIONS[name]
    if not check_value then usage_error("unknown option --%s for `%s`", name, c.words) end
    o[name] = check_value == true and value or check_value(value, "--" .. name)
  end
  for _, name in ipairs(c.required or {}) do
    if o[name] == nil then usage_error("`%s` needs --%s", c.words, name) end
  end
  return a, o
end

---------------------------------------------------------------------------
-- Errors
---------------------------------------------------------------------------

--- The text with any password of dsn (or PGPASSWORD) and any password-like
-- part of a connection string replaced by ***.
function cli.redact(text_, dsn)
  text_ = tostring(text_)
  local secrets = {os.getenv("PGPASSWORD")}
  if dsn then
    secrets[#secrets + 1] = dsn:match("://[^:/@]*:([^@]*)@")
    secrets[#secrets + 1] = dsn:match("password%s*=%s*'([^']*)'") or dsn:match("password%s*=%s*([^%s']+)")
  end
  for _, s in ipairs(secrets) do
    if s and #s > 0 then text_ = text_:gsub(escape_pattern(s), "***") end
  end
  text_ = text_:gsub("(://[^:/@%s]*:)[^@%s]*@", "%1***@")
  text_ = text_:gsub("(password%s*=%s*)'[^']*'", "%1***"):gsub("(password%s*=%s*)[^%s'\"*][^%s'\"]*", "%1***")
  return text_
end

---------------------------------------------------------------------------
-- main
---------------------------------------------------------------------------

-- The handlers or managers module must load here first: a module that does
-- not would otherwise only be noticed by each lane, command after command.
local function check_module(name)
  local ok, value = pcall(require, name)
  if not ok then return nil, "cannot load module `" .. name .. "`: " .. tostring(value) end
  if type(value) ~= "table" then return nil, "module `" .. name .. "` does not return a table" end
  return true
end

--- Runs the tool with an argument list; writes to out and err (file
-- handles). Returns the exit status.
function cli.main(args, out, err)
  out, err = out or io.stdout, err or io.stderr
  local ok, words, options = pcall(split, args or {})
  local c, first, a, o
  if ok then
    c, first = find_command(words)
    if options.help then
      out:write(c and ("usage: " .. synopsis(c) .. "\n  " .. c.summary .. "\n") or help_text())
      return 0
    end
    if options.version and #words == 0 then
      out:write(string.format("commandbus %s (schema version %d)\n", commandbus._VERSION,
                              commandbus.schema_version()))
      return 0
    end
    if not c then
      ok, words = false, setmetatable({message = unknown_command(words)}, usage_mt)
    else
      ok, a, o = pcall(check, c, words, first, options)
      if not ok then words = a end
    end
  end
  if not ok then
    if getmetatable(words) ~= usage_mt then error(words, 0) end
    err:write("commandbus: ", words.message, "\n")
    err:write(c and ("usage: " .. synopsis(c) .. "\n") or "usage: commandbus [--dsn DSN] [--json] <command> ...\n")
    err:write("(commandbus --help lists every command)\n")
    return 2
  end
  if c.runs then
    local loaded, why = check_module(o[c.runs])
    if not loaded then
      err:write("commandbus: ", why, "\n")
      return 1
    end
  end

  local dsn = o.dsn or os.getenv("DATABASE_URL")
  local bus, cerr = commandbus.connect(dsn)
  if not bus then
    err:write("commandbus: ", cli.redact(cerr, dsn), "\n")
    return 1
  end
  local result, rerr = c.run(bus, a, o)
  bus:close()
  if result == nil then
    err:write("commandbus: ", cli.redact(rerr, dsn), "\n")
    return 1
  end
  if c.runs then return 0 end
  if o.json then
    out:write(type(result) == "string" and cjson.encode(result) or to_json(normalize(result), c.list), "\n")
  elseif c.show then
    c.show(out, result, a, o)
  else
    print_record(out, result, c.order)
  end
  return 0
end

return cli
