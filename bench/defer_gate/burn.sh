#!/usr/bin/env bash
# bench/defer_gate/burn.sh BUILD C...: the direct burn-down (burn.lua) with the
# build tree BUILD (its build/ directory is used), one fresh database per run.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
tree=$1; shift
# The cluster of DATABASE_URL (its user must be allowed to create databases),
# or the private one scripts/pg starts; databases are made and dropped in it.
url=${DATABASE_URL:-$("$here"/scripts/pg start)}
base=${url%/*}
# BURN_DB names the database (made and dropped here), so that runs side by
# side do not share one.
db=${BURN_DB:-defer_burn}
for c in "$@"; do
  psql -qAt "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" 2>&1 | grep -v NOTICE || true
  (cd "$tree" && eval "$(COMMANDBUS_BUILD=$tree/build "$here"/scripts/env lua5.4)" && export LUA_PATH="$tree/lua/?.lua;$tree/lua/?/init.lua;$here/?.lua;$LUA_PATH" &&
     DATABASE_URL=$base/$db lua5.4 "$here/bench/defer_gate/burn.lua" "$c") | sed "s|^|$(basename "$tree") |"
done
psql -qAt "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
