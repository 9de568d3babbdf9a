#!/usr/bin/env bash
# bench/defer_gate/run.sh PAIRS: today's vs the deferred burn-down round, raw SQL,
# a fresh database each run, alternating.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/env lua5.4)"
# The cluster of DATABASE_URL (its user must be allowed to create databases),
# or the private one scripts/pg starts; databases are made and dropped in it.
url=${DATABASE_URL:-$(scripts/pg start)}
base=${url%/*}
pgb=$(ls /usr/lib/postgresql/*/bin/pgbench | sort -V | tail -n1)
N=${N:-50000}
for pair in $(seq 1 "${1:-3}"); do
  for shape in today deferred; do
    psql -qAt "$url" -c "DROP DATABASE IF EXISTS defer_gate WITH (FORCE)" -c "CREATE DATABASE defer_gate"
    db=$base/defer_gate
    DATABASE_URL=$db lua5.4 bench/defer_gate/setup.lua
    $pgb -n -M prepared -c 1 -t $((N / 100)) -f bench/throughput/floor_send.sql "$db" >/dev/null
    for t in commandbus.command commandbus.audit pgmq.q_bench_floor__commands; do psql -qAt "$db" -c "VACUUM ANALYZE $t"; done
    psql -qAt "$db" -c "CHECKPOINT"
    read -r lsn0 rec0 <<<"$(psql -qAt -F' ' "$db" -c "SELECT pg_current_wal_lsn(), wal_records FROM pg_stat_wal")"
    t0=$(date +%s.%N)
    $pgb -n -M prepared -c 1 -t $((N / 100)) -f bench/defer_gate/$shape.sql "$db" >/tmp/defer_gate_pgbench.log 2>&1 &
    pgbpid=$!
    # The backend's CPU (utime + stime, clock ticks), last seen before it exits.
    bpid=""; while [ -z "$bpid" ] && kill -0 $pgbpid 2>/dev/null; do
      bpid=$(psql -qAt "$db" -c "SELECT pid FROM pg_stat_activity WHERE datname = 'defer_gate' AND application_name = 'pgbench'"); done
    ticks=0; while [ -n "$bpid" ] && s=$(cat /proc/$bpid/stat 2>/dev/null); do
      ticks=$(echo "$s" | awk '{print $14 + $15}'); sleep 0.05; done
    wait $pgbpid || { cat /tmp/defer_gate_pgbench.log; exit 1; }
    t1=$(date +%s.%N)
    read -r bytes rec1 <<<"$(psql -qAt -F' ' "$db" -c "SELECT pg_current_wal_lsn() - '$lsn0'::pg_lsn, wal_records FROM pg_stat_wal")"
    left=$(psql -qAt "$db" -c "SELECT count(*) FROM pgmq.q_bench_floor__commands")
    done_n=$(psql -qAt "$db" -c "SELECT count(*) FROM commandbus.command WHERE status = 'COMPLETED'")
    audits=$(psql -qAt "$db" -c "SELECT count(*) FROM commandbus.audit")
    echo "$pair $shape rate $(echo "$N / ($t1 - $t0)" | bc -l | xargs printf %.0f)/s wal $((bytes / N)) B/cmd cpu $((ticks * 10000000 / N / 1000))us/cmd records $(echo "($rec1 - $rec0) / $N" | bc -l | xargs printf %.1f)/cmd left $left completed $done_n audits $audits load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
psql -qAt "$url" -c "DROP DATABASE IF EXISTS defer_gate WITH (FORCE)"
