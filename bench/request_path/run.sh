#!/usr/bin/env bash
# bench/request_path/run.sh TREE [REQUESTS]: one request in flight through the
# build tree TREE (its build/ directory is used), in a fresh database, with
# what each process spent on it (path.lua). Give two trees in turn for an
# A/B comparison: on a shared machine only alternating pairs say anything.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
tree=$1
requests=${2:-500}
# The cluster of DATABASE_URL (its user must be allowed to create databases),
# or the private one scripts/pg starts; the database is made and dropped here.
url=${DATABASE_URL:-$("$here"/scripts/pg start)}
base=${url%/*}
db=${REQUEST_PATH_DB:-request_path}
psql -qAt "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" 2>&1 | grep -v NOTICE || true
(cd "$tree" && eval "$(COMMANDBUS_BUILD=$tree/build "$here"/scripts/env lua5.4)" &&
   export LUA_PATH="$tree/lua/?.lua;$tree/lua/?/init.lua;$here/?.lua;$LUA_PATH" &&
   DATABASE_URL=$base/$db lua5.4 "$here/bench/request_path/path.lua" "$requests" 2>&1 | grep -v " INFO ") |
  sed "s|^|$(basename "$tree") |"
psql -qAt "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
