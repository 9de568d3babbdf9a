-- commandbus.ngx's life inside a real nginx: one bus per nginx worker
-- process whatever the number of requests, a clear error before the fork,
-- and nothing left behind by reloads and quits.
local ngx_world = require "spec.support.ngx_world"
local helper = require "spec.helper"
local world = require "spec.support.world"

local connections, wait_until = ngx_world.connections, ngx_world.wait_until

describe("commandbus.ngx's life in nginx", function()
  local bus, domain, app_name

  setup(function() bus = world.bus() end)
  teardown(function() bus:close() end)

  before_each(function()
    domain = world.domain()
    app_name = helper.unique("cbngx")
  end)

  it("keeps one bus per nginx worker: pool_size connections (and the LISTEN one) after 200 concurrent requests",
     function()
    local workers, pool_size = 2, 2
    local server = ngx_world.start{workers = workers, pool_size = pool_size, application_name = app_name}
    finally(function() server:stop() end)
    wait_until("both workers connected", function() return connections(app_name) == workers * (pool_size + 1) end)
    local threads = server:threads()
    local ids, requests = {}, {}
    for i = 1, 50 do ids[i] = assert(bus:send{domain = domain, type = "Echo"}).command_id end
    for i = 1, 200 do
      requests[i] = i <= 50 and server:open("GET", ("/await?domain=%s&id=%s&timeout=1"):format(domain, ids[i]))
                    or server:open("POST", "/send?domain=" .. domain)
    end
    for i = 1, 200 do
      local status, body = requests[i]:finish()
      assert.are.equal(200, status, body)
      if i <= 50 then assert.are.equal("TIMEOUT\n", body) end -- no worker runs
    end
    assert.are.equal(150 + 50, #assert(bus:list_commands{domain = domain, limit = 1000}))
    assert.are.equal(workers * (pool_size + 1), connections(app_name))
    -- and at most one send connection per worker (made by its first send)
    local sending = connections(app_name .. ":send")
    assert.is_true(sending >= 1 and sending <= workers, sending .. " send connections")
    assert.are.equal(threads, server:threads()) -- no thread per Lua VM either
    assert.are.same({}, server:errors())
  end)

  it("refuses a bus from init_by_lua at once, and quits cleanly", function()
    local server = ngx_world.start{
      init = ([[
        local bus, err = require("commandbus.ngx").connect()
        INIT_ADAPTER = bus and "connected" or tostring(err)
        -- The plain API connects, in nginx's master process, before the fork.
        INIT_PLAIN_BUS = assert(require("commandbus").connect(nil, {application_name = %q}))
      ]]):format(app_name),
      server = [[
        location = /init_adapter { content_by_lua_block { ngx.say(INIT_ADAPTER) } }
        location = /init_plain { content_by_lua_block {
          local res, err = INIT_PLAIN_BUS:get_command("d", "01900000-0000-7000-8000-000000000000")
          ngx.say(res and "answered" or tostring(err))
        } }
      ]],
    }
    finally(function() server:stop() end)
    local status, body = server:request("GET", "/init_adapter")
    assert.are.equal(200, status)
    assert.matches("^INVALID_STATE: commandbus.ngx: the bus cannot be used in init_by_lua", body)
    status, body = server:open("GET", "/init_plain"):finish(10) -- a hang would end in nil here
    assert.are.equal(200, status)
    assert.matches("^INVALID_STATE: this bus was connected in process %d+ and cannot be used in process %d+", body)
    assert.matches("init_worker_by_lua", body)
    assert.is_true(server:quit(20))
    assert.is_nil(server:log():match("signal 9"))
    assert.are.same({}, server:errors())
    wait_until("the master's connections closed", function() return connections(app_name) == 0 end)
  end)

  it("drains a worker running inside nginx when nginx quits", function()
    local server = ngx_world.start{workers = 1, worker_domain = domain}
    finally(function() server:stop() end)
    local slow = assert(bus:send{domain = domain, type = "Slow", data = {seconds = 1}})
    wait_until("the worker took the command", function()
      return assert(bus:get_command(domain, slow.command_id)).status == "IN_PROGRESS"
    end)
    assert.is_true(server:quit(30))
    assert.are.equal("COMPLETED", assert(bus:get_command(domain, slow.command_id)).status)
    assert.are.same({}, server:errors())
  end)

  -- lua-nginx-module makes a placeholder connection (fd -2) on a worker's
  -- first ngx.timer.at and closes it when the worker starts shutting down;
  -- one made later stays open, and the worker ends with the alerts "open
  -- socket #-2 left in connection 0" and "aborting". Under load, a new
  -- worker's first call can come after a reload's signal (its request read
  -- just before). Here the request waits until the worker shuts down, then
  -- calls: a send (batched: its own timer) or another call.
  for _, call in ipairs{"send", "get_command"} do
    it(("answers a %s that is a worker's first call and comes once the worker shuts down, and exits cleanly")
       :format(call), function()
      local server = ngx_world.start{workers = 1, server = [[
        location = /when_exiting { content_by_lua_block {
          ngx.shared.results:set("waiting", true)
          while not ngx.worker.exiting() do ngx.sleep(0.01) end
          ngx.exec("/" .. ngx.var.arg_call, ngx.var.args)
        } }
        location = /waiting { content_by_lua_block { ngx.say(ngx.shared.results:get("waiting") and "yes" or "no") } }
        location = /get_command { content_by_lua_block {
          local bus = require("spec.support.ngx_app").bus()
          local cmd, err = bus:get_command(ngx.var.arg_domain, "01900000-0000-7000-8000-000000000000")
          ngx.say(cmd and "found" or err.code)
        } }
      ]]}
      finally(function() server:stop() end)
      local pending = server:open("POST", ("/when_exiting?call=%s&domain=%s"):format(call, domain))
      wait_until("the request waits", function() return select(2, server:request("GET", "/waiting")) == "yes\n" end)
      assert.is_true(server:quit(30))
      local status, body = pending:finish(10)
      assert.are.equal(200, status, body)
      if call == "send" then
        assert.are.equal(1, #assert(bus:list_commands{domain = domain, limit = 10}))
      else
        assert.are.equal("NOT_FOUND\n", body)
      end
      assert.are.same({}, server:errors())
    end)
  end

  it("leaves no connection, thread or error behind after 20 reloads under load, nor after quit", function()
    local workers, pool_size = 2, 2
    local server = ngx_world.start{workers = workers, pool_size = pool_size, application_name = app_name,
                                   worker_domain = domain}
    local wrk, out, pidfile
    finally(function() -- (one finally per test: a second would replace it)
      if wrk then os.execute("kill " .. wrk .. " 2>/dev/null") end
      if out then os.remove(out) end
      if pidfile then os.remove(pidfile) end
      server:stop()
    end)
    local expected = workers * (pool_size + 1)
    wait_until("both workers connected", function() return connections(app_name) == expected end)
    -- The background worker's lane threads start after its connections are
    -- made: counted once it has handled a command (counted before them,
    -- nginx worker 0's lanes after the reloads were "extra", under load).
    local first = assert(bus:send{domain = domain, type = "Echo"})
    wait_until("the background worker handled a command", function()
      return assert(bus:get_command(domain, first.command_id)).status == "COMPLETED"
    end)
    local threads = server:threads()
    out, pidfile = os.tmpname(), os.tmpname()
    os.execute(("wrk -t1 -c8 -d120s 'http://127.0.0.1:%d/send?domain=%s' >%s 2>&1 & echo $! >%s")
               :format(server.port, domain, out, pidfile))
    local f = io.open(pidfile)
    wrk = f:read("*n")
    f:close()
    wait_until("load arrives", function() return #assert(bus:list_commands{domain = domain, limit = 10}) >= 10 end)
    for i = 1, 20 do assert.is_true(server:reload(30), "reload " .. i) end
    os.execute("kill -INT " .. wrk) -- wrk prints its summary
    wait_until("wrk's summary", function()
      local summary = io.open(out):read("*a")
      return summary:match("Requests/sec") ~= nil
    end)
    local summary = io.open(out):read("*a")
    assert.is_nil(summary:match("Non%-2xx"), summary) -- every send under the reloads answered 200
    wait_until("the old workers' sessions ended", function() return connections(app_name) == expected end)
    wait_until("the old workers' send connections ended",
               function() return connections(app_name .. ":send") <= workers end)
    -- No extra thread: a new nginx worker that has had no request since the
    -- last reload has not started its bus yet, so it may hold fewer.
    wait_until(function()
      local now, each = server:threads()
      return ("no more threads than before (%d before, %d now: %s)"):format(threads, now, each)
    end, function() return server:threads() <= threads end)
    assert.are.same({}, server:errors())
    assert.is_true(server:quit(30))
    wait_until("every session ended", function()
      return connections(app_name) == 0 and connections(app_name .. ":send") == 0
    end)
    assert.are.same({}, server:errors())
  end)
end)
