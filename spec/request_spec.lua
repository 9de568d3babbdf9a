-- bus:request: a send whose transaction registers its caller as the
-- command's waiter, then the await, in one call.
local helper = require "spec.helper"

local sql = helper.sql

local function waiters(domain, id)
  return tonumber(sql(("SELECT count(*) FROM commandbus.awaiter WHERE domain = '%s'%s")
                      :format(domain, id and (" AND id = '%s'"):format(id) or "")):match("%d+"))
end

describe("request", function()
  local bus
  before_each(function() bus = helper.bus() assert(bus:setup()) end)
  after_each(function() bus:close() end)

  it("returns the completed command once a worker in another process completes it", function()
    local domain = helper.unique("rq")
    assert(bus:queue(domain .. "__commands")) -- the worker starts on an existing queue
    local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
    local worker = io.popen(("%s spec/support/request_worker.lua %s 3"):format(lua, domain))
    assert.equal("ready", worker:read("*l"))
    for i = 1, 3 do
      -- The worker completes it only if the waiter was registered when it
      -- received the command: by the send's own transaction.
      local cmd, err = bus:request{domain = domain, type = "Registered", data = {i = i}, timeout = 30}
      assert.is_nil(err)
      assert.equal("COMPLETED", cmd.status)
      assert.equal("Registered", cmd.type)
      assert.equal(1, cmd.attempts)
      -- The read that returned removed the registration.
      assert.equal(0, waiters(domain, cmd.command_id))
    end
    worker:close()
  end)

  it("times out with TIMEOUT, the command sent and no waiter left", function()
    local domain = helper.unique("rq")
    local cmd, err = bus:request{domain = domain, type = "Never", timeout = 0.2}
    assert.is_nil(cmd)
    assert.equal("TIMEOUT", err.code)
    assert.equal("PENDING", assert(bus:get_command(domain, err.command_id)).status)
    helper.wait_until(function() return waiters(domain) == 0 end, 10)
    -- It can still be awaited.
    local _, again = bus:await(domain, err.command_id, {timeout = 0.1})
    assert.equal("TIMEOUT", again.code)
  end)

  it("writes and registers nothing when the send is refused", function()
    local domain = helper.unique("rq")
    local held = assert(bus:send{domain = domain, type = "Work", dedup_key = "k", dedup_for = 60})
    local cmd, err = bus:request{domain = domain, type = "Work", id = held.command_id, timeout = 5}
    assert.is_nil(cmd)
    assert.equal("DUPLICATE_COMMAND", err.code)
    assert.equal(held.command_id, err.command_id)
    cmd, err = bus:request{domain = domain, type = "Work", dedup_key = "k", dedup_for = 60, timeout = 5}
    assert.is_nil(cmd)
    assert.equal("DUPLICATE_COMMAND", err.code)
    assert.equal(held.command_id, err.command_id)
    assert.equal(0, waiters(domain))
    assert.equal(1, #assert(bus:list_commands{domain = domain}))
    cmd, err = bus:request{domain = "Not A Domain", type = "Work"}
    assert.is_nil(cmd)
    assert.equal("INVALID_ARGUMENT", err.code)
    assert.has_error(function() bus:request{domain = domain, type = 5} end)
    assert.has_error(function() bus:request{domain = domain, type = "Work", timeout = "soon"} end)
    assert.has_error(function() bus:request{domain = domain, type = "Work", listen = "no"} end)
    assert.has_error(function() bus:request("not a table") end)
    assert.equal(0, waiters(domain))
  end)

  it("without LISTEN, sends without registering and finds the outcome by polling", function()
    local domain = helper.unique("rq")
    local id = "01900000-0000-7000-8000-0000000000cc"
    -- Completed behind its back (psql) once it is there.
    os.execute(("(for i in $(seq 200); do psql -qAt %q -c \"UPDATE commandbus.command SET status = 'COMPLETED'"
                .. " WHERE domain = '%s' AND command_id = '%s' RETURNING 1\" | grep -q 1 && break; sleep 0.05; done)"
                .. " >/dev/null 2>&1 &"):format(os.getenv("DATABASE_URL"), domain, id))
    local cmd = assert(bus:request{domain = domain, type = "Manual", id = id, timeout = 20, listen = false})
    assert.equal("COMPLETED", cmd.status)
    assert.equal(0, waiters(domain))
  end)

end)
