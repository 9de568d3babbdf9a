-- bench/request_path/path.lua REQUESTS: one request in flight, as bench/peers'
-- latency part makes it (send then await, and bus:request, in turn; the
-- handler in a worker process says over UDP when it started), and what it
-- cost: CPU per request (/proc/<pid>/stat, user + system) of this process,
-- of the worker's, of each PostgreSQL backend of the database (named by its
-- last statement: the listeners show their LISTEN) and of PostgreSQL's own
-- processes (WAL writer, checkpointer, background writer), and how often
-- their threads went to sleep (voluntary context switches). Linux only; the
-- backends must be readable (same user or root).
-- Run through run.sh, which gives it a fresh database.
local commandbus = require "commandbus"
local socket = require "socket"
local common = require "bench.support.common"

local REQUESTS = tonumber(arg[1]) or 500
local WARMUP = 20
local DOMAIN = "request_path"
local TICK_MS = 10 -- /proc's clock ticks (USER_HZ = 100)

local function read_file(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- CPU (ticks) of a process, and the times its threads went to sleep
-- (voluntary context switches: each is a wake-up to come).
local function usage(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if not stat then return 0, 0 end
  local fields = {}
  for x in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  local sleeps = 0
  local tasks = io.popen("ls /proc/" .. pid .. "/task 2>/dev/null")
  for task in tasks:lines() do
    local status = read_file("/proc/" .. pid .. "/task/" .. task .. "/status") or ""
    sleeps = sleeps + (tonumber(status:match("\nvoluntary_ctxt_switches:%s+(%d+)")) or 0)
  end
  tasks:close()
  return tonumber(fields[12]) + tonumber(fields[13]), sleeps -- utime + stime
end

local function busy_and_idle()
  local v = {}
  for x in read_file("/proc/stat"):match("^cpu%s+([^\n]*)"):gmatch("%d+") do v[#v + 1] = tonumber(x) end
  return v[1] + v[2] + v[3] + v[6] + v[7] + v[8], v[4] + v[5]
end

local bus = assert(commandbus.connect())
assert(bus:setup())
common.fresh_domain(bus, DOMAIN)
local udp = assert(socket.udp())
assert(udp:setsockname("127.0.0.1", 0))
local _, port = udp:getsockname()
udp:settimeout(10)
local here = arg[0]:match("^(.*)/") or "."
local worker = io.popen(("BENCH_PEERS_SIGNAL_PORT=%d %s %s/worker.lua %s"):format(port, common.lua, here, DOMAIN))
local worker_pid = assert((worker:read("l") or ""):match("^ready (%d+)"), "bench/request_path: the worker did not start")
local own_pid = read_file("/proc/self/stat"):match("^(%d+)")

local ways = {
  send_await = {to_handler = {}, to_answer = {}, call = function(i)
    local sent = assert(bus:send{domain = DOMAIN, type = "Signal", data = {i = i}})
    return assert(bus:await(DOMAIN, sent.command_id, {timeout = 10}))
  end},
  request = {to_handler = {}, to_answer = {}, call = function(i)
    return assert(bus:request{domain = DOMAIN, type = "Signal", data = {i = i}, timeout = 10})
  end},
}

-- The measured processes, taken once warm (the pool and the listeners are
-- connected by then): {name, pid}.
local function processes()
  local list = {{"caller", own_pid}, {"worker", worker_pid}}
  local rows = common.psql("SELECT string_agg(pid || '=' || replace(left(query, 30), ' ', '_'), ' ')"
    .. " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
  for pid, query in rows:gmatch("(%d+)=(%S*)") do list[#list + 1] = {"backend " .. pid .. " " .. query, pid} end
  local p = io.popen("pgrep -f 'postgres: (walwriter|checkpointer|background writer)'")
  for pid in p:lines() do list[#list + 1] = {"postgres' own", pid} end
  p:close()
  return list
end

local measured, before, busy0, idle0
for i = 1, 2 * (WARMUP + REQUESTS) do
  if i == 2 * WARMUP + 1 then
    measured, before = processes(), {}
    for k, p in ipairs(measured) do before[k] = {usage(p[2])} end
    busy0, idle0 = busy_and_idle()
  end
  local way = i % 2 == 1 and ways.send_await or ways.request
  local t0 = common.now()
  local cmd = way.call(i)
  local t2 = common.now()
  assert(cmd.status == "COMPLETED", "bench/request_path: a command ended " .. tostring(cmd.status))
  local n, started = assert(udp:receive()):match("^(%d+) ([%d%.]+)$")
  assert(tonumber(n) == i, "bench/request_path: the handler of another command signalled")
  if i > 2 * WARMUP then
    way.to_handler[#way.to_handler + 1] = tonumber(started) - t0
    way.to_answer[#way.to_answer + 1] = t2 - t0
  end
end
local busy1, idle1 = busy_and_idle()
local per = {}
for k, p in ipairs(measured) do
  local cpu, switches = usage(p[2])
  local row = per[p[1]] or {0, 0}
  per[p[1]] = {row[1] + cpu - before[k][1], row[2] + switches - before[k][2]}
end
assert(bus:send{domain = DOMAIN, type = "Stop"})
worker:close()
udp:close()

local count = 2 * REQUESTS
local function ms(seconds) return seconds * 1000 end
for _, name in ipairs({"send_await", "request"}) do
  local w = ways[name]
  print(("%-10s to handler p50 %.2f p99 %.2f ms, to answer p50 %.2f p99 %.2f ms"):format(name,
    ms(common.percentile(w.to_handler, 50)), ms(common.percentile(w.to_handler, 99)),
    ms(common.percentile(w.to_answer, 50)), ms(common.percentile(w.to_answer, 99))))
end
local names, total = {}, 0
for name in pairs(per) do names[#names + 1] = name end
table.sort(names)
for _, name in ipairs(names) do
  local cpu_ms = per[name][1] * TICK_MS / count
  total = total + cpu_ms
  print(("  %-40s %.3f ms CPU, %.1f sleeps a request"):format(name, cpu_ms, per[name][2] / count))
end
print(("cpu a request %.3f ms; the machine was %.0f%% busy (%d cores)"):format(total,
  100 * (busy1 - busy0) / (busy1 - busy0 + idle1 - idle0), tonumber(common.sh("nproc")) or 0))
bus:close()
