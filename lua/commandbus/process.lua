--- commandbus.process: long-running processes (sagas) driven by commands.
--
--   local process = require "commandbus.process"   -- also commandbus.process
--   local orders = process.define{
--     type = "OrderFulfilment", domain = "orders",
--     first_step = function(state) return "reserve" end,
--     build_command = function(step, state) return {type = "Reserve", data = {sku = state.sku}} end,
--     update_state = function(state, step, reply) state.reserved = true; return state end,
--     next_step = function(step, reply, state) if step == "reserve" then return "charge" end end,
--     compensation_step = function(step, state) if step == "charge" then return "release" end end,
--   }
--   local process_id, err = orders:start(bus, {sku = "A-1"})
--
-- A process is a row (status, current step, state as a JSON object); each step
-- sends one command whose correlation_id is the process id and whose reply_to
-- is the process's reply queue (`<domain>__process_replies` unless told), so
-- that the reply router can find the process again. Misuse raises; runtime
-- failures return nil, err.
local M = {
  _VERSION = require("commandbus.core")._VERSION,
}

local type, error, pairs, setmetatable = type, error, pairs, setmetatable
local format = string.format

-- bus.h: a domain fits "<domain>__commands" in pgmq's 47-byte queue names.
local QUEUE_NAME_MAX = 47
local DOMAIN_MAX = QUEUE_NAME_MAX - 10

local HOOKS = {"first_step", "build_command", "update_state", "next_step"}
local OPTIONAL_HOOKS = {"compensation_step"}
local FIELDS = {type = true, domain = true, reply_queue = true}
for _, name in pairs(HOOKS) do FIELDS[name] = true end
for _, name in pairs(OPTIONAL_HOOKS) do FIELDS[name] = true end

local function is_name(s, max)
  return #s <= max and s:match("^[a-z_][a-z0-9_]*$") ~= nil
end

local function bad_field(field, expected, value, level)
  error(format("bad argument #1 to 'define' (field '%s': %s expected, got %s)", field, expected, type(value)),
        level + 1)
end

local manager_mt = {}
manager_mt.__index = manager_mt

--- Defines a process type; returns its manager (the definition, checked,
-- with start()). Raises on a missing or mistyped field, an unknown field
-- (a misspelt hook would otherwise never run) or an invalid name.
function M.define(definition)
  if type(definition) ~= "table" then
    error("bad argument #1 to 'define' (table expected, got " .. type(definition) .. ")", 2)
  end
  for k in pairs(definition) do
    if not FIELDS[k] then error(format("bad argument #1 to 'define' (unknown field '%s')", tostring(k)), 2) end
  end
  local process_type, domain = definition.type, definition.domain
  if type(process_type) ~= "string" or process_type == "" then bad_field("type", "non-empty string", process_type, 2) end
  if type(domain) ~= "string" then bad_field("domain", "string", domain, 2) end
  if not is_name(domain, DOMAIN_MAX) then
    error(format("bad argument #1 to 'define' (invalid domain `%s`: use at most %d lower-case letters, digits"
                 .. " and _, not starting with a digit)", domain, DOMAIN_MAX), 2)
  end
  local reply_queue = definition.reply_queue
  if reply_queue == nil then reply_queue = domain .. "__process_replies" end
  if type(reply_queue) ~= "string" then bad_field("reply_queue", "string", reply_queue, 2) end
  if not is_name(reply_queue, QUEUE_NAME_MAX) then
    error(format("bad argument #1 to 'define' (invalid reply_queue `%s`: a queue name has at most %d lower-case"
                 .. " letters, digits and _%s)", reply_queue, QUEUE_NAME_MAX,
                 definition.reply_queue == nil and "; give a shorter domain or a reply_queue" or ""), 2)
  end
  local manager = {type = process_type, domain = domain, reply_queue = reply_queue}
  for _, name in pairs(HOOKS) do
    local hook = definition[name]
    if type(hook) ~= "function" then bad_field(name, "function", hook, 2) end
    manager[name] = hook
  end
  for _, name in pairs(OPTIONAL_HOOKS) do
    local hook = definition[name]
    if hook ~= nil and type(hook) ~= "function" then bad_field(name, "function", hook, 2) end
    manager[name] = hook
  end
  return setmetatable(manager, manager_mt)
end

--- The command a step sends, from the definition's build_command, checked.
-- Raises when the hook returns something that is not a command.
function manager_mt:command_for(step, state, level)
  local command = self.build_command(step, state)
  if type(command) ~= "table" then
    error(format("process %s: build_command(%q) must return a command table {type=, data=}, got %s", self.type,
                 step, type(command)), (level or 1) + 1)
  end
  if type(command.type) ~= "string" then
    error(format("process %s: build_command(%q) returned a command without a string type (got %s)", self.type,
                 step, type(command.type)), (level or 1) + 1)
  end
  if command.data ~= nil and type(command.data) ~= "table" then
    error(format("process %s: build_command(%q) returned data of type %s (table expected)", self.type, step,
                 type(command.data)), (level or 1) + 1)
  end
  return command
end

--- Starts a process: runs first_step(state) and build_command(step, state),
-- then writes in ONE transaction the process row (WAITING at the first step,
-- with the state), the step's command (correlation_id = the process id,
-- reply_to = the reply queue) and its process_audit row.
-- @param bus a connected bus
-- @param initial_state a table (JSON object), or nil for {}
-- @param options {batch_id = uuid} (optional)
-- @return process_id (a UUIDv7 string) | nil, err
function manager_mt:start(bus, initial_state, options)
  if type(bus) ~= "userdata" and type(bus) ~= "table" then
    error("bad argument #1 to 'start' (bus expected, got " .. type(bus) .. ")", 2)
  end
  if initial_state ~= nil and type(initial_state) ~= "table" then
    error("bad argument #2 to 'start' (table expected, got " .. type(initial_state) .. ")", 2)
  end
  if options ~= nil and type(options) ~= "table" then
    error("bad argument #3 to 'start' (table expected, got " .. type(options) .. ")", 2)
  end
  local batch_id = options and options.batch_id
  if batch_id ~= nil and type(batch_id) ~= "string" then
    error("bad argument #3 to 'start' (field 'batch_id': string expected, got " .. type(batch_id) .. ")", 2)
  end
  local state = initial_state or {}
  local step = self.first_step(state)
  if type(step) ~= "string" or step == "" then
    error(format("process %s: first_step must return a step name (non-empty string), got %s", self.type,
                 type(step)), 2)
  end
  local command = self:command_for(step, state, 2)
  -- Only the id: a second value on success would read as an error to
  -- `local id, err = ...; if err then` callers. The audit has the command.
  local process_id, err = bus:process_start{
    domain = self.domain,
    type = self.type,
    step = step,
    state = state,
    reply_to = self.reply_queue,
    batch_id = batch_id,
    command = command,
  }
  if process_id == nil then return nil, err end
  return process_id
end

local function text(value)
  if type(value) == "string" then return value end
  return nil
end

--- What a reply means for its process: the reply router's lanes call this.
-- p: {status=, step= (the step the reply answers), state=, completed_steps=
-- {steps answered SUCCESS, in order}}; reply: the reply message.
-- Returns {status=, step=, state=, command={type=, data=} or nil,
-- error_code=, error_message=}.
--
-- SUCCESS: update_state, then next_step's command, or COMPLETED.
-- FAILED / CANCELED: compensation steps for the completed steps in reverse
-- order, one at a time (status COMPENSATING; the steps still to undo and the
-- failure ride in the state under `_compensating` and `_failure`), ending
-- COMPENSATED; with nothing to compensate, FAILED or CANCELED.
function M.decide(manager, p, reply)
  local state = p.state or {}
  local step = p.step
  -- A reply's text fields, when they are text: a peer may send null (cjson.null).
  local error_code, error_message, reason = text(reply.error_code), text(reply.error_message), text(reply.reason)
  local function compensate(remaining, final_status, failure)
    while #remaining > 0 do
      local done = table.remove(remaining, 1)
      local comp = manager.compensation_step and manager.compensation_step(done, state)
      if comp then
        state._compensating, state._failure = remaining, failure
        return {status = "COMPENSATING", step = comp, state = state, command = manager:command_for(comp, state, 3),
                error_code = failure.code, error_message = failure.message}
      end
    end
    state._compensating, state._failure = nil, nil
    return {status = final_status, step = step, state = state, error_code = failure.code,
            error_message = failure.message}
  end
  if p.status == "COMPENSATING" then
    local failure = state._failure or {}
    if reply.outcome ~= "SUCCESS" then
      state._compensating, state._failure = nil, nil
      return {status = "FAILED", step = step, state = state, error_code = "COMPENSATION_FAILED",
              error_message = (error_message or reason or "a compensation step failed")
                              .. " (while undoing: " .. tostring(failure.message) .. ")"}
    end
    return compensate(state._compensating or {}, "COMPENSATED", failure)
  end
  if reply.outcome == "SUCCESS" then
    state = manager.update_state(state, step, reply) or state
    local following = manager.next_step(step, reply, state)
    if following then
      return {status = "WAITING", step = following, state = state, command = manager:command_for(following, state, 3)}
    end
    return {status = "COMPLETED", step = step, state = state}
  end
  local canceled = reply.outcome == "CANCELED"
  local failure = {code = error_code or (canceled and "CANCELED" or "FAILED"),
                   message = error_message or reason or (canceled and "the step was canceled")
                             or "the step failed"}
  local undo = {}
  local completed = p.completed_steps or {}
  for i = #completed, 1, -1 do undo[#undo + 1] = completed[i] end
  return compensate(undo, canceled and "CANCELED" or "FAILED", failure)
end

return M
