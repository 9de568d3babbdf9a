/*
 * Benchmark of the queue client: messages/s for send, read and delete at
 * batch sizes 1 and 100, through the core (cb_queue_*), against pgbench
 * running the same SQL (the bench/queue scripts) in the same run.
 *
 * Setup (printed at the start):
 *   - pgbench: -n -M prepared -c C -j C (C = 2 by default: the cores), one
 *     connection per client, at most C transactions in flight.
 *   - ours "matched": one runtime with pool_size C, C caller threads, each
 *     calling the blocking cb_queue_send / send_batch / read / delete in a
 *     loop: at most C transactions in flight, like pgbench. This is the
 *     headline figure and the one in the ratio.
 *   - ours "pipelined": the same threads and pool, each thread building D
 *     units (cb_queue_add_*) and running them with one cb_runtime_exec_many:
 *     each unit is still its own transaction, D of them per round trip.
 *     Informative (pgbench at -c C has no equivalent); ratio given too.
 *
 * Operations (one message = one row):
 *   send_1    one cb_queue_send per transaction (INSERT ... RETURNING +
 *             pg_notify in one transaction; pgbench: the same two statements
 *             in one \startpipeline ... \endpipeline, one Sync).
 *   send_100  one send_batch of 100 messages per transaction.
 *   read_N    one read of qty N per transaction (WITH ... FOR UPDATE SKIP
 *             LOCKED UPDATE ... RETURNING), vt = 0 so that read messages stay
 *             visible: the queue head stays put and every read does the same
 *             work for the whole run (with a real vt, pgmq's read must skip
 *             every invisible row before the head, by msg_id order, and gets
 *             slower as the run goes, which would measure that scan). The
 *             queue is prefilled with 200 messages per client (read_prefill).
 *   delete_N  DELETE ... = ANY of N ids per transaction, a fixed count of
 *             transactions per client over disjoint id ranges of a
 *             prefilled queue.
 * The matched pair runs BENCH_QUEUE_REPS times (2), alternating which side
 * goes first (ours, pgbench, pgbench, ours), and the best run of each side is
 * kept: this machine is shared and noisy, and interference only ever slows a
 * run down. Pipelined runs once.
 * Every side gets a fresh queue (dropped, created, prefilled, ANALYZEd, then
 * CHECKPOINT) so that both start from the same state; the rows the database
 * reports afterwards (count, sum(read_ct)) are checked against the counts.
 *
 * Environment: DATABASE_URL (required), BENCH_QUEUE_SECONDS (default 3),
 * BENCH_QUEUE_CLIENTS (default 2), BENCH_QUEUE_DEPTH (default 8),
 * PGBENCH (default: /usr/lib/postgresql/15/bin/pgbench, else pgbench on PATH),
 * BENCH_QUEUE_DELETE_1_TXNS / BENCH_QUEUE_DELETE_100_TXNS (per client; 3000,
 * 300), BENCH_QUEUE_ONLY (e.g. "read_1,delete_100": only those figures),
 * BENCH_QUEUE_SCRIPTS (the directory of the pgbench scripts),
 * BENCH_QUEUE_LUA_MESSAGES (30000: the size of the Lua send_batch, below).
 * Last, "lua_send_batch": q:send_batch of that many messages from a Lua
 * script (bench/queue/send_batch.lua) under LuaJIT and under Lua 5.4 (the
 * reference), best of 3 each, and the ratio.
 * Ends with one JSON line. Takes about 100 s with the defaults.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "commandbus/queue.h"
#include "commandbus/runtime.h"

#define Q_OURS "bench_queue_ours"
#define Q_PGB "bench_queue_pgb" /* hard-coded in the bench/queue scripts */
#define MSG "{\"kind\":\"bench\",\"n\":12345,\"body\":\"a small message of about sixty bytes\"}"
#define DELAY "0.000000" /* what cb_queue_add_* binds for delay 0 */
#define MAX_CLIENTS 64
#define MAX_DEPTH 256

static const char *url;
static int clients = 2;
static int depth = 8;
static int seconds = 3;
static int reps = 2;
/* The read queue: twice what the clients can hold locked at once. Larger
 * queues make pgmq's read slower and erratic (its UPDATE joins the whole
 * table, whose dead row versions pile up at vt 0), measuring the server. */
static int64_t read_prefill(void) { return (int64_t)clients * 100 * 2; }
static char script_dir[1024];
static char pgbench_path[1024];
static char *batch_json; /* JSON array of 100 MSG */

enum { OP_SEND, OP_READ, OP_DELETE };
static const char *op_names[] = {"send", "read", "delete"};

/* CPU seconds (user + system) of this process's threads, or of its
 * waited-for children (pgbench). */
static double csw_count(int who) {
  struct rusage ru;
  getrusage(who, &ru);
  return (double)ru.ru_nvcsw + (double)ru.ru_nivcsw;
}

static double cpu_s(int who) {
  struct rusage ru;
  getrusage(who, &ru);
  return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
         (double)ru.ru_stime.tv_usec / 1e6;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const cb_err *err) {
  fprintf(stderr, "bench_queue: %s: %s\n", what, err ? err->message : "");
  exit(1);
}

static char *json_array(int n) {
  size_t len = strlen(MSG);
  char *s = malloc((size_t)n * (len + 1) + 3);
  char *p = s;
  *p++ = '[';
  for (int i = 0; i < n; i++) {
    if (i) *p++ = ',';
    memcpy(p, MSG, len);
    p += len;
  }
  *p++ = ']';
  *p = '\0';
  return s;
}

/* ---- helpers on the database -------------------------------------------------- */

static void exec_sql(cb_runtime *rt, const char *sql, int oneshot, int tolerate) {
  cb_unit *u = cb_unit_new();
  cb_err err;
  cb_unit_add_flags(u, sql, 0, NULL, oneshot ? CB_STMT_ONESHOT : 0);
  int rc = cb_runtime_exec(rt, u, &err);
  cb_unit_free(u);
  if (rc != CB_OK && !tolerate) die(sql, &err);
}

static void query_ints(cb_runtime *rt, const char *sql, int64_t *out, int n) {
  cb_unit *u = cb_unit_new();
  cb_err err;
  cb_unit_add_flags(u, sql, 0, NULL, CB_STMT_ONESHOT);
  if (cb_runtime_exec(rt, u, &err) != CB_OK) die(sql, &err);
  const cb_result *r = cb_unit_result(u, 0);
  for (int i = 0; i < n; i++) out[i] = cb_result_is_null(r, 0, i) ? 0 : cb_result_int(r, 0, i);
  cb_unit_free(u);
}

static void fresh_queue(cb_runtime *rt, const char *q) {
  cb_err err;
  int existed;
  if (cb_queue_drop(rt, q, &existed, &err) != CB_OK) die("drop queue", &err);
  if (cb_queue_create(rt, q, &err) != CB_OK) die("create queue", &err);
}

static void drop_queue(cb_runtime *rt, const char *q) {
  cb_err err;
  int existed;
  if (cb_queue_drop(rt, q, &existed, &err) != CB_OK) die("drop queue", &err);
}

/* Fills q with n messages (send_batch of 1000, pipelined); returns the first
 * id and checks that the ids are contiguous. */
static int64_t prefill(cb_runtime *rt, const char *q, int64_t n) {
  static char *big;
  if (big == NULL) big = json_array(1000);
  char *rest = NULL;
  cb_unit *units[16];
  cb_err err;
  int64_t left = n;
  while (left > 0) {
    size_t k = 0;
    while (left > 0 && k < 16) {
      units[k] = cb_unit_new();
      const char *arr = big;
      if (left < 1000) {
        free(rest);
        rest = json_array((int)left);
        arr = rest;
      }
      cb_queue_add_send_batch(units[k], q, arr, 0);
      left -= left < 1000 ? left : 1000;
      k++;
    }
    if (cb_runtime_exec_many(rt, units, k, &err) != CB_OK) die("prefill", &err);
    for (size_t i = 0; i < k; i++) {
      if (cb_unit_status(units[i]) != CB_OK) die("prefill", cb_unit_error(units[i]));
      cb_unit_free(units[i]);
    }
  }
  free(rest);
  char sql[256];
  int64_t v[3];
  snprintf(sql, sizeof sql, "SELECT min(msg_id), max(msg_id), count(*) FROM pgmq.q_%s", q);
  query_ints(rt, sql, v, 3);
  if (v[2] != n || v[1] - v[0] + 1 != n) {
    fprintf(stderr, "bench_queue: prefill of %s: %" PRId64 " rows, ids %" PRId64 "..%" PRId64 "\n", q, v[2], v[0],
            v[1]);
    exit(1);
  }
  snprintf(sql, sizeof sql, "ANALYZE pgmq.q_%s", q);
  exec_sql(rt, sql, 1, 0);
  return v[0];
}

/* ---- our side -------------------------------------------------------------------- */

typedef struct phase {
  cb_runtime *rt;
  const char *queue;
  int op, batch, depth;
  long per_client; /* > 0: fixed transactions per client; else until stop */
  int64_t id_base, span;
  atomic_int stop;
  atomic_int ready;
  atomic_int go;
} phase;

typedef struct worker {
  phase *ph;
  int id;
  long txns;
  int64_t msgs;
  pthread_t thread;
} worker;

static void check_unit(cb_unit *u) {
  if (cb_unit_status(u) != CB_OK) die("unit", cb_unit_error(u));
}

static void *work(void *arg) {
  worker *w = arg;
  phase *ph = w->ph;
  cb_err err;
  cb_unit *units[MAX_DEPTH];
  int64_t ids[100];
  for (int i = 0; i < ph->depth; i++) units[i] = cb_unit_new();
  const char *json = ph->batch == 1 ? MSG : batch_json;
  int64_t next_id = ph->id_base + (int64_t)w->id * ph->span;

  atomic_fetch_add(&ph->ready, 1);
  while (!atomic_load(&ph->go)) sched_yield();

  for (;;) {
    if (ph->per_client > 0 ? w->txns >= ph->per_client : atomic_load_explicit(&ph->stop, memory_order_relaxed)) break;
    int d = ph->depth;
    if (ph->per_client > 0 && ph->per_client - w->txns < d) d = (int)(ph->per_client - w->txns);
    if (ph->depth == 1) {
      /* The plain blocking API, one transaction per call. */
      if (ph->op == OP_SEND && ph->batch == 1) {
        int64_t id;
        if (cb_queue_send(ph->rt, ph->queue, json, 0, &id, &err) != CB_OK) die("send", &err);
        w->msgs += 1;
      } else if (ph->op == OP_SEND) {
        int64_t *got;
        size_t n;
        if (cb_queue_send_batch(ph->rt, ph->queue, json, 0, &got, &n, &err) != CB_OK) die("send_batch", &err);
        w->msgs += (int64_t)n;
        free(got);
      } else if (ph->op == OP_READ) {
        cb_messages m;
        if (cb_queue_read(ph->rt, ph->queue, 0, ph->batch, &m, &err) != CB_OK) die("read", &err);
        w->msgs += (int64_t)m.count;
        cb_messages_free(&m);
      } else {
        for (int i = 0; i < ph->batch; i++) ids[i] = next_id + i;
        next_id += ph->batch;
        int64_t *got;
        size_t n;
        if (cb_queue_delete(ph->rt, ph->queue, ids, (size_t)ph->batch, &got, &n, &err) != CB_OK) die("delete", &err);
        w->msgs += (int64_t)n;
        free(got);
      }
      w->txns++;
      continue;
    }
    /* Pipelined: d units (d transactions) in one exec_many. */
    int idx[MAX_DEPTH];
    for (int k = 0; k < d; k++) {
      cb_unit_reset(units[k]);
      if (ph->op == OP_SEND && ph->batch == 1) idx[k] = cb_queue_add_send(units[k], ph->queue, json, 0);
      else if (ph->op == OP_SEND) idx[k] = cb_queue_add_send_batch(units[k], ph->queue, json, 0);
      else if (ph->op == OP_READ) idx[k] = cb_queue_add_read(units[k], ph->queue, 0, ph->batch);
      else {
        for (int i = 0; i < ph->batch; i++) ids[i] = next_id + i;
        next_id += ph->batch;
        idx[k] = cb_queue_add_delete(units[k], ph->queue, ids, (size_t)ph->batch);
      }
      if (idx[k] < 0) die("building a unit", NULL);
    }
    if (cb_runtime_exec_many(ph->rt, units, (size_t)d, &err) != CB_OK) die("exec_many", &err);
    for (int k = 0; k < d; k++) {
      check_unit(units[k]);
      w->msgs += cb_result_rows(cb_unit_result(units[k], idx[k]));
    }
    w->txns += d;
  }
  for (int i = 0; i < ph->depth; i++) cb_unit_free(units[i]);
  return NULL;
}

typedef struct outcome {
  double per_s; /* messages/s */
  double tps;   /* transactions/s */
  int64_t msgs;
  long txns;
  double elapsed;
  double cpu; /* client CPU seconds (all our threads, or pgbench) */
  double csw; /* client context switches */
} outcome;

static outcome run_ours(phase *ph) {
  worker ws[MAX_CLIENTS];
  atomic_store(&ph->stop, 0);
  atomic_store(&ph->ready, 0);
  atomic_store(&ph->go, 0);
  for (int i = 0; i < clients; i++) {
    ws[i] = (worker){.ph = ph, .id = i};
    pthread_create(&ws[i].thread, NULL, work, &ws[i]);
  }
  while (atomic_load(&ph->ready) < clients) sched_yield();
  double c0 = cpu_s(RUSAGE_SELF), s0 = csw_count(RUSAGE_SELF);
  double t0 = now_s();
  atomic_store(&ph->go, 1);
  if (ph->per_client <= 0) {
    struct timespec ts = {.tv_sec = seconds, .tv_nsec = 0};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
    atomic_store(&ph->stop, 1);
  }
  outcome o = {0};
  for (int i = 0; i < clients; i++) {
    pthread_join(ws[i].thread, NULL);
    o.msgs += ws[i].msgs;
    o.txns += ws[i].txns;
  }
  o.elapsed = now_s() - t0;
  o.cpu = cpu_s(RUSAGE_SELF) - c0;
  o.csw = csw_count(RUSAGE_SELF) - s0;
  o.per_s = (double)o.msgs / o.elapsed;
  o.tps = (double)o.txns / o.elapsed;
  return o;
}

/* ---- pgbench ------------------------------------------------------------------------ */

static void find_pgbench(void) {
  const char *env = getenv("PGBENCH");
  if (env && *env) snprintf(pgbench_path, sizeof pgbench_path, "%s", env);
  else if (access("/usr/lib/postgresql/15/bin/pgbench", X_OK) == 0)
    snprintf(pgbench_path, sizeof pgbench_path, "/usr/lib/postgresql/15/bin/pgbench");
  else snprintf(pgbench_path, sizeof pgbench_path, "pgbench");
}

static void find_scripts(void) {
  const char *env = getenv("BENCH_QUEUE_SCRIPTS");
  if (env && *env) {
    snprintf(script_dir, sizeof script_dir, "%s", env);
    return;
  }
  /* CMake compiles with the absolute source path. */
  snprintf(script_dir, sizeof script_dir, "%s", __FILE__);
  char *slash = strrchr(script_dir, '/');
  if (slash) strcpy(slash, "/queue");
  else snprintf(script_dir, sizeof script_dir, "bench/queue");
  char probe[1100];
  snprintf(probe, sizeof probe, "%s/read.sql", script_dir);
  if (access(probe, R_OK) != 0) snprintf(script_dir, sizeof script_dir, "bench/queue");
}

/* Runs pgbench with argv (after the program name); returns its output. */
static char *run_cmd(char *const argv[]) {
  int fds[2];
  if (pipe(fds) != 0) die("pipe", NULL);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    close(fds[0]);
    close(fds[1]);
    execvp(argv[0], argv);
    fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  close(fds[1]);
  size_t cap = 8192, len = 0;
  char *out = malloc(cap);
  ssize_t r;
  while ((r = read(fds[0], out + len, cap - len - 1)) > 0) {
    len += (size_t)r;
    if (cap - len < 1024) out = realloc(out, cap *= 2);
  }
  out[len] = '\0';
  close(fds[0]);
  int status;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "bench_queue: pgbench failed:\n%s\n", out);
    exit(1);
  }
  return out;
}

static outcome run_pgbench(const char *script, long per_client, char **defines) {
  char file[1200], cl[16], dur[32];
  snprintf(file, sizeof file, "%s/%s", script_dir, script);
  snprintf(cl, sizeof cl, "%d", clients);
  char *argv[40];
  int a = 0;
  argv[a++] = pgbench_path;
  argv[a++] = "-n";
  argv[a++] = "-M";
  argv[a++] = "prepared";
  argv[a++] = "-c";
  argv[a++] = cl;
  argv[a++] = "-j";
  argv[a++] = cl;
  if (per_client > 0) {
    snprintf(dur, sizeof dur, "%ld", per_client);
    argv[a++] = "-t";
  } else {
    snprintf(dur, sizeof dur, "%d", seconds);
    argv[a++] = "-T";
  }
  argv[a++] = dur;
  argv[a++] = "-f";
  argv[a++] = file;
  for (int i = 0; defines[i]; i++) {
    argv[a++] = "-D";
    argv[a++] = defines[i];
  }
  argv[a++] = (char *)url;
  argv[a] = NULL;
  double c0 = cpu_s(RUSAGE_CHILDREN), s0 = csw_count(RUSAGE_CHILDREN);
  char *out = run_cmd(argv);
  outcome o = {0};
  o.cpu = cpu_s(RUSAGE_CHILDREN) - c0;
  o.csw = csw_count(RUSAGE_CHILDREN) - s0;
  const char *p = strstr(out, "number of transactions actually processed: ");
  const char *t = strstr(out, "tps = ");
  const char *f = strstr(out, "number of failed transactions: ");
  if (!p || !t || (f && strtol(f + strlen("number of failed transactions: "), NULL, 10) != 0)) {
    fprintf(stderr, "bench_queue: unexpected pgbench output:\n%s\n", out);
    exit(1);
  }
  o.txns = strtol(p + strlen("number of transactions actually processed: "), NULL, 10);
  o.tps = strtod(t + strlen("tps = "), NULL);
  o.elapsed = o.tps > 0 ? (double)o.txns / o.tps : 0;
  free(out);
  return o;
}

/* ---- one figure --------------------------------------------------------------------- */

typedef struct figure {
  char name[32];
  outcome ours, piped, pgb;
} figure;

/* Counts the rows the phase did, from the database: sends = rows in the
 * queue, reads = sum(read_ct), deletes = prefill - rows left. */
static int64_t db_count(cb_runtime *rt, const char *q, int op, int64_t prefilled) {
  char sql[160];
  int64_t v;
  if (op == OP_READ) snprintf(sql, sizeof sql, "SELECT sum(read_ct) FROM pgmq.q_%s", q);
  else snprintf(sql, sizeof sql, "SELECT count(*) FROM pgmq.q_%s", q);
  query_ints(rt, sql, &v, 1);
  return op == OP_DELETE ? prefilled - v : v;
}

static void settle(cb_runtime *rt) { exec_sql(rt, "CHECKPOINT", 1, 1); /* may need privileges; then skipped */ }

/* Prepares a fresh queue for the side; returns the first prefilled id. */
static int64_t setup(cb_runtime *rt, const char *q, int op, int64_t prefill_n) {
  fresh_queue(rt, q);
  int64_t base = 0;
  if (op != OP_SEND) base = prefill(rt, q, prefill_n);
  settle(rt);
  return base;
}

static void check_rows(const char *who, const char *name, int64_t expected, int64_t db) {
  if (expected != db) {
    fprintf(stderr, "bench_queue: %s %s: counted %" PRId64 " messages but the database shows %" PRId64 "\n", who, name,
            expected, db);
    exit(1);
  }
}

static outcome side_ours(cb_runtime *rt, const char *name, int op, int batch, int d, long per_client) {
  int64_t prefill_n = op == OP_READ ? read_prefill() : op == OP_DELETE ? (int64_t)clients * per_client * batch : 0;
  phase ph = {.rt = rt,
              .queue = Q_OURS,
              .op = op,
              .batch = batch,
              .depth = d,
              .per_client = op == OP_DELETE ? per_client : 0,
              .span = per_client * batch};
  ph.id_base = setup(rt, Q_OURS, op, prefill_n);
  outcome o = run_ours(&ph);
  check_rows(d == 1 ? "ours" : "ours pipelined", name, o.msgs, db_count(rt, Q_OURS, op, prefill_n));
  return o;
}

static outcome side_pgbench(cb_runtime *rt, const char *name, int op, int batch, long per_client) {
  int64_t prefill_n = op == OP_READ ? read_prefill() : op == OP_DELETE ? (int64_t)clients * per_client * batch : 0;
  int64_t base = setup(rt, Q_PGB, op, prefill_n);
  char d1[64], d2[64], d3[64];
  char *defs[8] = {0};
  const char *script;
  if (op == OP_SEND) {
    static char msg_def[4096], *batch_def;
    snprintf(msg_def, sizeof msg_def, "msg=%s", MSG);
    if (batch_def == NULL) {
      batch_def = malloc(strlen(batch_json) + 8);
      sprintf(batch_def, "batch=%s", batch_json);
    }
    snprintf(d1, sizeof d1, "delay=%s", DELAY);
    snprintf(d2, sizeof d2, "chan=pgmq_notify_%s", Q_PGB);
    defs[0] = d1;
    defs[1] = d2;
    defs[2] = batch == 1 ? msg_def : batch_def;
    script = batch == 1 ? "send_1.sql" : "send_100.sql";
  } else if (op == OP_READ) {
    snprintf(d1, sizeof d1, "qty=%d", batch);
    snprintf(d2, sizeof d2, "vt=%s", DELAY);
    defs[0] = d1;
    defs[1] = d2;
    script = "read.sql";
  } else {
    snprintf(d1, sizeof d1, "base=%" PRId64, base);
    snprintf(d2, sizeof d2, "span=%" PRId64, per_client * batch);
    snprintf(d3, sizeof d3, "k=0");
    defs[0] = d1;
    defs[1] = d2;
    defs[2] = d3;
    script = batch == 1 ? "delete_1.sql" : "delete_100.sql";
  }
  outcome o = run_pgbench(script, op == OP_DELETE ? per_client : 0, defs);
  /* Messages as the database counts them; per second at pgbench's own tps
   * (which leaves out its connection time). */
  o.msgs = db_count(rt, Q_PGB, op, prefill_n);
  if (op != OP_READ) check_rows("pgbench", name, (int64_t)o.txns * batch, o.msgs);
  o.per_s = o.txns ? o.tps * (double)o.msgs / (double)o.txns : 0;
  return o;
}

static void keep_best(outcome *best, outcome o) {
  if (o.per_s > best->per_s) *best = o;
}

/* Runs the matched pair `reps` times in the order ours, pgbench, pgbench,
 * ours, ... (so that a drift of the machine favours neither), keeping the
 * best of each side; then ours pipelined once. */
static void run_figure(cb_runtime *rt, figure *fg, int op, int batch, long per_client) {
  snprintf(fg->name, sizeof fg->name, "%s_%d", op_names[op], batch);
  memset(&fg->ours, 0, sizeof fg->ours);
  memset(&fg->pgb, 0, sizeof fg->pgb);
  for (int r = 0; r < reps; r++) {
    if (r % 2 == 0) {
      keep_best(&fg->ours, side_ours(rt, fg->name, op, batch, 1, per_client));
      keep_best(&fg->pgb, side_pgbench(rt, fg->name, op, batch, per_client));
    } else {
      keep_best(&fg->pgb, side_pgbench(rt, fg->name, op, batch, per_client));
      keep_best(&fg->ours, side_ours(rt, fg->name, op, batch, 1, per_client));
    }
  }
  fg->piped = side_ours(rt, fg->name, op, batch, depth, per_client);

#define PER_TX(o, v) ((o).txns ? (v) / (double)(o).txns : 0)
  printf(
      "%-10s ours %7.0f msg/s (%5.0f tx/s)  pgbench %7.0f msg/s (%5.0f tx/s)  ratio %.2f"
      "  | pipelined x%d %7.0f msg/s  ratio %.2f\n",
      fg->name, fg->ours.per_s, fg->ours.tps, fg->pgb.per_s, fg->pgb.tps,
      fg->pgb.per_s > 0 ? fg->ours.per_s / fg->pgb.per_s : 0, depth, fg->piped.per_s,
      fg->pgb.per_s > 0 ? fg->piped.per_s / fg->pgb.per_s : 0);
  printf("%-10s   client cpu us/tx, ctx switches/tx: ours %.0f, %.1f  pgbench %.0f, %.1f  pipelined %.0f, %.1f\n", "",
         PER_TX(fg->ours, 1e6 * fg->ours.cpu), PER_TX(fg->ours, fg->ours.csw), PER_TX(fg->pgb, 1e6 * fg->pgb.cpu),
         PER_TX(fg->pgb, fg->pgb.csw), PER_TX(fg->piped, 1e6 * fg->piped.cpu), PER_TX(fg->piped, fg->piped.csw));
  fflush(stdout);
}

static int env_int(const char *name, int def, int lo, int hi) {
  const char *s = getenv(name);
  if (s == NULL || *s == '\0') return def;
  int v = atoi(s);
  return v < lo ? lo : v > hi ? hi : v;
}

/* Whether name is one of the comma-separated items of list. */
static int in_list(const char *list, const char *name) {
  size_t n = strlen(name);
  for (const char *p = list; *p;) {
    const char *e = strchr(p, ',');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    if (len == n && strncmp(p, name, n) == 0) return 1;
    if (!e) break;
    p = e + 1;
  }
  return 0;
}

/* ---- q:send_batch from Lua, under LuaJIT and Lua 5.4 ------------------------------ */

/* Messages/s of bench/queue/send_batch.lua under one interpreter (best of
 * its runs), or -1 when it cannot run. The interpreters see the build tree
 * through scripts/env. */
static double lua_send_batch(const char *flavor, int n) {
  char cmd[3000];
  snprintf(cmd, sizeof cmd, "cd %s/../.. && eval \"$(scripts/env %s)\" && %s bench/queue/send_batch.lua %d 3",
           script_dir, flavor, flavor, n);
  FILE *p = popen(cmd, "r");
  if (p == NULL) return -1;
  double per_s = -1, took;
  if (fscanf(p, "%lf %lf", &per_s, &took) != 2) per_s = -1;
  pclose(p);
  return per_s;
}

int main(void) {
  url = getenv("DATABASE_URL");
  if (url == NULL || *url == '\0') {
    fprintf(stderr, "bench_queue: DATABASE_URL is not set (run it as `make bench-queue`)\n");
    return 2;
  }
  seconds = env_int("BENCH_QUEUE_SECONDS", 3, 1, 600);
  clients = env_int("BENCH_QUEUE_CLIENTS", 2, 1, MAX_CLIENTS);
  depth = env_int("BENCH_QUEUE_DEPTH", 8, 2, MAX_DEPTH);
  reps = env_int("BENCH_QUEUE_REPS", 2, 1, 100);
  find_pgbench();
  find_scripts();
  batch_json = json_array(100);
  /* Delete runs a fixed count of transactions per client (the ids must exist). */
  long del1 = env_int("BENCH_QUEUE_DELETE_1_TXNS", 3000, 1, 10000000);
  long del100 = env_int("BENCH_QUEUE_DELETE_100_TXNS", 300, 1, 1000000);

  cb_runtime_options opt = {.conninfo = url, .pool_size = clients, .application_name = "bench_queue"};
  cb_runtime *rt;
  cb_err err;
  if (cb_runtime_new(&opt, &rt, &err) != CB_OK) die("runtime", &err);

  printf("bench queue: nproc %ld, PostgreSQL on the same machine\n", sysconf(_SC_NPROCESSORS_ONLN));
  printf("  pgbench: %s -n -M prepared -c %d -j %d, -T %d (send, read) or -t N (delete), scripts %s\n", pgbench_path,
         clients, clients, seconds, script_dir);
  printf(
      "  ours: one runtime, pool_size %d, %d caller threads; matched = blocking cb_queue_* (1 tx in flight\n"
      "        per thread, like pgbench); pipelined = %d units per cb_runtime_exec_many (1 tx per unit)\n",
      clients, clients, depth);
  printf("  read: vt 0 over %" PRId64 " prefilled messages; delete: %ld x 1 and %ld x 100 ids per client\n",
         read_prefill(), del1, del100);
  printf(
      "  message: %zu bytes of JSON; every run gets a fresh queue, then CHECKPOINT; best of %d runs per side,\n"
      "  alternating which goes first (pipelined: 1 run)\n",
      strlen(MSG), reps);
  fflush(stdout);

  double t0 = now_s();
  figure figs[6];
  int n = 0;
  static const struct {
    int op, batch;
  } plan[] = {{OP_SEND, 1}, {OP_SEND, 100}, {OP_READ, 1}, {OP_READ, 100}, {OP_DELETE, 1}, {OP_DELETE, 100}};
  const char *only = getenv("BENCH_QUEUE_ONLY"); /* e.g. "read_1,send_100" (for profiling) */
  for (size_t i = 0; i < sizeof plan / sizeof plan[0]; i++) {
    char name[32];
    snprintf(name, sizeof name, "%s_%d", op_names[plan[i].op], plan[i].batch);
    if (only && *only && !in_list(only, name)) continue;
    run_figure(rt, &figs[n++], plan[i].op, plan[i].batch,
               plan[i].op == OP_DELETE ? (plan[i].batch == 1 ? del1 : del100) : 0);
  }
  drop_queue(rt, Q_OURS);
  drop_queue(rt, Q_PGB);
  cb_runtime_free(rt);

  /* LuaJIT once took a minute for 20,000 messages here (a string grown by
   * concatenation, quadratic there): its rate beside Lua 5.4's. */
  int lua_n = env_int("BENCH_QUEUE_LUA_MESSAGES", 30000, 1, 1000000);
  double jit = -1, lua54 = -1;
  if (!only || !*only || in_list(only, "lua_send_batch")) {
    jit = lua_send_batch("luajit", lua_n);
    lua54 = lua_send_batch("lua5.4", lua_n);
    printf("q:send_batch of %d messages from Lua: LuaJIT %.0f msgs/s, Lua 5.4 %.0f msgs/s (reference), ratio %.2f\n",
           lua_n, jit, lua54, lua54 > 0 ? jit / lua54 : 0);
  }

  int ok = 1;
  for (int i = 0; i < n; i++)
    if (strstr(figs[i].name, "_100") && figs[i].ours.per_s < 0.8 * figs[i].pgb.per_s) ok = 0;
  printf("target (batch 100: ours >= 0.8x pgbench): %s; took %.0f s\n", ok ? "met" : "NOT met", now_s() - t0);

  printf("{\"bench\":\"queue\",\"nproc\":%ld,\"clients\":%d,\"pipeline_depth\":%d,\"seconds\":%d",
         sysconf(_SC_NPROCESSORS_ONLN), clients, depth, seconds);
  for (int i = 0; i < n; i++) {
    figure *f = &figs[i];
    double pg = f->pgb.per_s;
    printf(
        ",\"%s_per_s\":%.0f,\"%s_pgbench_per_s\":%.0f,\"%s_ratio\":%.2f,\"%s_pipelined_per_s\":%.0f,"
        "\"%s_pipelined_ratio\":%.2f",
        f->name, f->ours.per_s, f->name, pg, f->name, pg > 0 ? f->ours.per_s / pg : 0, f->name, f->piped.per_s, f->name,
        pg > 0 ? f->piped.per_s / pg : 0);
  }
  if (jit > 0 && lua54 > 0)
    printf(
        ",\"lua_send_batch_messages\":%d,\"luajit_send_batch_per_s\":%.0f,\"lua54_send_batch_per_s\":%.0f,"
        "\"luajit_vs_lua54_ratio\":%.2f",
        lua_n, jit, lua54, jit / lua54);
  printf(",\"target_met\":%s}\n", ok ? "true" : "false");
  return 0;
}
