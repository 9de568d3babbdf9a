#!/usr/bin/env bash
# bench/notify_lock/run.sh [SECONDS]: what the queue's NOTIFY does to commits
# that could share a WAL flush, in raw SQL (pgbench -M prepared), 1 client
# and 8: a one-row insert per transaction with the notify inside it
# (in.sql: what every send does), in a transaction of its own right after
# (after.sql: a second round trip), and without a notify (none.sql).
# PostgreSQL takes one lock for the whole cluster when a transaction that
# notified commits and keeps it until that commit is on disk, so notifying
# transactions never share a flush; one that only notifies writes no WAL
# before its commit record and does not wait for the disk. A fresh database
# is made and dropped here.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
seconds=${1:-5}
url=${DATABASE_URL:-$("$here"/scripts/pg start)}
db=${NOTIFY_LOCK_DB:-notify_lock}
pgbench=${PGBENCH:-pgbench}
psql -qAt "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" 2>&1 | grep -v NOTICE || true
probe=${url%/*}/$db
psql -qAt "$probe" -c "CREATE TABLE probe (id bigserial PRIMARY KEY, v text)"
for script in in after none; do
  for clients in 1 8; do
    tps=$("$pgbench" -n -M prepared -c "$clients" -j 2 -T "$seconds" -f "$here/bench/notify_lock/$script.sql" "$probe" 2>&1 |
      sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    echo "notify $script, $clients client(s): ${tps%.*} commits/s"
  done
done
psql -qAt "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
