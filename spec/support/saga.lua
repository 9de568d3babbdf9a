-- A three-step order saga for the reply router specs: reserve -> charge ->
-- ship, with reserve undone by release. The command handlers below are the
-- other side (the worker's module).
local commandbus = require "commandbus"

local saga = {}

saga.Order = commandbus.process.define{
  type = "Order", domain = "saga_spec_placeholder", -- replaced per test by saga.for_domain
  first_step = function() return "reserve" end,
  build_command = function(step, state)
    local types = {reserve = "Reserve", charge = "Charge", ship = "Ship", release = "Release"}
    return {type = types[step], data = {order = state.order, fail = state.fail}}
  end,
  update_state = function(state, step, reply)
    state.done = state.done or {}
    state.done[#state.done + 1] = step
    if step == "charge" then state.charged = reply.result and reply.result.amount end
    return state
  end,
  next_step = function(step)
    if step == "reserve" then return "charge" elseif step == "charge" then return "ship" end
  end,
  compensation_step = function(step)
    if step == "reserve" then return "release" end
  end,
}

--- The same definition for another domain (specs use one domain each).
function saga.for_domain(domain)
  local d = {}
  for k, v in pairs(saga.Order) do d[k] = v end
  d.domain = domain
  d.reply_queue = nil
  return commandbus.process.define{type = d.type, domain = domain, first_step = d.first_step,
    build_command = d.build_command, update_state = d.update_state, next_step = d.next_step,
    compensation_step = d.compensation_step}
end

-- Managers table for the reply router's lanes: process type -> definition.
-- (The domain in the definition is not used by the router.)
saga.managers = {Order = saga.Order}

-- Command handlers for the worker.
saga.handlers = {
  Reserve = function(cmd) return {reserved = cmd.data.order} end,
  Charge = function(cmd)
    if cmd.data.fail == "charge" then error(commandbus.business_rule("DECLINED", "card declined")) end
    if cmd.data.fail == "charge_tsq" then error(commandbus.permanent("GATEWAY_BROKEN", "the gateway answers nonsense")) end
    return {amount = 42}
  end,
  Ship = function() return {shipped = true} end,
  Release = function(cmd) return {released = cmd.data.order} end,
}

--- Runs workers and a reply router (table mode, this thread) until the
-- domain's command and reply queues are both empty; returns the router's
-- last health. options: managers (module name), vt, st (router timeouts).
function saga.settle(bus, domain, options)
  options = options or {}
  local commands = assert(bus:queue(domain .. "__commands"))
  local replies = assert(bus:queue(domain .. "__process_replies"))
  local router_health
  for _ = 1, 30 do
    local worker = assert(bus:worker{domain = domain, handlers = "spec.support.saga_handlers", concurrency = 2,
                                     poll_interval = 0.05})
    worker:run{tick_interval = 0.05, tick = function() return assert(commands:metrics()).queue_length > 0 end}
    worker:close()
    local router = assert(bus:reply_router{domain = domain, managers = options.managers or "spec.support.saga_managers",
                                           concurrency = 2, poll_interval = 0.05,
                                           visibility_timeout = options.vt or 30, statement_timeout = options.st or 25})
    router:run{tick_interval = 0.05, tick = function() return assert(replies:metrics()).queue_length > 0 end}
    router_health = router:health()
    router:close()
    if assert(commands:metrics()).queue_length == 0 and assert(replies:metrics()).queue_length == 0 then break end
  end
  return router_health
end

return saga
