-- bench/throughput: end-to-end commands/s of the bus (make bench-throughput).
--
-- Sends N commands with send_batch (one process, one call of N; then two
-- processes at once, one call of N/2 each; best of BENCH_SEND_ROUNDS=3),
-- then runs workers with a no-op Lua handler until all are COMPLETED:
-- concurrency 1, 4 and 8 in one process, and two processes of 4. In the same
-- run, pgbench does the same row work in raw SQL, 100 commands per
-- transaction (the floors), and each figure's ratio is printed against the
-- floor of the same concurrency (1 or 2 clients). A last line compares the
-- 1-process concurrency-4 worker with priorities in use (a third of the
-- commands at each of 0, 1 and 2) against the same run without (best of
-- BENCH_PRIORITY_ROUNDS=3 each, alternated). Ends with one JSON line.
--
-- BENCH_AGED=1 measures instead how the worker's ratio to its floor holds on
-- a lived-in database: in a database of its own (commandbus_bench_aged,
-- created afresh), the floor and the worker runs on the fresh database
-- (best of BENCH_SEND_ROUNDS each), then BENCH_AGE_ROUNDS=5 rounds of the pattern that wears a
-- database (50,000 commands sent, completed by workers, then removed with
-- bus:purge, autovacuum left to itself), then the floor and the worker runs
-- again. It prints both ratios and the second over the first.
local commandbus = require "commandbus"
local cjson = require "cjson"
local common = require "bench.support.common"

local N = tonumber(os.getenv("BENCH_COMMANDS")) or 50000
-- Rounds of the sending figures and their floors (the best of each is kept).
local SEND_ROUNDS = tonumber(os.getenv("BENCH_SEND_ROUNDS")) or 3
local AGED = os.getenv("BENCH_AGED") == "1"
local AGE_ROUNDS = tonumber(os.getenv("BENCH_AGE_ROUNDS")) or 5
local PRIORITY_ROUNDS = tonumber(os.getenv("BENCH_PRIORITY_ROUNDS")) or 3
local lua, now, sh = common.lua, common.now, common.sh
local function psql(sql) return common.psql(sql) end
local pgbench = "/usr/lib/postgresql/15/bin/pgbench"
do
  local f = io.popen("ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -n 1")
  local found = f:read("*l")
  f:close()
  if found and found ~= "" then pgbench = found end
end

if AGED then -- a database of its own, created afresh
  local name = "commandbus_bench_aged"
  psql("DROP DATABASE IF EXISTS " .. name .. " WITH (FORCE)")
  local out = psql("CREATE DATABASE " .. name)
  assert(not out:match("ERROR"), out)
  local dsn = common.dsn
  if dsn:match("^postgres") then dsn = dsn:gsub("^(postgres[^/]*//[^/]*)/?[^?]*", "%1/" .. name)
  else dsn = dsn .. " dbname=" .. name end
  common.dsn = dsn -- psql and the helpers of bench/support/common follow
end
local dsn = common.dsn

local bus = assert(commandbus.connect(dsn, {pool_size = 4}))
assert(bus:setup())
local function drop_domain(name) common.drop_domain(bus, name) end
local function fresh_domain(name) return common.fresh_domain(bus, name) end

local function send_all(domain, priorities)
  local commands = {}
  for i = 1, N do commands[i] = {type = "Noop", data = {n = i}, priority = priorities and i % 3 or nil} end
  local t0 = now()
  local res = assert(bus:send_batch{domain = domain, commands = commands})
  local took = now() - t0
  assert(#res == N)
  return N / took
end

local completed = common.completed

local function run_in_process(domain, concurrency, n)
  n = n or N
  local worker = assert(bus:worker{domain = domain, handlers = "bench.throughput.noop_handlers",
                                   concurrency = concurrency, poll_interval = 0.05})
  local t0 = now()
  local q = assert(bus:queue(domain .. "__commands"))
  -- Done once the queue is empty (a completed command's message is
  -- deleted); its length, a count over the queue that costs PostgreSQL
  -- about as much as receiving a hundred commands, is asked only when the
  -- worker holds nothing (health().held: received, not yet acknowledged).
  worker:run{tick_interval = 0.05, tick = function()
    return assert(worker:health()).held > 0 or assert(q:metrics()).queue_length > 0
  end}
  local took = now() - t0
  worker:close()
  assert(completed(domain) == n, "not every command completed")
  return n / took
end

-- Runs two OS processes at once; returns what they printed (stdout and
-- stderr of both).
-- (The processes connect to DATABASE_URL: the aged mode's own database.)
local function two_processes(cmd1, cmd2)
  local env = ("DATABASE_URL=%q "):format(dsn)
  return common.at_once({env .. cmd1, env .. (cmd2 or cmd1)})
end

-- send_batch with the concurrency of the two-client floor: two processes,
-- each one send_batch of half the commands (as send_all does, the core
-- splits it into statements of 1,000). Each process builds its tables and
-- connects first, then both start at the same wall-clock time; the figure is
-- from the first call's start until both have returned.
local function send_two_processes(domain)
  local half = N // 2
  local start_at = now() + 2 -- time to start Lua, connect and build the tables
  local cmd = ("%s bench/throughput/send_process.lua %s %%d %.6f"):format(lua, domain, start_at)
  local out = two_processes(cmd:format(half), cmd:format(N - half))
  local sent, first, last, starts = 0, math.huge, 0, {}
  for n, t0, t1 in out:gmatch("sent (%d+) ([%d%.]+) ([%d%.]+)") do
    sent = sent + tonumber(n)
    first = math.min(first, tonumber(t0))
    last = math.max(last, tonumber(t1))
    starts[#starts + 1] = tonumber(t0)
  end
  assert(#starts == 2 and sent == N, "a sending process failed: " .. out)
  if math.abs(starts[1] - starts[2]) > 0.05 then
    io.stderr:write(("bench/throughput: the sending processes started %.3f s apart\n"):format(math.abs(starts[1] - starts[2])))
  end
  return N / (last - first)
end

local function run_two_processes(domain, concurrency)
  local t0 = now()
  local cmd = ("%s bench/throughput/worker_process.lua %s %d %d >/dev/null 2>&1"):format(lua, domain, concurrency, N)
  two_processes(cmd)
  local took = now() - t0
  assert(completed(domain) == N, "not every command completed")
  return N / took
end

local function pgbench_tps(script, transactions_per_client, clients)
  local out = sh(("%s -n -M prepared -c %d -j %d -t %d -f %s %q"):format(pgbench, clients, clients,
    transactions_per_client, script, dsn))
  local tps = out:match("tps = ([%d%.]+)")
  assert(tps, "pgbench failed: " .. out)
  return tonumber(tps)
end

local ratio = common.ratio
local rounds_text = common.rates_text

-- The worker's figure against the floor, taken in turns (BENCH_SEND_ROUNDS
-- rounds, the best of each kept, so that autovacuum's work after the ageing
-- falls on both alike): the receive+complete floor on a floor domain of N
-- commands, a 1-process concurrency-4 worker and two processes of 4.
local function worker_against_floor(label)
  local floors, ones, twos = {}, {}, {}
  for r = 1, SEND_ROUNDS do
    fresh_domain("bench_floor")
    pgbench_tps("bench/throughput/floor_send.sql", N // 100, 1)
    floors[r] = pgbench_tps("bench/throughput/floor_complete.sql", N // 200, 2) * 100
    local d = fresh_domain("bench_tp")
    send_all(d)
    ones[r] = run_in_process(d, 4)
    d = fresh_domain("bench_tp")
    send_all(d)
    twos[r] = run_two_processes(d, 4)
  end
  local floor, one, two = math.max(table.unpack(floors)), math.max(table.unpack(ones)), math.max(table.unpack(twos))
  local best = math.max(one, two)
  print(("%s: floor %.0f/s; worker 1 process of 4 %.0f/s, 2 processes of 4 %.0f/s: %.2fx the floor (best of %d)"):format(
    label, floor, one, two, best / floor, SEND_ROUNDS))
  drop_domain("bench_floor")
  drop_domain("bench_tp")
  return best / floor, best, floor
end

-- What wears a database: commands sent, handled and removed, round after
-- round, with autovacuum doing what it does.
local function age_database(rounds)
  for r = 1, rounds do
    local d = "bench_age"
    bus:queue(d .. "__commands"):create()
    send_all(d)
    run_two_processes(d, 4)
    local removed = assert(bus:purge{domain = d, older_than = 0})
    io.stderr:write(("bench/throughput: ageing round %d of %d: %d commands and %d audit rows purged\n"):format(
      r, rounds, tonumber(removed.commands), tonumber(removed.audit)))
  end
end

if AGED then
  io.stderr:write(("bench/throughput: %d commands a run, %d ageing rounds\n"):format(N, AGE_ROUNDS))
  local fresh, fresh_rate, fresh_floor = worker_against_floor("fresh database")
  age_database(AGE_ROUNDS)
  local aged, aged_rate, aged_floor = worker_against_floor(("after %d rounds of %d commands sent, handled and purged"):format(AGE_ROUNDS, N))
  print(("lived-in over fresh: %.2f"):format(aged / fresh))
  print(cjson.encode({bench = "throughput_aged", commands = N, age_rounds = AGE_ROUNDS,
    fresh_cmds_per_s = math.floor(fresh_rate), fresh_floor_cmds_per_s = math.floor(fresh_floor), fresh_ratio = ratio(fresh_rate, fresh_floor),
    aged_cmds_per_s = math.floor(aged_rate), aged_floor_cmds_per_s = math.floor(aged_floor), aged_ratio = ratio(aged_rate, aged_floor),
    aged_over_fresh = math.floor(aged / fresh * 100) / 100}))
  bus:close()
  os.exit(0)
end

-- Comparable runs: earlier runs leave dead rows behind.
common.vacuum_analyze({"commandbus.command", "commandbus.audit"}, "throughput")
io.stderr:write(("bench/throughput: %d commands, %s cores, PostgreSQL on the same machine\n"):format(N, sh("nproc"):match("%d+")))
local result = {bench = "throughput", commands = N}

-- Sending, against its floors (raw SQL, 100 commands a transaction). One
-- send_batch is one transaction on one connection (one backend, one core):
-- its floor is one pgbench client doing the same inserts. Two sending
-- processes (two backends) are compared with two clients. Each figure is
-- taken right after its floor, SEND_ROUNDS times, and the best of each is
-- kept: on a shared machine other work only ever slows a run down.
local send_floor_1, send_floor_2, send_1, send_2 = {}, {}, {}, {}
for r = 1, SEND_ROUNDS do
  fresh_domain("bench_floor")
  send_floor_1[r] = pgbench_tps("bench/throughput/floor_send.sql", N // 100, 1) * 100
  send_1[r] = send_all(fresh_domain("bench_tp"))
  send_floor_2[r] = pgbench_tps("bench/throughput/floor_send.sql", N // 200, 2) * 100
  send_2[r] = send_two_processes(fresh_domain("bench_tp_send2"))
  drop_domain("bench_tp_send2")
end
local floor_send, floor_send_2 = math.max(table.unpack(send_floor_1)), math.max(table.unpack(send_floor_2))
local sends, sends_2 = math.max(table.unpack(send_1)), math.max(table.unpack(send_2))
-- Workers use two connections: their floor is two pgbench clients. It runs
-- on the last round's floor rows (as many as the send floors wrote).
local floor_complete = pgbench_tps("bench/throughput/floor_complete.sql", N // 200, 2) * 100
result.send_rounds = SEND_ROUNDS
result.floor_send_per_s = math.floor(floor_send)
result.floor_send_2clients_per_s = math.floor(floor_send_2)
result.floor_cmds_per_s = math.floor(floor_complete)
print(("floor (pgbench, 100 per transaction): send %.0f/s with 1 client, send %.0f/s with 2 clients (best of %d), receive+complete %.0f/s with 2 clients"):format(
  floor_send, floor_send_2, SEND_ROUNDS, floor_complete))

result.send_batch_per_s = math.floor(sends)
result.send_ratio = ratio(sends, floor_send)
print(("send_batch, 1 process, one call of %d: %.0f commands/s (%.2fx the 1-client send floor)"):format(
  N, sends, sends / floor_send))
result.send_batch_2proc_per_s = math.floor(sends_2)
result.send_2proc_ratio = ratio(sends_2, floor_send_2)
print(("send_batch, 2 processes at once, one call of %d each: %.0f commands/s (%.2fx the 2-client send floor)"):format(
  N // 2, sends_2, sends_2 / floor_send_2))
if SEND_ROUNDS > 1 then
  print(("  rounds: 1-client floor %s | 1 process %s | 2-client floor %s | 2 processes %s"):format(
    rounds_text(send_floor_1), rounds_text(send_1), rounds_text(send_floor_2), rounds_text(send_2)))
end

local d = "bench_tp" -- the last round's commands, for the first worker run
local best = 0
for _, c in ipairs({1, 4, 8}) do
  if c > 1 then d = fresh_domain("bench_tp"); send_all(d) end
  local rate = run_in_process(d, c)
  result["cmds_per_s_c" .. c] = math.floor(rate)
  best = math.max(best, rate)
  print(("worker, 1 process, concurrency %d: %.0f commands/s (%.2fx the 2-client receive+complete floor)"):format(
    c, rate, rate / floor_complete))
end
d = fresh_domain("bench_tp")
send_all(d)
local two = run_two_processes(d, 4)
result.cmds_per_s_2proc_c4 = math.floor(two)
best = math.max(best, two)
print(("worker, 2 processes of concurrency 4: %.0f commands/s (%.2fx the 2-client receive+complete floor)"):format(
  two, two / floor_complete))

result.cmds_per_s = math.floor(best)
result.ratio = ratio(best, floor_complete)

-- Priorities: the same 1-process concurrency-4 run, alternated with and
-- without priorities in use; the best of each.
local plain, prioritised = {}, {}
for r = 1, PRIORITY_ROUNDS do
  d = fresh_domain("bench_tp")
  send_all(d)
  plain[r] = run_in_process(d, 4)
  d = fresh_domain("bench_tp")
  send_all(d, true)
  prioritised[r] = run_in_process(d, 4)
end
local best_plain, best_prio = math.max(table.unpack(plain)), math.max(table.unpack(prioritised))
result.cmds_per_s_priorities_c4 = math.floor(best_prio)
result.priorities_ratio = ratio(best_prio, best_plain)
print(("worker, 1 process of concurrency 4, priorities 0, 1 and 2 in use: %.0f commands/s (%.2fx the same run without, %.0f/s; best of %d)"):format(
  best_prio, best_prio / best_plain, best_plain, PRIORITY_ROUNDS))
drop_domain("bench_tp")
drop_domain("bench_floor")
bus:close()
print(cjson.encode(result))
