-- bench/saga: processes/s for the three-step saga with no-op handlers, and
-- the reply router's replies/s on a preloaded reply queue (make bench-saga).
local commandbus = require "commandbus"
local socket = require "socket"
local cjson = require "cjson"
local saga = require "spec.support.saga"
local common = require "bench.support.common"

local N = tonumber(os.getenv("BENCH_PROCESSES")) or 2000
-- Replies preloaded for the router-alone run: enough that its start and stop
-- (lane states, first prepares) weigh little against the work.
local R = tonumber(os.getenv("BENCH_REPLIES")) or 10000
local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
local bus = assert(commandbus.connect())
assert(bus:setup())
local function now() return socket.gettime() end
local function busy(q) return assert(q:metrics()).queue_length > 0 end

local function start_all(domain, n)
  local order = saga.for_domain(domain)
  for i = 1, n or N do assert(order:start(bus, {order = i})) end
end

-- Before each timed run, statistics as a running system has them: queues
-- made a moment ago and tables grown from nothing would otherwise be planned
-- as tiny until autovacuum's next ANALYZE, up to a minute later.
local function analyse(domain)
  common.vacuum_analyze({"commandbus.process", "commandbus.process_audit", "commandbus.process_event",
                         "commandbus.command", "commandbus.audit", "pgmq.q_" .. domain .. "__commands",
                         "pgmq.q_" .. domain .. "__process_replies"}, "saga")
end

local function run_worker(domain)
  local q = assert(bus:queue(domain .. "__commands"))
  local w = assert(bus:worker{domain = domain, handlers = "bench.saga.handlers", concurrency = 2, poll_interval = 0.05})
  w:run{tick_interval = 0.02, tick = function() return busy(q) end}
  w:close()
end

local function run_router(domain)
  local q = assert(bus:queue(domain .. "__process_replies"))
  local r = assert(bus:reply_router{domain = domain, managers = "bench.saga.managers", concurrency = 2, poll_interval = 0.05})
  r:run{tick_interval = 0.02, tick = function() return busy(q) end}
  r:close()
end

local result = {bench = "saga", processes = N}
io.stderr:write(("bench/saga: %d processes of 3 steps, 2 cores, PostgreSQL on the same machine;"
  .. " tables analysed before each timed run\n"):format(N))

-- 1. One process: workers and the router take turns on one thread.
local d1 = "bench_saga_a" .. os.time()
start_all(d1)
analyse(d1)
local t0 = now()
for _ = 1, 10 do
  run_worker(d1)
  run_router(d1)
  if not busy(bus:queue(d1 .. "__commands")) and not busy(bus:queue(d1 .. "__process_replies")) then break end
end
result.processes_per_s_one_process = math.floor(N / (now() - t0))
print(("one process (worker and router taking turns): %d processes/s"):format(result.processes_per_s_one_process))

-- 2. Split: a worker process and a router process at the same time.
local d2 = "bench_saga_b" .. os.time()
start_all(d2)
analyse(d2)
t0 = now()
os.execute(("(%s bench/saga/run_one.lua worker %s %d & %s bench/saga/run_one.lua router %s %d & wait) >/dev/null 2>&1")
  :format(lua, d2, N, lua, d2, N))
result.processes_per_s_two_processes = math.floor(N / (now() - t0))
print(("two processes (worker | router): %d processes/s"):format(result.processes_per_s_two_processes))

-- 3. The router alone on a preloaded reply queue (every first step answered).
local d3 = "bench_saga_c" .. os.time()
start_all(d3, R)
run_worker(d3)
analyse(d3)
local replies = assert(bus:queue(d3 .. "__process_replies"))
local preloaded = assert(replies:metrics()).queue_length
t0 = now()
run_router(d3)
result.replies_per_s = math.floor(preloaded / (now() - t0))
print(("reply router on %d preloaded replies: %d replies/s"):format(preloaded, result.replies_per_s))

bus:close()
print(cjson.encode(result))
