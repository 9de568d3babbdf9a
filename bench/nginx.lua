-- bench/nginx: commandbus.ngx inside a real nginx (make bench-nginx).
--
-- nginx (Debian's, 2 workers, started on a free loopback port with a
-- generated configuration) and PostgreSQL on the same machine; wrk makes
-- the load. Each figure is printed beside a reference measured in the same
-- run, and the ratio:
--   1. A trivial Lua location's p99 latency (one request at a time, every
--      4 ms) while 200 requests await commands that a worker completes 1 s
--      later; reference: its p99 with nothing pending.
--   2. /send at 64 connections: sends/s through commandbus.ngx, and the same
--      location written with the blocking plain API (reference).
--   3. Request/response: the example app's POST /orders (send, then await
--      the outcome; the worker and its no-op handler inside nginx) at 64
--      connections: requests/s, p50, p99; reference: sends/s of 2.
-- Ends with one JSON line.
local cjson = require "cjson"
local commandbus = require "commandbus"
local nginx = require "spec.support.nginx"
local socket = require "socket"

local SECONDS = tonumber(os.getenv("BENCH_SECONDS")) or 8
local AWAITS = 200
local root = nginx.root
local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"

local function log(fmt, ...) io.stderr:write(("bench/nginx: " .. fmt .. "\n"):format(...)) end

local bus = assert(commandbus.connect())
assert(bus:setup())

local function conf()
  local example = root .. "/examples/openresty"
  return nginx.main_lines(2) .. [[
thread_pool commandbus threads=32;
thread_pool commandbus_await threads=256;
events { worker_connections 4096; }
http {
  access_log off;
]] .. nginx.TEMP_PATHS .. nginx.package_lines(example .. "/?.lua") .. [[
  lua_worker_thread_vm_pool_size 1024;
  init_worker_by_lua_block {
    require("app.orders").init_worker()   -- examples/openresty: its bus, and its worker on nginx worker 0
    require("bench.nginx.app").init_worker()
  }
  exit_worker_by_lua_block { require("commandbus.ngx").shutdown() }
  server {
    listen 127.0.0.1:%PORT% backlog=4096;
    location = /ping { content_by_lua_block { ngx.say("pong") } }
    location = /send { content_by_lua_block { require("bench.nginx.app").send() } }
    location = /send_blocking { content_by_lua_block { require("bench.nginx.app").send_blocking() } }
    location = /await { content_by_lua_block { require("bench.nginx.app").await() } }
    location = /orders { content_by_lua_block { require("app.orders").post() } }
  }
}
]]
end

-- wrk's figures for one run: requests/s, p50 and p99 in ms, non-2xx answers.
local function wrk(server, path, connections, seconds, script)
  local command = ("wrk -t2 -c%d -d%ds --latency %s 'http://127.0.0.1:%d%s' 2>&1")
                  :format(connections, seconds, script and ("-s " .. script) or "", server.port, path)
  local f = assert(io.popen(command))
  local out = f:read("*a")
  f:close()
  local function ms(pct)
    local value, unit = out:match("\n%s*" .. pct .. "%%%s+([%d%.]+)(%a+)")
    assert(value, "wrk printed no " .. pct .. "% latency:\n" .. out)
    return tonumber(value) * ({us = 0.001, ms = 1, s = 1000, m = 60000})[unit]
  end
  local rps = tonumber(out:match("Requests/sec:%s*([%d%.]+)"))
  assert(rps, "wrk printed no Requests/sec:\n" .. out)
  return {per_s = rps, p50 = ms(50), p99 = ms(99), non_2xx = tonumber(out:match("Non%-2xx or 3xx responses: (%d+)")) or 0}
end

-- Latencies (ms) of requests to path made one after another, every
-- `every` seconds for `seconds`: what a lone client of a trivial location
-- sees, without load of its own to blur it (wrk would saturate the CPU).
local function probe(server, path, seconds, every)
  local samples = {}
  local stop = socket.gettime() + seconds
  while socket.gettime() < stop do
    local t0 = socket.gettime()
    local status = server:request("GET", path)
    samples[#samples + 1] = (socket.gettime() - t0) * 1000
    assert(status == 200, "the trivial location answered " .. tostring(status))
    socket.sleep(every)
  end
  table.sort(samples)
  return {p50 = samples[math.ceil(#samples * 0.5)], p99 = samples[math.ceil(#samples * 0.99)], n = #samples}
end

local function round(x, digits)
  local m = 10 ^ (digits or 0)
  return math.floor(x * m + 0.5) / m
end

local server = nginx.start{conf = conf()}
local ok, failure = pcall(function()
  local result = {bench = "nginx", nginx_workers = 2}
  log("nginx 1.22 (Debian, libnginx-mod-http-lua) with 2 workers, PostgreSQL 15 on the same 2-core machine;"
      .. " wrk -t2, %d s per run", SECONDS)

  -- 1. a trivial location while 200 requests await (first, while the machine is calm)
  probe(server, "/ping", 0.5, 0.004) -- warm up: every worker loads its Lua
  local idle = probe(server, "/ping", 2, 0.004)
  local await_domain = "bench_nginx_await_" .. os.time()
  local commands = {}
  for i = 1, AWAITS do commands[i] = {type = "Echo", data = {n = i}} end
  local sent = assert(bus:send_batch{domain = await_domain, commands = commands})
  local waiting = {}
  for i = 1, AWAITS do
    waiting[i] = server:open("GET", ("/await?domain=%s&id=%s"):format(await_domain, sent[i].command_id))
  end
  local deadline = socket.gettime() + 30
  repeat
    local f = io.popen(("psql -qAt %q -c \"SELECT count(DISTINCT id) FROM commandbus.awaiter WHERE domain = '%s'\"")
                       :format(os.getenv("DATABASE_URL"), await_domain))
    local registered = tonumber(f:read("*a"))
    f:close()
    if socket.gettime() > deadline then error("the awaits did not all register") end
  until registered == AWAITS
  -- A worker in another process completes them 1 s from now.
  os.execute(("(sleep 1; %s spec/support/worker_process.lua %s 2 30 bench.nginx.handlers) >/dev/null 2>&1 &")
             :format(lua, await_domain))
  local busy = probe(server, "/ping", 2, 0.004)
  local completed = 0
  for i = 1, AWAITS do
    local status, body = waiting[i]:finish()
    if status == 200 and body == "COMPLETED\n" then completed = completed + 1 end
  end
  assert(completed == AWAITS, ("only %d of %d awaits returned COMPLETED"):format(completed, AWAITS))
  result.trivial_p99_ms_while_awaiting = round(busy.p99, 2)
  result.trivial_p99_ms_idle = round(idle.p99, 2)
  result.trivial_p99_ratio = round(busy.p99 / idle.p99, 2)
  log("a trivial Lua location, asked every 4 ms for 2 s while %d requests await commands completed 1 s later:"
      .. " p99 %.2f ms (%.2f ms with nothing pending: %.2fx; %d and %d requests); all %d awaits returned COMPLETED",
      AWAITS, busy.p99, idle.p99, result.trivial_p99_ratio, busy.n, idle.n, completed)

  -- 2. sends
  local domain = "bench_nginx_" .. os.time()
  wrk(server, "/send?domain=" .. domain, 8, 1) -- warm up: connections, prepared statements, Lua VMs
  wrk(server, "/send_blocking?domain=" .. domain, 8, 1)
  local blocking = wrk(server, "/send_blocking?domain=" .. domain, 64, SECONDS)
  local sends = wrk(server, "/send?domain=" .. domain, 64, SECONDS)
  assert(blocking.non_2xx == 0 and sends.non_2xx == 0, ("%d blocking and %d commandbus.ngx sends failed:\n%s")
         :format(blocking.non_2xx, sends.non_2xx, table.concat(server:errors(), "\n"):sub(1, 3000)))
  result.send_per_s = round(sends.per_s)
  result.blocking_send_per_s = round(blocking.per_s)
  result.send_ratio = round(sends.per_s / blocking.per_s, 2)
  log("/send at 64 connections: %d sends/s with commandbus.ngx, %d/s with the blocking plain API: %.2fx",
      result.send_per_s, result.blocking_send_per_s, result.send_ratio)
  log("  p99: %.1f ms with commandbus.ngx, %.1f ms blocking", sends.p99, blocking.p99)

  -- 3. request/response through the example app
  wrk(server, "/orders", 8, 1, root .. "/bench/nginx/post_order.lua")
  local orders = wrk(server, "/orders", 64, SECONDS, root .. "/bench/nginx/post_order.lua")
  assert(orders.non_2xx == 0, orders.non_2xx .. " orders were not answered 2xx")
  result.order_rr_per_s = round(orders.per_s)
  result.order_rr_p50_ms = round(orders.p50, 2)
  result.order_rr_p99_ms = round(orders.p99, 2)
  result.order_rr_vs_send = round(orders.per_s / sends.per_s, 2)
  log("POST /orders (send, a worker inside nginx handles it, await the outcome) at 64 connections: %d/s,"
      .. " p50 %.1f ms, p99 %.1f ms (%.2fx the sends/s of /send)", result.order_rr_per_s, orders.p50, orders.p99,
      result.order_rr_vs_send)
  local trouble = server:errors()
  if #trouble > 0 then log("error log:\n%s", table.concat(trouble, "\n")) end
  print(cjson.encode(result))
end)
server:stop()
bus:close()
if not ok then error(failure, 0) end
