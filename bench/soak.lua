-- bench/soak: does a bus that runs for months stay the same size and speed?
-- (make bench-soak)
--
-- In a database of its own (commandbus_bench_soak, created afresh), a sender
-- process sends SOAK_RATE=500 commands/s for SOAK_SECONDS=600 while two
-- worker processes (concurrency 2, the library's defaults: retention on, a
-- pass every SOAK_RETENTION_INTERVAL=10 s) handle them, the domain keeping
-- finished commands, their audit rows and archived messages SOAK_KEEP=60 s.
-- From the start of the middle third another connection holds a REPEATABLE
-- READ transaction open for SOAK_HOLD=120 s (at most a fifth of the run), as
-- a long analytics query does, so that vacuum can remove nothing meanwhile;
-- the rest of the middle third lets vacuum catch up before the last third,
-- whose growth says whether the sizes settled again.
--
-- Every SOAK_SAMPLE=30 s it samples the size of every table and index the
-- bus writes (the commandbus schema and the domain's queue and archive),
-- their dead tuples, the commands completed per second (messages deleted
-- from the queue) and the pickup latency (from a command's SENT to its
-- RECEIVED audit row: how long it waited for a fetch). It prints the series
-- as a table, the figures before, during and after the long transaction,
-- and one JSON line with growth_ratio (how much the total size grew over the
-- last third of the run, over the size at the end of the first third),
-- throughput_end_ratio (completions/s over the last third over the first),
-- lost (sent, but neither completed nor still there) and stuck (still
-- pending or running after the workers drained, or reported stuck).
local commandbus = require "commandbus"
local socket = require "socket"
local cjson = require "cjson"

local SECONDS = tonumber(os.getenv("SOAK_SECONDS")) or 600
local RATE = tonumber(os.getenv("SOAK_RATE")) or 500
local SAMPLE = tonumber(os.getenv("SOAK_SAMPLE")) or 30
local KEEP = tonumber(os.getenv("SOAK_KEEP")) or 60
local RETENTION_INTERVAL = tonumber(os.getenv("SOAK_RETENTION_INTERVAL")) or 10
local HOLD = math.min(tonumber(os.getenv("SOAK_HOLD")) or 120, SECONDS / 5)
local DRAIN = 30 -- seconds the workers run past the sender
local lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
local domain = "bench_soak"
local queue = domain .. "__commands"

local function now() return socket.gettime() end
local function sh(cmd)
  local f = io.popen(cmd .. " 2>&1")
  local out = f:read("*a")
  f:close()
  return out
end

local dsn = assert(os.getenv("DATABASE_URL"), "DATABASE_URL is not set")
-- Runs SQL through a file: statements with quotes and newlines reach psql as written.
local function psql(sql)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(sql, ";\n")
  f:close()
  local out = sh(("psql -qAt -F '|' %q -f %s"):format(dsn, path))
  os.remove(path)
  return out
end
do -- a database of its own, created afresh
  local name = "commandbus_bench_soak"
  psql("DROP DATABASE IF EXISTS " .. name .. " WITH (FORCE)")
  local out = psql("CREATE DATABASE " .. name)
  assert(not out:match("ERROR"), out)
  if dsn:match("^postgres") then dsn = dsn:gsub("^(postgres[^/]*//[^/]*)/?[^?]*", "%1/" .. name)
  else dsn = dsn .. " dbname=" .. name end
end

local bus = assert(commandbus.connect(dsn))
assert(bus:setup())
assert(bus:queue(queue):create())
assert(bus:set_retention{domain = domain, commands = KEEP, archive = KEEP, batches = KEEP, processes = KEEP})

-- Every table of the commandbus schema and the domain's queue and archive,
-- with their indexes: name, kind (r table, i index), bytes, dead tuples,
-- rows deleted so far.
local RELATIONS = [[
WITH t AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND (n.nspname = 'commandbus'
               OR c.oid IN ('pgmq.q_]] .. queue .. [['::regclass, 'pgmq.a_]] .. queue .. [['::regclass)))
SELECT rn.nspname || '.' || r.relname, r.relkind, pg_relation_size(r.oid), coalesce(s.n_dead_tup, 0), coalesce(s.n_tup_del, 0)
  FROM (SELECT oid FROM t UNION ALL SELECT i.indexrelid FROM pg_index i JOIN t ON t.oid = i.indrelid) x
  JOIN pg_class r ON r.oid = x.oid JOIN pg_namespace rn ON rn.oid = r.relnamespace
  LEFT JOIN pg_stat_all_tables s ON s.relid = r.oid ORDER BY 1]]

local function relations()
  local rels = {}
  for line in psql(RELATIONS):gmatch("[^\n]+") do
    local name, kind, bytes, dead, deleted = line:match("^([^|]+)|(%a)|(%d+)|(%d+)|(%d+)$")
    if name then rels[name] = {kind = kind, bytes = tonumber(bytes), dead = tonumber(dead), deleted = tonumber(deleted)} end
  end
  return rels
end

-- Pickup latency of the commands received in (from, to]: count, mean, p99 (ms).
local function pickup(from, to)
  local out = psql(([[SELECT count(*), coalesce(avg(d), 0), coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY d), 0)
    FROM (SELECT extract(epoch FROM r.ts - s.ts) * 1000 AS d FROM commandbus.audit r
          JOIN commandbus.audit s ON s.command_id = r.command_id AND s.domain = r.domain AND s.event_type = 'SENT'
          WHERE r.domain = '%s' AND r.event_type = 'RECEIVED' AND r.ts > to_timestamp(%.3f) AND r.ts <= to_timestamp(%.3f)) x]])
    :format(domain, from, to))
  local n, mean, p99 = out:match("^(%d+)|([%d%.e%-]+)|([%d%.e%-]+)")
  return tonumber(n) or 0, tonumber(mean) or 0, tonumber(p99) or 0
end

local function total(rels)
  local sum = 0
  for _, r in pairs(rels) do sum = sum + r.bytes end
  return sum
end

local function mb(bytes) return bytes / 1048576 end

-- The processes: a sender, two workers, and (later) the long transaction.
local tmp = os.tmpname()
local env = ("export DATABASE_URL=%q;"):format(dsn)
os.execute(("%s %s bench/soak/sender.lua %s %d %d > %s.sender 2>&1 &"):format(env, lua, domain, RATE, SECONDS, tmp))
for i = 1, 2 do
  os.execute(("%s %s bench/soak/worker_process.lua %s 2 %d %g > %s.worker%d 2>%s.log%d &"):format(
    env, lua, domain, SECONDS + DRAIN, RETENTION_INTERVAL, tmp, i, tmp, i))
end
local start = now()
local hold_from = start + SECONDS / 3
local hold_to = hold_from + HOLD
local holding = false
io.stderr:write(("bench/soak: %d s at %d commands/s, finished work kept %d s, a transaction held open %d s from %d s; sampling every %d s\n")
  :format(SECONDS, RATE, KEEP, HOLD, hold_from - start, SAMPLE))

local function phase(t)
  if t < hold_from then return "before" elseif t <= hold_to then return "during" else return "after" end
end

local samples = {}
local function take(t)
  local rels = relations()
  local q = rels["pgmq.q_" .. queue] or {deleted = 0, dead = 0}
  local prev = samples[#samples]
  local s = {t = t - start, rels = rels, size = total(rels), deleted = q.deleted, phase = phase(t)}
  if prev then
    s.done_per_s = (s.deleted - prev.deleted) / (s.t - prev.t)
    s.received, s.pickup_ms, s.pickup_p99_ms = pickup(start + prev.t, t)
  end
  samples[#samples + 1] = s
  local function dead(name) local r = rels[name]; return r and r.dead or 0 end
  local function size(name) local r = rels[name]; return r and r.bytes or 0 end
  print(("%6.0f %-7s %8s %9s %9s %8.1f %8.1f %8.1f %8.1f %8.1f %9d %9d %9d"):format(s.t, s.phase,
    s.done_per_s and ("%.0f"):format(s.done_per_s) or "-", s.pickup_ms and ("%.1f"):format(s.pickup_ms) or "-",
    s.pickup_p99_ms and ("%.1f"):format(s.pickup_p99_ms) or "-", mb(s.size), mb(size("commandbus.command")),
    mb(size("commandbus.audit")), mb(size("pgmq.q_" .. queue)), mb(size("pgmq.a_" .. queue)),
    dead("commandbus.command"), dead("commandbus.audit"), dead("pgmq.q_" .. queue)))
  io.stdout:flush()
end

print("     t phase     done/s pickup ms   p99 ms  all MB  cmd MB  audit MB queue MB archv MB  cmd dead audit dead queue dead")
take(now())
local next_sample = start + SAMPLE
while now() < start + SECONDS do
  local t = now()
  if not holding and t >= hold_from and HOLD > 0 then
    holding = true
    os.execute(("psql -qAt %q -c 'BEGIN ISOLATION LEVEL REPEATABLE READ' -c 'SELECT count(*) FROM commandbus.audit'"
      .. " -c 'SELECT pg_sleep(%d)' -c 'COMMIT' > /dev/null 2>&1 &"):format(dsn, HOLD))
  end
  if t >= next_sample then
    take(t)
    next_sample = next_sample + SAMPLE
  end
  socket.sleep(0.2)
end
if #samples == 0 or samples[#samples].t < SECONDS - 1 then take(now()) end

-- Let the workers drain and finish, then count.
local function read(path)
  local f = io.open(path)
  local s = f and f:read("*a") or ""
  if f then f:close() end
  return s
end
local deadline = now() + DRAIN + 30
while now() < deadline and not (read(tmp .. ".worker1"):match("health") and read(tmp .. ".worker2"):match("health")) do
  socket.sleep(0.5)
end
socket.sleep(1.5) -- statistics reach pg_stat a moment after a backend exits
local sent = tonumber(read(tmp .. ".sender"):match("sent (%d+)")) or 0
local stuck, successes, removed = 0, 0, 0
for i = 1, 2 do
  local h = read(tmp .. ".worker" .. i):match("health (.+)")
  if h then
    h = cjson.decode(h)
    stuck = stuck + h.stuck
    successes = successes + h.successes
    removed = removed + h.retention.commands
  else
    io.stderr:write("bench/soak: worker ", i, " did not finish: ", read(tmp .. ".log" .. i):sub(-2000), "\n")
  end
end
local final = relations()
local q = final["pgmq.q_" .. queue] or {deleted = 0}
local function count(sql) return tonumber(psql(sql):match("%d+")) or 0 end
local unfinished = count(("SELECT count(*) FROM commandbus.command WHERE domain = '%s' AND status IN ('PENDING', 'IN_PROGRESS')"):format(domain))
local in_tsq = count(("SELECT count(*) FROM commandbus.command WHERE domain = '%s' AND status = 'IN_TROUBLESHOOTING_QUEUE'"):format(domain))
local queued = count(("SELECT count(*) FROM pgmq.q_%s"):format(queue))
local lost = sent - q.deleted - queued - in_tsq
stuck = stuck + unfinished
for _, suffix in ipairs({".sender", ".worker1", ".worker2", ".log1", ".log2"}) do os.remove(tmp .. suffix) end
os.remove(tmp)

-- The figures.
local function at(fraction) -- the sample nearest to a point of the run
  local best
  for _, s in ipairs(samples) do
    if not best or math.abs(s.t - SECONDS * fraction) < math.abs(best.t - SECONDS * fraction) then best = s end
  end
  return best
end
local third, two_thirds, last = at(1 / 3), at(2 / 3), samples[#samples]
local growth_ratio = (last.size - two_thirds.size) / third.size
local function mean(field, from, to, ph)
  local sum, n = 0, 0
  for _, s in ipairs(samples) do
    if s[field] and s.t > from and s.t <= to and (not ph or s.phase == ph) then sum, n = sum + s[field], n + 1 end
  end
  return n > 0 and sum / n or 0
end
local start_rate = mean("done_per_s", 0, SECONDS / 3)
local end_rate = mean("done_per_s", SECONDS * 2 / 3, SECONDS + 1)
local throughput_end_ratio = start_rate > 0 and end_rate / start_rate or 0

print()
print(("growth over the last third: %.2f MB (%.1f%% of the %.2f MB at the end of the first third); now %.2f MB"):format(
  mb(last.size - two_thirds.size), growth_ratio * 100, mb(third.size), mb(last.size)))
print(("completions: %.0f/s over the first third, %.0f/s over the last (%.2fx)"):format(start_rate, end_rate, throughput_end_ratio))
local phases = {}
for _, ph in ipairs({"before", "during", "after"}) do
  phases[ph] = {done_per_s = math.floor(mean("done_per_s", 0, SECONDS + 1, ph)),
                pickup_ms = math.floor(mean("pickup_ms", 0, SECONDS + 1, ph) * 10) / 10,
                pickup_p99_ms = math.floor(mean("pickup_p99_ms", 0, SECONDS + 1, ph) * 10) / 10}
  print(("%-6s the %d s transaction: %d completions/s, pickup %.1f ms (p99 %.1f ms)"):format(ph, HOLD,
    phases[ph].done_per_s, phases[ph].pickup_ms, phases[ph].pickup_p99_ms))
end
print(("sent %d, completed %d, still queued %d, in the TSQ %d: lost %d; stuck %d; retention removed %d commands"):format(
  sent, q.deleted, queued, in_tsq, lost, stuck, removed))
print("largest relations at the end of the first third and at the end (MB):")
local names = {}
for name in pairs(final) do names[#names + 1] = name end
table.sort(names, function(a, b) return final[a].bytes > final[b].bytes end)
for i = 1, math.min(12, #names) do
  local n = names[i]
  print(("  %-52s %8.2f %8.2f"):format(n, mb((third.rels[n] or {bytes = 0}).bytes), mb(final[n].bytes)))
end
print(cjson.encode({bench = "soak", seconds = SECONDS, rate = RATE, keep_seconds = KEEP, hold_seconds = HOLD,
  growth_ratio = math.floor(growth_ratio * 1000) / 1000, throughput_end_ratio = math.floor(throughput_end_ratio * 100) / 100,
  lost = lost, stuck = stuck, sent = sent, retention_removed = removed,
  size_mb_first_third = math.floor(mb(third.size) * 10) / 10, size_mb_end = math.floor(mb(last.size) * 10) / 10,
  before = phases.before, during = phases.during, after = phases.after}))
bus:close()
