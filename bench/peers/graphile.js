// The graphile-worker side of bench/peers, through its public API only
// (makeWorkerUtils, addJobs, addJob, runOnce, run and a task list). The
// bench installs graphile-worker into a temporary folder and points NODE_PATH
// at it; the schema is the bench's own (BENCH_PEERS_SCHEMA), never
// graphile_worker. The times insert and work print are wall-clock seconds,
// comparable with socket.gettime() on the Lua side; the latency mode times
// both ends of each request on CLOCK_MONOTONIC and prints the differences.
//
//   node graphile.js migrate
//       creates or updates the schema
//   node graphile.js insert <count> <start_at>
//       connects and builds <count> job specs, waits until the wall clock
//       reaches <start_at>, adds them with one addJobs call, prints
//       "inserted <count> <t0> <t1>"
//   node graphile.js work <concurrency> <start_at>
//       at <start_at>, runs no-op jobs with runOnce (which returns when no job
//       is left), prints "worked <jobs run> <t0> <t1>"
//   node graphile.js latency <requests> <warmup>
//       starts a worker process (latency-worker below), then adds one job at
//       a time with addJob and waits until its task has started; prints
//       "latencies <s> <s> ..." (add_job called to task started, the
//       warm-up requests left out)
//   node graphile.js latency-worker <port>
//       runs a worker (concurrency 1, default settings) whose "signal" task
//       sends "<payload.i> <time>" to the UDP port on loopback as it starts
//       (CLOCK_MONOTONIC seconds, the clock the latency mode reads too),
//       and whose "stop" task stops it; prints "ready" once running
"use strict";

const { run, runOnce, makeWorkerUtils, Logger } = require("graphile-worker");
const { Pool } = require("pg");
const dgram = require("node:dgram");
const { spawn } = require("node:child_process");
const readline = require("node:readline");

const connectionString = process.env.DATABASE_URL;
const schema = process.env.BENCH_PEERS_SCHEMA;
if (!connectionString || !schema) {
  console.error("bench/peers/graphile.js: DATABASE_URL and BENCH_PEERS_SCHEMA must be set");
  process.exit(2);
}

// Errors only: the info lines of every worker start would drown the figures.
const logger = new Logger(() => (level, message) => {
  if (level === "error") console.error(`graphile-worker: ${message}`);
});

const now = () => (performance.timeOrigin + performance.now()) / 1000;
// The latency part's clock: CLOCK_MONOTONIC, one clock for every process of
// the machine. timeOrigin + now() above is wall-clock time as each process
// sampled it at its start, and two processes disagree by 0.4 to 10 ms
// (measured here): the worker's start could come before the caller's send.
const monotonic = () => Number(process.hrtime.bigint()) / 1e9;
const sleepUntil = (t) => new Promise((resolve) => setTimeout(resolve, Math.max(0, (t - now()) * 1000)));
const seconds = (t) => t.toFixed(6);

// graphile-worker's settings for many small jobs, from its performance
// page: jobs fetched in batches into a local queue, completions batched.
// The pool: "10 or concurrentJobs + 2, whichever is larger", as its docs say.
function burnDownPreset(concurrency) {
  return {
    worker: {
      schema,
      concurrentJobs: concurrency,
      maxPoolSize: Math.max(10, concurrency + 2),
      localQueue: { size: 500 },
      completeJobBatchDelay: 0,
      failJobBatchDelay: 0,
    },
  };
}

async function migrate() {
  const utils = await makeWorkerUtils({ connectionString, schema, logger });
  await utils.migrate();
  await utils.release();
}

async function insert(count, startAt) {
  const utils = await makeWorkerUtils({ connectionString, schema, logger });
  await utils.withPgClient((client) => client.query("select 1")); // connected before the clock starts
  const specs = [];
  for (let i = 1; i <= count; i++) specs.push({ identifier: "noop", payload: { n: i } });
  await sleepUntil(startAt);
  const t0 = now();
  const jobs = await utils.addJobs(specs);
  const t1 = now();
  await utils.release();
  if (jobs.length !== count) throw new Error(`addJobs returned ${jobs.length} jobs for ${count} specs`);
  console.log(`inserted ${count} ${seconds(t0)} ${seconds(t1)}`);
}

async function work(concurrency, startAt) {
  const preset = burnDownPreset(concurrency);
  const pgPool = new Pool({ connectionString, max: preset.worker.maxPoolSize });
  pgPool.on("error", (e) => console.error(`bench/peers/graphile.js work: idle connection lost: ${e.message}`));
  (await pgPool.connect()).release(); // connected before the clock starts
  let ran = 0;
  const taskList = { noop: () => { ran++; } };
  await sleepUntil(startAt);
  const t0 = now();
  await runOnce({ pgPool, logger, noHandleSignals: true, taskList, preset });
  const t1 = now();
  await pgPool.end();
  console.log(`worked ${ran} ${seconds(t0)} ${seconds(t1)}`);
}

async function latencyWorker(port) {
  const socket = dgram.createSocket("udp4");
  let runner = null;
  const taskList = {
    signal: (payload) => { socket.send(`${payload.i} ${seconds(monotonic())}`, port, "127.0.0.1"); },
    // Stopping waits for running jobs, this one included: not from inside it.
    stop: () => { setImmediate(() => runner.stop()); },
  };
  runner = await run({ connectionString, logger, noHandleSignals: true, taskList,
                       preset: { worker: { schema, concurrentJobs: 1 } } });
  console.log("ready");
  await runner.promise;
  socket.close();
}

// The next line the child prints, or an error when it exits first.
function firstLine(child) {
  return new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: child.stdout });
    lines.once("line", (line) => { lines.close(); resolve(line); });
    child.once("exit", (code) => reject(new Error(`the latency worker exited (${code}) before it was ready`)));
  });
}

async function latency(requests, warmup) {
  const socket = dgram.createSocket("udp4");
  await new Promise((resolve) => socket.bind(0, "127.0.0.1", resolve));
  let signalled = null;
  socket.on("message", (message) => { if (signalled) signalled(String(message)); });

  const child = spawn(process.execPath, [__filename, "latency-worker", String(socket.address().port)],
                      { stdio: ["ignore", "pipe", "inherit"] });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  if ((await firstLine(child)) !== "ready") throw new Error("the latency worker did not start");

  const utils = await makeWorkerUtils({ connectionString, schema, logger });
  const latencies = [];
  for (let i = 1; i <= warmup + requests; i++) {
    let timer;
    const started = new Promise((resolve, reject) => {
      signalled = resolve;
      timer = setTimeout(() => reject(new Error(`job ${i}: no task started within 10 s`)), 10000);
    });
    const t0 = monotonic();
    await utils.addJob("signal", { i });
    const [n, at] = (await started).split(" ");
    clearTimeout(timer);
    if (Number(n) !== i) throw new Error(`job ${i}: the task of job ${n} signalled`);
    const latency = Number(at) - t0;
    if (!(latency >= 0)) throw new Error(`job ${i}: its task started ${seconds(latency)} s after addJob was called`);
    if (i > warmup) latencies.push(latency);
  }
  await utils.addJob("stop", {});
  await exited;
  await utils.release();
  socket.close();
  console.log(`latencies ${latencies.map(seconds).join(" ")}`);
}

const [mode, ...args] = process.argv.slice(2);
const modes = {
  migrate: () => migrate(),
  insert: () => insert(Number(args[0]), Number(args[1])),
  work: () => work(Number(args[0]), Number(args[1])),
  latency: () => latency(Number(args[0]), Number(args[1])),
  "latency-worker": () => latencyWorker(Number(args[0])),
};
if (!modes[mode]) {
  console.error("usage: node graphile.js migrate | insert <count> <start_at> | work <concurrency> <start_at>"
                + " | latency <requests> <warmup> | latency-worker <port>");
  process.exit(2);
}
modes[mode]().catch((e) => {
  console.error(`bench/peers/graphile.js ${mode}: ${e.stack || e}`);
  process.exit(1);
});
