-- Helpers shared by the Lua benchmarks of bench/: the clock, the shell and
-- psql, fresh command domains, processes started together, percentiles, and
-- the database's own counters (WAL written, transactions committed) around a
-- measured run. Benchmarks run from the repository's root with DATABASE_URL
-- set (make bench-NAME does both).
local socket = require "socket"

local common = {}

common.dsn = assert(os.getenv("DATABASE_URL"), "DATABASE_URL is not set")
-- The interpreter of the processes a benchmark starts (scripts/env sets it).
common.lua = os.getenv("COMMANDBUS_LUA") or "lua5.4"
-- Wall-clock seconds, with microseconds: comparable across processes.
common.now = socket.gettime
common.sleep = socket.sleep

-- Runs a shell command; returns what it printed (stdout and stderr).
function common.sh(cmd)
  local f = io.popen(cmd .. " 2>&1")
  local out = f:read("*a")
  f:close()
  return out
end

-- One statement through psql, unaligned and without headers.
function common.psql(sql)
  return common.sh(("psql -qAt %q -c %q"):format(common.dsn, sql))
end

-- VACUUM ANALYZE each table, one psql -c per table: VACUUM refuses to run in
-- the implicit transaction of a multi-statement string. Earlier runs leave
-- dead rows, and tables grown from nothing are planned as tiny (prepared
-- statements keep a generic plan that scans them whole) until autovacuum's
-- next ANALYZE: both would make runs incomparable.
function common.vacuum_analyze(tables, bench_name)
  for _, t in ipairs(tables) do
    local out = common.psql("VACUUM ANALYZE " .. t)
    if out:match("ERROR") then io.stderr:write(("bench/%s: %s"):format(bench_name, out)) end
  end
end

-- Removes a domain's commands, audit rows and command queue (names come
-- from the benchmark itself, never from outside).
function common.drop_domain(bus, name)
  common.psql(("DELETE FROM commandbus.command WHERE domain = '%s'; DELETE FROM commandbus.audit WHERE domain = '%s';")
    :format(name, name))
  bus:queue(name .. "__commands"):drop()
end

function common.fresh_domain(bus, name)
  common.drop_domain(bus, name)
  assert(bus:queue(name .. "__commands"):create())
  return name
end

-- How many of the domain's commands are COMPLETED.
function common.completed(name)
  local out = common.psql(("SELECT count(*) FROM commandbus.command WHERE domain = '%s' AND status = 'COMPLETED'")
    :format(name))
  return tonumber(out:match("%d+"))
end

-- Runs shell commands as OS processes at once; returns what they all printed
-- once every one has exited.
function common.at_once(cmds)
  return common.sh("(" .. table.concat(cmds, " & ") .. " & wait)")
end

-- The ratio x / reference, rounded down to two decimals (for the JSON line).
function common.ratio(x, reference)
  return math.floor(x / reference * 100) / 100
end

-- Rates as "25947 20823 32458" (a benchmark's rounds, in order).
function common.rates_text(rates)
  local t = {}
  for i, x in ipairs(rates) do t[i] = ("%.0f"):format(x) end
  return table.concat(t, " ")
end

-- The p-th percentile (0 < p <= 100, nearest rank) of a list of numbers.
function common.percentile(values, p)
  local sorted = {table.unpack(values)}
  table.sort(sorted)
  return sorted[math.max(1, math.ceil(#sorted * p / 100))]
end

-- The cluster's WAL counters (pg_stat_wal) and this database's committed
-- transactions (pg_stat_database.xact_commit, read-only ones included).
--
-- A backend sends its counters to these views when it has been idle a while
-- (up to 10 s later) or when it exits. So a benchmark that reads them does
-- the measured work in processes of their own, and reads the counters once
-- every connection but its own has closed: common.settled(own), where `own`
-- is the application_name of the benchmark's own connections (the bus it
-- passes it to, which must sit idle while work is measured).
local COUNTERS_SQL = [[
SELECT w.wal_bytes, w.wal_records, w.wal_fpi, w.wal_sync, d.xact_commit,
       (SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND backend_type = 'client backend'
           AND pid <> pg_backend_pid() AND application_name <> '%s')
  FROM pg_stat_wal w, pg_stat_database d WHERE d.datname = current_database()]]

local function counters(own)
  local out = common.psql(COUNTERS_SQL:format(own))
  local bytes, records, fpi, syncs, commits, others = out:match("^(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)")
  assert(bytes, "bench: cannot read pg_stat_wal and pg_stat_database: " .. out)
  return {wal_bytes = tonumber(bytes), wal_records = tonumber(records), wal_fpi = tonumber(fpi),
          wal_syncs = tonumber(syncs), commits = tonumber(commits), others = tonumber(others)}
end

-- The counters once no other client is connected (waiting up to 10 s) and
-- the last ones to leave have had a moment to report.
function common.settled(own)
  assert(own:match("^[%w_]+$"), "bench: application_name must be letters, digits and _")
  local deadline = common.now() + 10
  while counters(own).others > 0 and common.now() < deadline do common.sleep(0.05) end
  common.sleep(0.2)
  return counters(own)
end

-- Per unit of work (a command, a job) between two readings of the counters:
-- {wal_bytes=, wal_records=, wal_fpi=, wal_syncs=, commits=}.
function common.per_unit(before, after, units)
  local per = {}
  for _, k in ipairs({"wal_bytes", "wal_records", "wal_fpi", "wal_syncs", "commits"}) do
    per[k] = (after[k] - before[k]) / units
  end
  return per
end

-- "2476 WAL bytes (24.1 records, 0.00 full pages), 0.039 commits, 0.029 WAL fsyncs"
function common.per_unit_text(per)
  return ("%.0f WAL bytes (%.1f records, %.2f full pages), %.3f commits, %.3f WAL fsyncs"):format(
    per.wal_bytes, per.wal_records, per.wal_fpi, per.commits, per.wal_syncs)
end

return common
