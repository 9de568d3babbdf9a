-- The command-line tool, driven through cli.main with captured output.
local cjson = require "cjson"
local commandbus = require "commandbus"
local cli = require "commandbus.cli"
local helper = require "spec.helper"

local function run(args)
  local out, err = io.tmpfile(), io.tmpfile()
  local status = cli.main(args, out, err)
  out:seek("set")
  err:seek("set")
  local o, e = out:read("*a"), err:read("*a")
  out:close()
  err:close()
  return status, o, e
end

describe("commandbus CLI", function()
  local bus, domain, id
  before_each(function()
    bus = helper.bus()
    assert(bus:setup())
    domain = helper.unique("cli")
    id = assert(bus:send{domain = domain, type = "Broken", reply_to = domain .. "__replies"}).command_id
    local worker = assert(bus:worker{domain = domain, poll_interval = 0.05, handlers = {
      Broken = function() error(commandbus.permanent("BROKEN", "cannot")) end}})
    local q = assert(bus:queue(domain .. "__commands"))
    worker:run{tick_interval = 0.05, tick = function() return assert(q:metrics()).queue_length > 0 end}
    worker:close()
  end)
  after_each(function() bus:close() end)

  it("lists the troubleshooting queue as JSON", function()
    local status, out = run{"tsq", "list", domain}
    assert.equal(0, status)
    local page = cjson.decode(out)
    assert.equal(1, page.total)
    assert.equal(id, page.items[1].command_id)
    assert.equal("BROKEN", page.items[1].last_error_code)
  end)

  it("completes a command by hand with a JSON result, and the bus sees it", function()
    local status = run{"tsq", "complete", domain, id, "--result", '{"refunded": true}', "--operator", "ada"}
    assert.equal(0, status)
    assert.equal("COMPLETED", assert(bus:get_command(domain, id)).status)
    local status2, out = run{"command", "audit", domain, id}
    assert.equal(0, status2)
    local events = cjson.decode(out)
    assert.equal("OPERATOR_COMPLETE", events[#events].event_type)
    assert.equal("ada", events[#events].details.operator)
  end)

  it("exits 1 with the error for a refused action", function()
    assert.equal(0, (run{"tsq", "cancel", domain, id, "--reason", "no"}))
    local status, _, err = run{"tsq", "retry", domain, id}
    assert.equal(1, status)
    assert.matches("INVALID_STATE", err)
  end)

  it("exits 2 with the usage for a wrong command or a bad --result", function()
    local status, _, err = run{"nonsense"}
    assert.equal(2, status)
    assert.matches("usage", err)
    assert.equal(2, (run{"tsq", "complete", domain, id, "--result", "not json"}))
  end)
end)
