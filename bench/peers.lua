-- bench/peers: commandbus beside graphile-worker, the Node.js job queue on
-- PostgreSQL, in one run on the same cluster (make bench-peers).
--
-- graphile-worker is installed with npm into a temporary folder for the run
-- (bench/peers/setup; Node.js and npm from Debian's packages when missing)
-- and driven through its public API by bench/peers/graphile.js, in a schema
-- of its own that the run drops at the end. Three figures, each side by side
-- with the ratio ours / theirs:
--
-- 1. insert N (50,000) in one call: our bus:send_batch, their addJobs (the
--    add_jobs function); best of BENCH_INSERT_ROUNDS = 3, rounds alternating.
-- 2. burn down N no-op jobs, end to end, the best configuration of each:
--    ours with module handlers at concurrency 1, 4 and 8 in one process and
--    two processes of 4; theirs two processes of concurrency 4 and of 24,
--    with the batching of its performance page (a local queue of 500,
--    completions batched).
-- 3. one request in flight, BENCH_REQUESTS = 1000 times (after 20 to warm
--    up), the worker in another process: the time from the send (our
--    bus:send, their addJob) to the handler running, p50 and p99; and ours
--    from the send until bus:await returns the completed command, and, in
--    turn with it, from bus:request's call until it returns. Beside those,
--    the floor of a whole request on this machine and cluster, in turns
--    with ours (bench/request_floor.c: the same rows and commits over plain
--    libpq, two processes, no runtime), and ours over it.
--
-- Every timed part runs in processes of its own, started together at an
-- agreed wall-clock time once connected and ready (Node's start-up is not
-- counted against it), and the run's figure is from the first start to the
-- last finish. Around each insert and burn-down the database's own counters
-- give WAL bytes, WAL records, full-page images, commits (pg_stat_database's
-- xact_commit, read-only transactions included) and WAL fsyncs per command:
-- what the work costs PostgreSQL, whoever is faster. Ends with one JSON line.
--
-- BENCH_PEERS_PARTS (default "insert,burn_down,latency") runs only the parts
-- it names, e.g. BENCH_PEERS_PARTS=latency for the third alone; the JSON line
-- then holds only their figures.
local commandbus = require "commandbus"
local cjson = require "cjson"
local socket = require "socket"
local common = require "bench.support.common"

local N = tonumber(os.getenv("BENCH_COMMANDS")) or 50000
local INSERT_ROUNDS = tonumber(os.getenv("BENCH_INSERT_ROUNDS")) or 3
local REQUESTS = tonumber(os.getenv("BENCH_REQUESTS")) or 1000
local WARMUP = 20
-- Requests of each of our ways between two turns of the floor (request_floor).
local FLOOR_TURN = 100
local PARTS = {}
for part in (os.getenv("BENCH_PEERS_PARTS") or "insert,burn_down,latency"):gmatch("[^,%s]+") do
  assert(part == "insert" or part == "burn_down" or part == "latency",
         "bench/peers: BENCH_PEERS_PARTS names insert, burn_down and latency, not " .. part)
  PARTS[part] = true
end
local GRAPHILE_WORKER = "0.17.3"
-- graphile-worker's schema for the run: never its default, graphile_worker,
-- which a database given in DATABASE_URL may use for real.
local SCHEMA = "cb_bench_peers_graphile_worker"
local DOMAIN = "bench_peers"
-- The application_name of this script's own connections: they sit idle
-- while work is measured (see common.settled).
local OWN = "bench_peers"
-- Seconds from launching the processes of a run to their agreed start.
local START_DELAY = 3
local CB_TABLES = {"commandbus.command", "commandbus.audit", "pgmq.q_" .. DOMAIN .. "__commands"}
local PEER_TABLES = {SCHEMA .. "._private_jobs"}

local bus = assert(commandbus.connect(common.dsn, {application_name = OWN}))
assert(bus:setup())
local folder = common.sh("mktemp -d /tmp/commandbus-bench-peers.XXXXXX"):match("^(%S+)\n$")
assert(folder, "bench/peers: mktemp failed")
local node = ("BENCH_PEERS_SCHEMA=%s NODE_PATH=%q node bench/peers/graphile.js"):format(SCHEMA, folder .. "/node_modules")

local function warn(fmt, ...) io.stderr:write(("bench/peers: " .. fmt .. "\n"):format(...)) end

local function cleanup()
  common.psql(("DROP SCHEMA IF EXISTS %s CASCADE"):format(SCHEMA))
  common.drop_domain(bus, DOMAIN)
  common.sh(("rm -rf %q"):format(folder))
end

-- The processes of one timed run: `cmd` (a format with one %.6f, the start
-- time) `count` times at once. Each prints "<word> [<n>] <t0> <t1>", <n>
-- being how much work it did where it says. Returns the run's span (first
-- start to last finish), the sum of the <n>s and the counters' change per
-- unit of work.
local function timed_run(cmd, count, word, units)
  local before = common.settled(OWN)
  local start_at = common.now() + START_DELAY
  local cmds = {}
  for i = 1, count do cmds[i] = cmd:format(start_at) end
  local out = common.at_once(cmds)
  local after = common.settled(OWN)
  local first, last, total, finished = math.huge, 0, 0, 0
  for line in out:gmatch("[^\n]+") do
    local fields = {}
    for field in line:gmatch("%S+") do fields[#fields + 1] = tonumber(field) or field end
    if fields[1] == word then
      local t0, t1 = fields[#fields - 1], fields[#fields]
      finished = finished + 1
      total = total + (#fields == 4 and fields[2] or 0)
      first, last = math.min(first, t0), math.max(last, t1)
      if t0 > start_at + 0.05 then warn("a process started %.3f s late", t0 - start_at) end
    end
  end
  assert(finished == count, ("bench/peers: %d of %d processes finished: %s"):format(finished, count, out))
  return last - first, total, common.per_unit(before, after, units)
end

local function cb_insert()
  common.fresh_domain(bus, DOMAIN)
  common.vacuum_analyze(CB_TABLES, "peers")
  local took, sent, per = timed_run(("%s bench/throughput/send_process.lua %s %d %%.6f"):format(common.lua, DOMAIN, N),
                                    1, "sent", N)
  assert(sent == N)
  return N / took, per
end

local function peer_clear()
  common.psql(("DELETE FROM %s._private_jobs"):format(SCHEMA))
end

local function peer_insert()
  peer_clear()
  common.vacuum_analyze(PEER_TABLES, "peers")
  local took, inserted, per = timed_run(("%s insert %d %%.6f"):format(node, N), 1, "inserted", N)
  assert(inserted == N)
  return N / took, per
end

local function cb_burn_down(processes, concurrency)
  cb_insert()
  common.vacuum_analyze(CB_TABLES, "peers")
  local took, _, per = timed_run(("%s bench/peers/cb_worker.lua burn %s %d %%.6f"):format(common.lua, DOMAIN, concurrency),
                                 processes, "worked", N)
  assert(common.completed(DOMAIN) == N, "bench/peers: not every command completed")
  return N / took, per
end

local function peer_burn_down(processes, concurrency)
  peer_insert()
  common.vacuum_analyze(PEER_TABLES, "peers")
  local took, ran, per = timed_run(("%s work %d %%.6f"):format(node, concurrency), processes, "worked", N)
  local left = tonumber(common.psql(("SELECT count(*) FROM %s._private_jobs"):format(SCHEMA)):match("%d+"))
  assert(ran == N and left == 0, ("bench/peers: graphile-worker ran %d jobs, %d left"):format(ran, left))
  return N / took, per
end

-- One request in flight through our bus, the two ways a caller does it, in
-- turn (so that both meet the same load): send, then await the completed
-- command; and bus:request, whose send registers the waiter in its own
-- transaction. Meanwhile the handler (in a worker process) has said over UDP
-- when it started. Returns, for each way, the lists of send-to-handler and
-- send-to-answer seconds.
local function cb_latency(between)
  common.fresh_domain(bus, DOMAIN)
  local udp = assert(socket.udp())
  assert(udp:setsockname("127.0.0.1", 0))
  local _, port = udp:getsockname()
  udp:settimeout(10)
  local worker = io.popen(("BENCH_PEERS_SIGNAL_PORT=%d %s bench/peers/cb_worker.lua serve %s"):format(port, common.lua, DOMAIN))
  assert(worker:read("l") == "ready", "bench/peers: our latency worker did not start")
  local ways = {
    send_await = {to_handler = {}, to_answer = {}, call = function(i)
      local sent = assert(bus:send{domain = DOMAIN, type = "Signal", data = {i = i}})
      return assert(bus:await(DOMAIN, sent.command_id, {timeout = 10}))
    end},
    request = {to_handler = {}, to_answer = {}, call = function(i)
      return assert(bus:request{domain = DOMAIN, type = "Signal", data = {i = i}, timeout = 10})
    end},
  }
  for i = 1, 2 * (WARMUP + REQUESTS) do
    local way = i % 2 == 1 and ways.send_await or ways.request
    local t0 = common.now()
    local cmd = way.call(i)
    local t2 = common.now()
    assert(cmd.status == "COMPLETED", "bench/peers: a latency command ended " .. tostring(cmd.status))
    local signal = assert(udp:receive()) -- sent while this process was waiting
    local n, started = signal:match("^(%d+) ([%d%.]+)$")
    assert(tonumber(n) == i, "bench/peers: the handler of another command signalled: " .. signal)
    if i > 2 * WARMUP then
      way.to_handler[#way.to_handler + 1] = tonumber(started) - t0
      way.to_answer[#way.to_answer + 1] = t2 - t0
      local done = math.floor((i - 2 * WARMUP) / 2)
      if i % 2 == 0 and (done % FLOOR_TURN == 0 or done == REQUESTS) then
        between(done % FLOOR_TURN == 0 and FLOOR_TURN or done % FLOOR_TURN)
      end
    end
  end
  assert(bus:send{domain = DOMAIN, type = "Stop"})
  worker:close()
  udp:close()
  return ways.send_await, ways.request
end

local function peer_latency()
  peer_clear()
  local out = common.sh(("%s latency %d %d"):format(node, REQUESTS, WARMUP))
  local list = out:match("latencies ([^\n]*)")
  assert(list, "bench/peers: graphile-worker's latency run failed: " .. out)
  local latencies = {}
  for x in list:gmatch("%S+") do latencies[#latencies + 1] = tonumber(x) end
  assert(#latencies == REQUESTS, ("bench/peers: graphile-worker's latency run printed %d latencies for %d requests: %s")
    :format(#latencies, REQUESTS, out))
  return latencies
end

-- The floor of one request in flight (bench/request_floor.c): the same rows
-- and commits as ours over plain libpq, two processes and nothing else. It
-- runs in turns with ours (FLOOR_TURN requests after each FLOOR_TURN of each
-- of our ways, a few more to warm up each time), so that both meet the same
-- load. Returns the function that runs a turn of n requests, and the lists
-- it fills: send-to-received and send-to-answer seconds, and the CPU (ms) of
-- the floor's processes and backends, a request.
local function request_floor()
  local build = os.getenv("COMMANDBUS_BUILD") or "build"
  local floor = {to_received = {}, to_answer = {}, cpu_ms = {}}
  return function(n)
    local out = common.sh(("BENCH_REQUESTS=%d BENCH_WARMUP=5 BENCH_FLOOR_RAW=1 %s/bench_request_floor"):format(n, build))
    local line = out:match("({\"bench\":\"request_floor\"[^\n]*})")
    assert(line, "bench/peers: the request floor failed: " .. out)
    for l in out:gmatch("[^\n]+") do
      local received, answer = l:match("^raw (%S+) (%S+)$")
      if received then
        floor.to_received[#floor.to_received + 1] = tonumber(received)
        floor.to_answer[#floor.to_answer + 1] = tonumber(answer)
      end
    end
    floor.cpu_ms[#floor.cpu_ms + 1] = cjson.decode(line).floor_cpu_ms
  end, floor
end

local function ms(seconds) return math.floor(seconds * 100000 + 0.5) / 100 end

local result = {bench = "peers", peer = "graphile-worker " .. GRAPHILE_WORKER, commands = N}

local function insert_part()
  -- 1. Insert.
  local cb_inserts, peer_inserts, cb_insert_per, peer_insert_per = {}, {}, nil, nil
  for r = 1, INSERT_ROUNDS do
    local rate, per = cb_insert()
    if rate > math.max(0, table.unpack(cb_inserts)) then cb_insert_per = per end
    cb_inserts[r] = rate
    rate, per = peer_insert()
    if rate > math.max(0, table.unpack(peer_inserts)) then peer_insert_per = per end
    peer_inserts[r] = rate
  end
  local cb_insert_rate, peer_insert_rate = math.max(table.unpack(cb_inserts)), math.max(table.unpack(peer_inserts))
  result.cb_insert_per_s = math.floor(cb_insert_rate)
  result.peer_insert_per_s = math.floor(peer_insert_rate)
  result.insert_ratio = common.ratio(cb_insert_rate, peer_insert_rate)
  print(("insert %d in one call (best of %d): commandbus send_batch %.0f/s, graphile-worker addJobs %.0f/s: %.2fx"):format(
    N, INSERT_ROUNDS, cb_insert_rate, peer_insert_rate, cb_insert_rate / peer_insert_rate))
  print(("  rounds: commandbus %s | graphile-worker %s"):format(common.rates_text(cb_inserts), common.rates_text(peer_inserts)))
  print("  commandbus, per command: " .. common.per_unit_text(cb_insert_per))
  print("  graphile-worker, per job: " .. common.per_unit_text(peer_insert_per))
  return cb_insert_per, peer_insert_per
end

local function burn_down_part()
  -- 2. Burn down, the two sides' configurations taking turns.
  local runs = {
    {side = "cb", processes = 1, concurrency = 1}, {side = "peer", processes = 2, concurrency = 4},
    {side = "cb", processes = 1, concurrency = 4}, {side = "peer", processes = 2, concurrency = 24},
    {side = "cb", processes = 1, concurrency = 8}, {side = "cb", processes = 2, concurrency = 4},
  }
  local best = {cb = {rate = 0}, peer = {rate = 0}}
  for _, run in ipairs(runs) do
    local burn_down = run.side == "cb" and cb_burn_down or peer_burn_down
    run.rate, run.per = burn_down(run.processes, run.concurrency)
    run.name = ("%dx%d"):format(run.processes, run.concurrency)
    result[("%s_burn_down_per_s_%s"):format(run.side, run.name)] = math.floor(run.rate)
    if run.rate > best[run.side].rate then best[run.side] = run end
  end
  print(("burn down %d no-op jobs (processes x concurrency):"):format(N))
  for _, side in ipairs({"cb", "peer"}) do
    for _, run in ipairs(runs) do
      if run.side == side then
        print(("  %s %s: %.0f/s; per %s: %s"):format(side == "cb" and "commandbus" or "graphile-worker", run.name, run.rate,
          side == "cb" and "command" or "job", common.per_unit_text(run.per)))
      end
    end
  end
  local cb, peer = best.cb, best.peer
  result.cb_burn_down_per_s = math.floor(cb.rate)
  result.peer_burn_down_per_s = math.floor(peer.rate)
  result.cb_burn_down_config = cb.name
  result.peer_burn_down_config = peer.name
  result.burn_down_ratio = common.ratio(cb.rate, peer.rate)
  print(("burn down, best of each: commandbus %s %.0f/s, graphile-worker %s %.0f/s: %.2fx"):format(
    cb.name, cb.rate, peer.name, peer.rate, cb.rate / peer.rate))
  return cb.per, peer.per
end

local function latency_part()
  -- 3. One request in flight.
  local floor_turn, floor = request_floor()
  local send_await, request = cb_latency(floor_turn)
  local peer_to_task = peer_latency()
  for _, f in ipairs({{"cb_latency", send_await.to_handler}, {"cb_roundtrip", send_await.to_answer},
                      {"cb_request_latency", request.to_handler}, {"cb_request", request.to_answer},
                      {"floor_received", floor.to_received}, {"floor_answer", floor.to_answer},
                      {"peer_latency", peer_to_task}}) do
    result[f[1] .. "_p50_ms"] = ms(common.percentile(f[2], 50))
    result[f[1] .. "_p99_ms"] = ms(common.percentile(f[2], 99))
  end
  assert(#floor.to_answer == REQUESTS, "bench/peers: the request floor ran " .. #floor.to_answer .. " requests")
  local cpu = 0
  for _, x in ipairs(floor.cpu_ms) do cpu = cpu + x / #floor.cpu_ms end
  result.floor_cpu_ms = math.floor(cpu * 1000 + 0.5) / 1000
  result.roundtrip_floor_p50_ratio = common.ratio(result.cb_roundtrip_p50_ms, result.floor_answer_p50_ms)
  result.request_floor_p50_ratio = common.ratio(result.cb_request_p50_ms, result.floor_answer_p50_ms)
  result.latency_p50_ratio = common.ratio(result.cb_latency_p50_ms, result.peer_latency_p50_ms)
  result.latency_p99_ratio = common.ratio(result.cb_latency_p99_ms, result.peer_latency_p99_ms)
  print(("one request in flight (%d each way, in turn, after %d to warm up), the worker in another process:"):format(
    REQUESTS, WARMUP))
  print(("  send to handler started: commandbus p50 %.2f ms, p99 %.2f ms; graphile-worker addJob to task started p50 %.2f ms, p99 %.2f ms: %.2fx, %.2fx (lower is better)"):format(
    result.cb_latency_p50_ms, result.cb_latency_p99_ms, result.peer_latency_p50_ms, result.peer_latency_p99_ms,
    result.cb_latency_p50_ms / result.peer_latency_p50_ms, result.cb_latency_p99_ms / result.peer_latency_p99_ms))
  print(("  commandbus send, handler, await returns: p50 %.2f ms, p99 %.2f ms"):format(
    result.cb_roundtrip_p50_ms, result.cb_roundtrip_p99_ms))
  print(("  commandbus request (its send registers the waiter), handler, returns: p50 %.2f ms, p99 %.2f ms;"
         .. " send to handler started p50 %.2f ms, p99 %.2f ms"):format(
    result.cb_request_p50_ms, result.cb_request_p99_ms, result.cb_request_latency_p50_ms,
    result.cb_request_latency_p99_ms))
  print(("  floor (bench/request_floor: the same rows and commits over plain libpq, two processes, %d requests in"
         .. " turns with ours): send to answer p50 %.2f ms, p99 %.2f ms; send to received p50 %.2f ms, p99 %.2f ms;"
         .. " %.3f ms CPU a request (processes and backends)"):format(REQUESTS,
    result.floor_answer_p50_ms, result.floor_answer_p99_ms, result.floor_received_p50_ms,
    result.floor_received_p99_ms, result.floor_cpu_ms))
  print(("  commandbus over the floor, p50: send, handler, await returns %.2fx; request %.2fx"):format(
    result.cb_roundtrip_p50_ms / result.floor_answer_p50_ms, result.cb_request_p50_ms / result.floor_answer_p50_ms))
end

local function main()
  assert(os.execute(("bench/peers/setup %q %s"):format(folder, GRAPHILE_WORKER)), "bench/peers: setup failed")
  common.psql(("DROP SCHEMA IF EXISTS %s CASCADE"):format(SCHEMA))
  local migrated = common.sh(node .. " migrate")
  assert(migrated == "", "bench/peers: graphile-worker's migration failed: " .. migrated)
  warn("%d jobs, %s cores, PostgreSQL on the same machine; graphile-worker %s on Node.js %s",
       N, common.sh("nproc"):match("%d+"), GRAPHILE_WORKER, common.sh("node --version"):match("v[%d%.]+"))

  local costs = {}
  if PARTS.insert then
    local cb_per, peer_per = insert_part()
    costs.cb_insert, costs.peer_insert = cb_per, peer_per
  end
  if PARTS.burn_down then
    local cb_per, peer_per = burn_down_part()
    costs.cb_burn_down, costs.peer_burn_down = cb_per, peer_per
  end
  -- What each side's command costs PostgreSQL (the best runs' windows).
  for name, per in pairs(costs) do
    result[name .. "_wal_bytes_per_cmd"] = math.floor(per.wal_bytes + 0.5)
    result[name .. "_commits_per_cmd"] = math.floor(per.commits * 1000 + 0.5) / 1000
    result[name .. "_wal_fsyncs_per_cmd"] = math.floor(per.wal_syncs * 1000 + 0.5) / 1000
  end

  if PARTS.latency then latency_part() end
end

local ok, err = xpcall(main, debug.traceback)
cleanup()
bus:close()
if not ok then error(err, 0) end
print(cjson.encode(result))
