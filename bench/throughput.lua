-- bench/throughput: end-to-end commands/s of the bus (make bench-throughput).
--
-- Sends N commands with send_batch, then runs workers with a no-op Lua
-- handler until all are COMPLETED: concurrency 1, 4 and 8 in one process,
-- and two processes of 4. In the same run, pgbench does the same row work
-- in raw SQL, 100 commands per transaction (the floor), and the ratios are
-- printed. Ends with one JSON line.
local commandbus = require "commandbus"
local socket = require "socket"
local cjson = require "cjson"

local N = tonumber(os.getenv("BENCH_COMMANDS")) or 50000
local dsn = assert(os.getenv("DATABASE_URL"), "DATABASE_URL is not set")
local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
local pgbench = "/usr/lib/postgresql/15/bin/pgbench"
do
  local f = io.popen("ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -n 1")
  local found = f:read("*l")
  f:close()
  if found and found ~= "" then pgbench = found end
end

local bus = assert(commandbus.connect(dsn, {pool_size = 4}))
assert(bus:setup())
local function now() return socket.gettime() end
local function sh(cmd)
  local f = io.popen(cmd .. " 2>&1")
  local out = f:read("*a")
  f:close()
  return out
end
local function psql(sql) return sh(string.format("psql -qAt %q -c %q", dsn, sql)) end

local function fresh_domain(name)
  psql(("DELETE FROM commandbus.command WHERE domain = '%s'; DELETE FROM commandbus.audit WHERE domain = '%s';"):format(name, name))
  local q = bus:queue(name .. "__commands")
  q:drop()
  assert(q:create())
  return name
end

local function send_all(domain)
  local commands = {}
  for i = 1, N do commands[i] = {type = "Noop", data = {n = i}} end
  local t0 = now()
  local res = assert(bus:send_batch{domain = domain, commands = commands})
  local took = now() - t0
  assert(#res == N)
  return N / took
end

local function completed(domain)
  local out = psql(("SELECT count(*) FROM commandbus.command WHERE domain = '%s' AND status = 'COMPLETED'"):format(domain))
  return tonumber(out:match("%d+"))
end

local function run_in_process(domain, concurrency)
  local worker = assert(bus:worker{domain = domain, handlers = "bench.throughput.noop_handlers",
                                   concurrency = concurrency, poll_interval = 0.05})
  local t0 = now()
  local q = assert(bus:queue(domain .. "__commands"))
  worker:run{tick_interval = 0.05, tick = function()
    return assert(q:metrics()).queue_length > 0  -- a completed command's message is deleted
  end}
  local took = now() - t0
  worker:close()
  assert(completed(domain) == N, "not every command completed")
  return N / took
end

local function run_two_processes(domain, concurrency)
  local t0 = now()
  local cmd = ("%s bench/throughput/worker_process.lua %s %d %d"):format(lua, domain, concurrency, N)
  sh(("(%s & %s & wait) >/dev/null 2>&1"):format(cmd, cmd))
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

-- Comparable runs: earlier runs leave dead rows behind.
psql("VACUUM ANALYZE commandbus.command; VACUUM ANALYZE commandbus.audit")
io.stderr:write(("bench/throughput: %d commands, %s cores, PostgreSQL on the same machine\n"):format(N, sh("nproc"):match("%d+")))
local result = {bench = "throughput", commands = N}

-- Floors first (raw SQL, 100 commands a transaction, 2 clients).
fresh_domain("bench_floor")
-- send_batch is one transaction on one connection (one backend, one core):
-- its floor is one pgbench client doing the same inserts; the two-client
-- figure is printed for reference. Workers use two connections, as the
-- two-client floor does.
local floor_send = pgbench_tps("bench/throughput/floor_send.sql", N // 100, 1) * 100
local floor_send_2 = pgbench_tps("bench/throughput/floor_send.sql", N // 200, 2) * 100
local floor_complete = pgbench_tps("bench/throughput/floor_complete.sql", N // 200, 2) * 100
result.floor_send_per_s = math.floor(floor_send)
result.floor_send_2clients_per_s = math.floor(floor_send_2)
result.floor_cmds_per_s = math.floor(floor_complete)
print(("floor (pgbench, 100 per transaction): send %.0f/s with 1 client (%.0f/s with 2), receive+complete %.0f/s with 2 clients"):format(
  floor_send, floor_send_2, floor_complete))

local d = fresh_domain("bench_tp")
local sends = send_all(d)
result.send_batch_per_s = math.floor(sends)
result.send_ratio = math.floor(sends / floor_send * 100) / 100
print(("send_batch of %d: %.0f commands/s (%.2fx the floor)"):format(N, sends, sends / floor_send))

local best = 0
for _, c in ipairs({1, 4, 8}) do
  if c > 1 then d = fresh_domain("bench_tp"); send_all(d) end
  local rate = run_in_process(d, c)
  result["cmds_per_s_c" .. c] = math.floor(rate)
  best = math.max(best, rate)
  print(("worker, 1 process, concurrency %d: %.0f commands/s (%.2fx the floor)"):format(c, rate, rate / floor_complete))
end
d = fresh_domain("bench_tp")
send_all(d)
local two = run_two_processes(d, 4)
result.cmds_per_s_2proc_c4 = math.floor(two)
best = math.max(best, two)
print(("worker, 2 processes of concurrency 4: %.0f commands/s (%.2fx the floor)"):format(two, two / floor_complete))

result.cmds_per_s = math.floor(best)
result.ratio = math.floor(best / floor_complete * 100) / 100
psql("DELETE FROM commandbus.command WHERE domain IN ('bench_tp', 'bench_floor'); DELETE FROM commandbus.audit WHERE domain IN ('bench_tp', 'bench_floor')")
bus:queue("bench_tp__commands"):drop()
bus:queue("bench_floor__commands"):drop()
bus:close()
print(cjson.encode(result))
