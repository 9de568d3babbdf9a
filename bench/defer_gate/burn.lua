-- A direct burn-down: N (50,000) commands by send_batch, then one worker of
-- concurrency C (argument) on the database of DATABASE_URL (fresh, made by
-- the caller). Prints the rate, WAL bytes and records per command and the
-- CPU of the database's backends (in all, then each busy one) and of this
-- process (the worker) per command. PERF=file records the backends with perf
-- while the worker runs.
local commandbus = require "commandbus"
local socket = require "socket"
local C = tonumber(arg[1]) or 4
local N = tonumber(os.getenv("N")) or 50000
local dsn = assert(os.getenv("DATABASE_URL"))
local function sh(cmd) local f = io.popen(cmd .. " 2>&1"); local o = f:read("*a"); f:close(); return o end
local function psql(sql) return sh(("psql -qAt %q -c %q"):format(dsn, sql)) end
local bus = assert(commandbus.connect(dsn, {pool_size = 2, application_name = "burn_bus"}))
assert(bus:setup())
assert(bus:queue("burn__commands"):create())
local commands = {}
for i = 1, N do commands[i] = {type = "Noop", data = {n = i}} end
assert(#assert(bus:send_batch{domain = "burn", commands = commands}) == N)
for _, t in ipairs{"commandbus.command", "commandbus.audit", "pgmq.q_burn__commands"} do psql("VACUUM ANALYZE " .. t) end
psql("CHECKPOINT")
local worker = assert(bus:worker{domain = "burn", handlers = "bench.throughput.noop_handlers", concurrency = C,
                                 poll_interval = 0.05})
local function ticks(pids)
  local sum = 0
  for _, pid in ipairs(pids) do
    local f = io.open("/proc/" .. pid .. "/stat")
    if f then
      local s = f:read("*a"); f:close()
      local fields = {}
      for x in s:gsub("^.*%) ", ""):gmatch("%S+") do fields[#fields + 1] = x end
      sum = sum + tonumber(fields[12]) + tonumber(fields[13])
    end
  end
  return sum
end
local pids = {}
for pid in psql("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"):gmatch("%d+") do
  pids[#pids + 1] = pid
end
local lsn0, rec0 = psql("SELECT pg_current_wal_lsn(), wal_records FROM pg_stat_wal"):match("(%S+)|(%d+)")
-- /proc/PID/schedstat: ns on a CPU, ns runnable but waiting for one.
local function sched(pid)
  local f = io.open("/proc/" .. pid .. "/schedstat")
  if not f then return 0, 0 end
  local on, wait = f:read("*l"):match("(%d+) (%d+)")
  f:close()
  return tonumber(on), tonumber(wait)
end
local sched0 = {}
for i, pid in ipairs(pids) do sched0[i] = {sched(pid)} end
local cpu0 = ticks(pids)
local each0 = {}
for i, pid in ipairs(pids) do each0[i] = ticks{pid} end
local perf
if os.getenv("PERF") then
  perf = io.popen(("perf record -g -o %s -p %s >/dev/null 2>&1 & echo $!"):format(os.getenv("PERF"), table.concat(pids, ","))):read("*l")
end
local q = assert(bus:queue("burn__commands"))
local t0, clock0 = socket.gettime(), os.clock()
worker:run{tick_interval = 0.05, tick = function()
  return assert(worker:health()).held > 0 or assert(q:metrics()).queue_length > 0
end}
local took, worker_cpu = socket.gettime() - t0, os.clock() - clock0
local cpu1 = ticks(pids)
-- Each busy backend: CPU per command, and the shares of the run's time it
-- ran, waited for a CPU (other load) and slept (waited for its client, a
-- lock or the disk).
local each, share = {}, {}
for i, pid in ipairs(pids) do
  local us = (ticks{pid} - each0[i]) * 1e4 / N
  if us >= 1 then
    each[#each + 1] = ("%.0f"):format(us)
    local on, wait = sched(pid)
    on, wait = (on - sched0[i][1]) / 1e9 / took, (wait - sched0[i][2]) / 1e9 / took
    share[#share + 1] = ("%.0f/%.0f/%.0f%%"):format(on * 100, wait * 100, (1 - on - wait) * 100)
  end
end
if perf then sh("kill -INT " .. perf .. "; sleep 2") end
local bytes, rec1 = psql(("SELECT pg_current_wal_lsn() - '%s'::pg_lsn, wal_records FROM pg_stat_wal"):format(lsn0)):match("(%d+)|(%d+)")
worker:close()
local done = tonumber(psql("SELECT count(*) FROM commandbus.command WHERE domain = 'burn' AND status = 'COMPLETED'"):match("%d+"))
assert(done == N, "not every command completed: " .. done)
print(("c%d rate %.0f/s wal %.0f B/cmd records %.1f/cmd backend cpu %.0f us/cmd (%s) run/wait/sleep %s worker cpu %.0f us/cmd"):format(C,
  N / took, bytes / N, (rec1 - rec0) / N, (cpu1 - cpu0) * 1e4 / N, table.concat(each, "+"), table.concat(share, " "),
  worker_cpu * 1e6 / N))
bus:close()
