-- Handlers used by the worker specs (loaded in each lane's own Lua state).
local commandbus = require "commandbus"

local handlers = {}

function handlers.Echo(cmd)
  return {echo = cmd.data, attempt = cmd.attempt}
end

function handlers.Nothing()
  return nil
end

-- Fails transiently until the given attempt, then succeeds.
function handlers.Flaky(cmd)
  if cmd.attempt < (cmd.data.succeed_on or 2) then
    error(commandbus.transient("FLAKY", "not yet (attempt " .. cmd.attempt .. ")"))
  end
  return {attempt = cmd.attempt}
end

function handlers.AlwaysTransient()
  error("plain Lua error counts as transient")
end

function handlers.Permanent()
  error(commandbus.permanent("BROKEN", "cannot ever work", {hint = "fix the data"}))
end

function handlers.Refuse(cmd)
  error(commandbus.business_rule("NO_FUNDS", "balance too low", {balance = cmd.data.balance}))
end

function handlers.Slow(cmd)
  local socket = require "socket"
  socket.sleep(cmd.data.seconds or 1)
  return {slept = cmd.data.seconds}
end

function handlers.Extend(cmd, ctx)
  assert(ctx:extend_visibility(60))
  return {extended = true}
end

-- Error objects that raise when read: a "strict" object whose metatable
-- refuses unknown fields, and one whose __tostring fails. Neither may take
-- the worker down; each counts as a transient HANDLER_ERROR.
function handlers.StrictError()
  error(setmetatable({}, {__index = function(_, k) error("no field " .. tostring(k)) end}))
end

function handlers.BadTostring()
  error(setmetatable({}, {__tostring = function() error("cannot say") end}))
end

return handlers
