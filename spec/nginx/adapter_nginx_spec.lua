-- commandbus.ngx inside a real nginx (Debian's nginx + libnginx-mod-http-lua),
-- started by the spec on a free loopback port: each call from a content
-- handler answers what the plain API answers, errors included, and nginx
-- keeps serving while calls wait.
local ngx_world = require "spec.support.ngx_world"
local saga = require "spec.support.saga"
local world = require "spec.support.world"

local via_nginx, via_plain = ngx_world.via_nginx, ngx_world.via_plain

local UNKNOWN_ID = "01900000-0000-7000-8000-000000000000"

describe("commandbus.ngx in one nginx worker", function()
  local bus, server, domain

  setup(function()
    bus = world.bus()
    server = ngx_world.start{workers = 1, pool_size = 1} -- one send on its way at a time: the others gather
  end)

  teardown(function()
    server:stop()
    bus:close()
  end)

  before_each(function() domain = world.domain() end)

  after_each(function() assert.are.same({}, server:errors()) end)

  -- Runs the plain worker (this thread) until the domain's queue is empty.
  local function settle()
    local w = assert(bus:worker(world.options(domain)))
    world.run(w, function() return #assert(bus:list_commands{domain = domain, status = "PENDING"}) == 0 end)
    w:close()
  end

  it("reads what the plain API reads", function()
    local sent = assert(bus:send{domain = domain, type = "Echo", data = {n = 1}})
    local batch = assert(bus:create_batch{domain = domain, name = "b", commands = {{type = "Echo"}}})
    local process_domain = world.domain() -- left unhandled: settle() runs Echo handlers only
    local process_id = assert(saga.for_domain(process_domain):start(bus, {order = 7}))
    settle()
    local calls = {
      {"setup"},
      {"get_command", {domain, sent.command_id}},
      {"list_commands", {{domain = domain}}},
      {"audit", {domain, sent.command_id}},
      {"get_batch", {domain, batch.batch_id}},
      {"list_batches", {{domain = domain}}},
      {"tsq_list", {{domain = domain}}},
      {"get_process", {process_domain, process_id}},
      {"list_processes", {{domain = process_domain}}},
      {"process_audit", {process_domain, process_id}},
      {"process_events", {process_domain, process_id, 0}},
      {"await", {domain, sent.command_id, {timeout = 5}}},
      {"await_event", {process_domain, process_id, "STARTED", 0, {timeout = 5}}},
    }
    for _, c in ipairs(calls) do
      local expected = via_plain(bus, c[1], c[2])
      assert.is_nil(expected.err, c[1])
      assert.are.same(expected, via_nginx(server, c[1], c[2]), c[1])
    end
  end)

  it("gives the plain API's errors: NOT_FOUND, TIMEOUT, DUPLICATE_COMMAND, INVALID_ARGUMENT", function()
    local pending_cmd = assert(bus:send{domain = domain, type = "Echo"})
    local fixed = assert(bus:send{domain = domain, type = "Echo", id = "01900000-0000-7000-8000-0000000000aa"})
    local process_id = assert(saga.for_domain(domain):start(bus, {order = 1}))
    local calls = {
      NOT_FOUND = {"get_command", {domain, UNKNOWN_ID}},
      TIMEOUT = {"await", {domain, pending_cmd.command_id, {timeout = 0.2}}},
      DUPLICATE_COMMAND = {"send", {{domain = domain, type = "Echo", id = fixed.command_id}}},
      INVALID_ARGUMENT = {"get_command", {domain, "not-a-uuid"}},
    }
    local more = {
      {"await_process", {domain, process_id, {timeout = 0.2}}, "TIMEOUT"},
      {"await_process", {domain, UNKNOWN_ID, {timeout = 1}}, "NOT_FOUND"},
      {"tsq_retry", {domain, pending_cmd.command_id}, "INVALID_STATE"},
      {"send", {{domain = "Not A Domain", type = "Echo"}}, "INVALID_ARGUMENT"},
      {"request", {{domain = domain, type = "Echo", id = fixed.command_id, timeout = 1}}, "DUPLICATE_COMMAND"},
    }
    for code, c in pairs(calls) do more[#more + 1] = {c[1], c[2], code} end
    for _, c in ipairs(more) do
      local expected = via_plain(bus, c[1], c[2])
      assert.are.equal(c[3], expected.err and expected.err.code, c[1])
      local got = via_nginx(server, c[1], c[2])
      assert.are.same(expected, got, c[1])
      assert.is_true(got.err.has_metatable) -- tostring(err) reads as the plain API's
    end
  end)

  it("raises on a wrong argument type with the plain API's message", function()
    local _, expected = pcall(function() bus:send(5) end)
    local got = via_nginx(server, "send", {5})
    assert.are.equal((expected:gsub("^[^:]+:%d+: ", "")), (got.raised:gsub("^[^:]+:%d+: ", "")))
    assert.matches("bad argument #1 to 'send' %(table expected, got number%)", got.raised)
  end)

  it("writes what the plain API writes", function()
    local sent = via_nginx(server, "send", {{domain = domain, type = "Echo", data = {n = 1}}})
    local id = sent.results[1].command_id
    assert.are.equal("number", type(sent.results[1].msg_id))
    assert.are.equal("PENDING", assert(bus:get_command(domain, id)).status)

    local batch = via_nginx(server, "send_batch", {{domain = domain, commands = {{type = "Echo"}, {type = "Echo"}}}})
    assert.are.equal(2, #batch.results[1])
    local tracked = via_nginx(server, "create_batch", {{domain = domain, name = "n", commands = {{type = "Echo"}}}})
    assert.are.equal(1, assert(bus:get_batch(domain, tracked.results[1].batch_id)).total_count)
    assert.are.equal(4, #assert(bus:list_commands{domain = domain}))

    -- A process started from nginx: its hooks run in the request's VM.
    local status, process_id = server:request("GET", "/start_process?domain=" .. domain)
    assert.are.equal(200, status)
    process_id = process_id:gsub("%s", "")
    assert.are.equal("WAITING", assert(bus:get_process(domain, process_id)).status)
    local appended = via_nginx(server, "append_process_event", {domain, process_id, "label_printed", {p = 1}})
    local events = assert(bus:process_events(domain, process_id, 0))
    assert.are.equal(events[#events].sequence, appended.results[1])
    assert.are.equal(0, via_nginx(server, "purge_processes", {{domain = domain, older_than = 0}}).results[1])
  end)

  it("sends that arrive together share a transaction, and each gets its own answer", function()
    local cjson = require("cjson").new()
    local taken = assert(bus:send{domain = domain, type = "Echo"}).command_id
    local function send_all(commands)
      local pending, answers = {}, {}
      for i, command in ipairs(commands) do
        pending[i] = server:open("POST", "/call", cjson.encode{method = "send", args = {command}, n = 1})
      end
      for i, p in ipairs(pending) do
        local status, body = p:finish()
        assert.are.equal(200, status)
        answers[i] = cjson.decode(body)
      end
      return answers
    end
    local function transactions()
      return tonumber(require("spec.helper").sql(("SELECT count(DISTINCT xmin::text) FROM commandbus.command"
                                                  .. " WHERE domain = '%s'"):format(domain)):match("%d+"))
    end
    local commands = {}
    for i = 1, 39 do commands[i] = {domain = domain, type = "Echo", data = {n = i}} end
    commands[40] = {domain = domain, type = "Echo", id = taken} -- a duplicate fails its own send only
    local answers = send_all(commands)
    for i = 1, 39 do
      assert.is_nil(answers[i].err)
      assert.are.equal("PENDING", assert(bus:get_command(domain, answers[i].results[1].command_id)).status)
    end
    assert.are.same(via_plain(bus, "send", {commands[40]}), answers[40])
    assert.are.equal("DUPLICATE_COMMAND", answers[40].err.code)
    local used = transactions()
    assert.is_true(used < 40, used .. " transactions for 40 commands")
    -- Commands the batch refuses, sent alone: each fails for its own caller
    -- only, an unusable value with INVALID_ARGUMENT, a wrong type by raising.
    commands = {}
    for i = 1, 8 do commands[i] = {domain = domain, type = "Echo"} end
    commands[9] = {domain = domain, type = "Echo", max_attempts = 0}
    commands[10] = {domain = domain, type = 5}
    answers = send_all(commands)
    for i = 1, 8 do assert.is_string(answers[i].results[1].command_id) end
    assert.are.same(via_plain(bus, "send", {commands[9]}), answers[9])
    assert.are.equal("INVALID_ARGUMENT", answers[9].err.code)
    local _, raised = pcall(function() bus:send(commands[10]) end)
    assert.are.equal((raised:gsub("^[^:]+:%d+: ", "")), (answers[10].raised:gsub("^[^:]+:%d+: ", "")))
    assert.are.equal(40 + 8, #assert(bus:list_commands{domain = domain, limit = 100}))
    -- Sends with one dedup key that arrive together: one is sent, the others
    -- are refused as a plain send refuses them, naming it.
    commands = {}
    for i = 1, 6 do commands[i] = {domain = domain, type = "Echo", dedup_key = "once", dedup_for = 60} end
    answers = send_all(commands)
    local sent, refused = {}, {}
    for _, a in ipairs(answers) do
      if a.err then refused[#refused + 1] = a.err else sent[#sent + 1] = a.results[1].command_id end
    end
    assert.are.equal(1, #sent)
    assert.are.equal(5, #refused)
    for _, e in ipairs(refused) do
      assert.are.equal("DUPLICATE_COMMAND", e.code)
      assert.are.equal(sent[1], e.command_id)
      assert.are.same(via_plain(bus, "send", {commands[1]}).err, e)
    end
  end)

  it("operates the troubleshooting queue", function()
    local ids = {}
    for i = 1, 3 do ids[i] = assert(bus:send{domain = domain, type = "Permanent"}).command_id end
    settle()
    assert.are.equal(3, via_nginx(server, "tsq_list", {{domain = domain}}).results[1].total)
    assert.are.equal("number", type(via_nginx(server, "tsq_retry", {domain, ids[1], {operator = "ada"}}).results[1]))
    assert.is_true(via_nginx(server, "tsq_cancel", {domain, ids[2], "no"}).results[1])
    assert.is_true(via_nginx(server, "tsq_complete", {domain, ids[3], {ok = true}}).results[1])
    assert.are.equal("PENDING", assert(bus:get_command(domain, ids[1])).status)
    assert.are.equal("CANCELED", assert(bus:get_command(domain, ids[2])).status)
    assert.are.equal("COMPLETED", assert(bus:get_command(domain, ids[3])).status)
  end)

  it("runs the queue operations", function()
    local q = domain
    assert.is_true(via_nginx(server, "create", {}, q).results[1])
    local id = via_nginx(server, "send", {{a = 1}}, q).results[1]
    assert.are.equal(2, #via_nginx(server, "send_batch", {{{b = 2}, {c = 3}}}, q).results[1])
    local read = via_nginx(server, "read", {{vt = 30, qty = 1}}, q).results[1]
    assert.are.same({a = 1}, read[1].message)
    assert.are.equal(id, via_nginx(server, "set_vt", {id, 0}, q).results[1].msg_id)
    assert.are.equal(1, #via_nginx(server, "pop", {{qty = 1}}, q).results[1])
    local polled = via_nginx(server, "read_with_poll", {{vt = 30, qty = 5, max_wait = 0.2}}, q).results[1]
    assert.are.equal(2, #polled)
    assert.is_true(via_nginx(server, "archive", {polled[1].msg_id}, q).results[1])
    assert.is_true(via_nginx(server, "delete", {polled[2].msg_id}, q).results[1])
    local got, expected = via_nginx(server, "metrics", {}, q), via_plain(bus, "metrics", {}, q)
    got.results[1].scrape_time, expected.results[1].scrape_time = nil, nil
    assert.are.same(expected, got)
    assert.are.equal(0, via_nginx(server, "purge", {}, q).results[1])
    local queues = via_nginx(server, "list_queues").results[1]
    local listed = false
    for _, row in ipairs(queues) do listed = listed or row.queue_name == q end
    assert.is_true(listed)
    assert.is_true(via_nginx(server, "drop", {}, q).results[1])
    local bad = via_nginx(server, "send", {{a = 1}}, "Bad Name")
    assert.are.same(via_plain(bus, "send", {{a = 1}}, "Bad Name"), bad)
    assert.are.equal("INVALID_ARGUMENT", bad.err.code)
  end)

  it("works from an ngx.timer callback", function()
    local status, id = server:request("GET", "/timer?domain=" .. domain)
    assert.are.equal(200, status)
    assert.are.equal("PENDING", assert(bus:get_command(domain, (id:gsub("%s", "")))).status)
  end)

  it("answers a request (send and await in one call) once a worker elsewhere completes the command", function()
    local id = "01900000-0000-7000-8000-0000000000bb"
    local call = require("cjson").encode{method = "request", n = 1,
                                         args = {{domain = domain, type = "Echo", id = id, data = {n = 1}, timeout = 30}}}
    local waiting = server:open("POST", "/call", call)
    -- Sent and registered by one transaction inside nginx; then this
    -- process's worker completes it.
    ngx_world.wait_until("the request is sent and registered", function()
      return tonumber(require("spec.helper").sql(("SELECT count(*) FROM commandbus.awaiter a JOIN commandbus.command c"
        .. " USING (domain) WHERE a.domain = '%s' AND a.id = '%s' AND c.command_id = a.id"):format(domain, id))
        :match("%d+")) == 1
    end, 30)
    assert.is_false(waiting:ready())
    settle()
    local status, body = waiting:finish()
    assert.are.equal(200, status)
    local answer = require("cjson").decode(body)
    assert.is_nil(answer.err)
    assert.are.equal(id, answer.results[1].command_id)
    assert.are.equal("COMPLETED", answer.results[1].status)
  end)

  it("keeps serving while 50 requests await commands, which a worker inside nginx then completes", function()
    local ids, waiting = {}, {}
    for i = 1, 50 do ids[i] = assert(bus:send{domain = domain, type = "Echo", data = {n = i}}).command_id end
    for i = 1, 50 do
      waiting[i] = server:open("GET", ("/await?domain=%s&id=%s&timeout=60"):format(domain, ids[i]))
    end
    -- All 50 are inside nginx, registered as waiters, on its only worker.
    ngx_world.wait_until("the 50 awaits are registered", function()
      return tonumber(require("spec.helper").sql(("SELECT count(DISTINCT id) FROM commandbus.awaiter WHERE domain = '%s'")
                                                 :format(domain)):match("%d+")) == 50
    end, 30)
    local function answer(status, body) return {status, body} end
    assert.are.same({200, "pong\n"}, answer(server:request("GET", "/lua_ping")))
    assert.are.same({200, "pong\n"}, answer(server:request("GET", "/ping")))
    for i = 1, 50 do assert.is_false(waiting[i]:ready(), "await " .. i .. " answered before any worker ran") end
    assert.are.equal(200, (server:request("GET", "/start_worker?domain=" .. domain)))
    for i = 1, 50 do
      local status, body = waiting[i]:finish()
      assert.are.equal(200, status)
      assert.are.equal("COMPLETED\n", body)
    end
  end)
end)
