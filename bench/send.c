/*
 * Benchmark of single sends (make bench-send): commands/s when each send is
 * one command, from one caller and from eight at once, against the raw-SQL
 * floor measured in the same run.
 *
 *   floor      pgbench -M prepared running bench/send/floor_send_1.sql: the
 *              rows one send writes (command, queue message, SENT audit row)
 *              and the queue's notify, one command per transaction, one
 *              Sync (one round trip, one commit), with 1 client and with 8.
 *   lua, 1     bus:send from one Lua caller in a loop (bench/send/caller.lua
 *              under COMMANDBUS_LUA): the figure a Lua user sees. Its ratio
 *              is to the 1-client floor.
 *   core, 1/8  cb_bus_send (what bus:send calls) from 1 and from 8 threads
 *              of one process over one runtime with the default pool of 2
 *              connections: the concurrent callers of an nginx worker or of
 *              a worker's handler lanes. Eight callers share transactions
 *              (bus.c); the ratio is to the 8-client floor, whose clients
 *              each commit alone on 8 connections.
 *   lua, 8x1   eight Lua processes, one caller and one bus each, at once
 *              (informative: nothing is shared but the server).
 *
 * Each figure runs BENCH_SEND_SECONDS (5) after a warm-up, BENCH_SEND_ROUNDS
 * (2) times, alternating with its floor, and the best round is kept (other
 * work on a shared machine only ever slows a run down). Beside each figure:
 * WAL bytes and commits per command, from pg_stat_wal and pg_stat_database
 * (xact_commit) around the run, read once the measured connections have
 * closed (a backend reports its counters when it exits), and CPU per
 * command in microseconds: the server's (this database's backends) and the
 * client's (this process, or the Lua processes and pgbench). On a shared
 * server the WAL bytes count everyone's; the CPU counts only this
 * database's. Ends with one JSON line. Environment: DATABASE_URL (required),
 * BENCH_SEND_SECONDS, BENCH_SEND_ROUNDS, COMMANDBUS_LUA (lua5.4), PGBENCH,
 * BENCH_SEND_ONLY (e.g. "floor_8,core_8": only those figures; of floor_1,
 * lua_1, core_1, floor_8, core_8, lua_8proc), BENCH_SEND_THREADS (8: the
 * callers of core_8, 1 to 8), BENCH_SEND_NOTIFY_AFTER (1: the runtimes
 * measured, C and Lua, with notify_after_commit).
 */
#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "commandbus/bus.h"
#include "commandbus/queue.h"
#include "commandbus/runtime.h"
#include "commandbus/schema.h"

#define DOMAIN "bench_send"
#define FLOOR_DOMAIN "bench_send_floor" /* hard-coded in bench/send/floor_send_1.sql */
#define APP "bench_send_driver"         /* this process's own connection */
#define THREADS_MAX 8

static const char *url;
static int seconds = 5;
static int rounds = 2;
static const char *lua = "lua5.4";
static char pgbench_path[1024];
static int threads8 = THREADS_MAX; /* BENCH_SEND_THREADS: the "8 threads" figure's callers */
static cb_runtime *own;            /* the counters, the tables: idle while work is measured */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *why) {
  fprintf(stderr, "bench_send: %s: %s\n", what, why ? why : "");
  exit(1);
}

static void exec_sql(const char *sql, int nparams, const char *const *params) {
  cb_unit *u = cb_unit_new();
  cb_err err;
  cb_unit_add_flags(u, sql, nparams, params, CB_STMT_ONESHOT);
  if (cb_runtime_exec(own, u, &err) != CB_OK) die(sql, err.message);
  cb_unit_free(u);
}

static void fresh_domain(const char *domain) {
  const char *params[] = {domain};
  exec_sql("DELETE FROM commandbus.command WHERE domain = $1", 1, params);
  exec_sql("DELETE FROM commandbus.audit WHERE domain = $1", 1, params);
  char queue[80];
  snprintf(queue, sizeof queue, "%s__commands", domain);
  cb_err err;
  int existed;
  if (cb_queue_drop(own, queue, &existed, &err) != CB_OK) die("drop queue", err.message);
  /* Made as a send makes it (with the priority index), for both sides. */
  if (cb_bus_ensure_command_queue(own, domain, 1, &err) != CB_OK) die("create queue", err.message);
  exec_sql("VACUUM ANALYZE commandbus.command", 0, NULL);
  exec_sql("VACUUM ANALYZE commandbus.audit", 0, NULL);
  exec_sql("CHECKPOINT", 0, NULL);
}

/* ---- the database's counters ----------------------------------------------------- */

typedef struct counters {
  double wal_bytes, commits;
} counters;

/* Once no other client is connected (the measured ones have closed and so
 * reported their counters). */
static counters settled(void) {
  double until = now_s() + 10;
  counters c = {0, 0};
  for (;;) {
    cb_unit *u = cb_unit_new();
    cb_err err;
    cb_unit_add_flags(u,
                      "SELECT (SELECT wal_bytes FROM pg_stat_wal)::float8, xact_commit::float8,"
                      " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                      " AND backend_type = 'client backend' AND application_name <> '" APP
                      "')"
                      " FROM pg_stat_database WHERE datname = current_database()",
                      0, NULL, CB_STMT_ONESHOT);
    if (cb_runtime_exec(own, u, &err) != CB_OK) die("counters", err.message);
    const cb_result *r = cb_unit_result(u, 0);
    c.wal_bytes = atof(cb_result_value(r, 0, 0));
    c.commits = atof(cb_result_value(r, 0, 1));
    long others = atol(cb_result_value(r, 0, 2));
    cb_unit_free(u);
    if (others == 0 || now_s() > until) break;
    usleep(50 * 1000);
  }
  usleep(200 * 1000);
  return c;
}

/* ---- CPU per command --------------------------------------------------------------
 *
 * The server's side: the backends of this database other than the driver's
 * own connection, found by their process titles ("postgres: <user> <db>
 * ..."), sampled every 20 ms while a figure runs (a backend's counters go
 * with it when it exits, so the last samples' maxima are kept). The
 * client's side: this process's CPU (threads) or its children's (the Lua
 * processes, pgbench) around the run. On a shared server only this
 * database's backends count; the WAL writer's and other shared work is left
 * out. */

#define PIDS_MAX 64
static char db_title[256]; /* "postgres: <user> <db> " */
static long own_backend;

typedef struct sampler {
  pthread_t tid;
  volatile int stop;
  long pid[PIDS_MAX];
  double ticks[PIDS_MAX];
  int n;
} sampler;

static void sample_once(sampler *s) {
  DIR *d = opendir("/proc");
  if (d == NULL) return;
  struct dirent *e;
  while ((e = readdir(d))) {
    long pid = atol(e->d_name);
    if (pid <= 0 || pid == own_backend) continue;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/cmdline", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL) continue;
    size_t got = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[got] = '\0';
    if (strncmp(buf, db_title, strlen(db_title)) != 0) continue;
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    f = fopen(path, "r");
    if (f == NULL) continue;
    got = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[got] = '\0';
    char *p = strrchr(buf, ')');
    unsigned long ut = 0, st = 0;
    if (p == NULL || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2) continue;
    int i = 0;
    while (i < s->n && s->pid[i] != pid) i++;
    if (i == s->n) {
      if (s->n == PIDS_MAX) continue;
      s->n++;
      s->pid[i] = pid;
      s->ticks[i] = 0;
    }
    if ((double)(ut + st) > s->ticks[i]) s->ticks[i] = (double)(ut + st);
  }
  closedir(d);
}

static void *sampler_main(void *arg) {
  sampler *s = arg;
  while (!s->stop) {
    sample_once(s);
    usleep(20 * 1000);
  }
  sample_once(s);
  return NULL;
}

typedef struct cpu_mark {
  sampler *s;
  double self, children;
} cpu_mark;

static double rusage_s(int who) {
  struct rusage r;
  getrusage(who, &r);
  return (double)r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + (double)r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static cpu_mark cpu_start(void) {
  cpu_mark m = {calloc(1, sizeof(sampler)), rusage_s(RUSAGE_SELF), rusage_s(RUSAGE_CHILDREN)};
  sample_once(m.s); /* backends already there (none, usually) count from here */
  for (int i = 0; i < m.s->n; i++) m.s->ticks[i] = -m.s->ticks[i];
  pthread_create(&m.s->tid, NULL, sampler_main, m.s);
  return m;
}

/* Microseconds of CPU per command: the server's (*server) and the client's. */
static void cpu_end(cpu_mark m, double commands, double *server, double *client) {
  double self = rusage_s(RUSAGE_SELF) - m.self, children = rusage_s(RUSAGE_CHILDREN) - m.children;
  m.s->stop = 1;
  pthread_join(m.s->tid, NULL);
  double ticks = 0;
  for (int i = 0; i < m.s->n; i++) ticks += m.s->ticks[i];
  free(m.s);
  *server = ticks / (double)sysconf(_SC_CLK_TCK) / commands * 1e6;
  *client = (self + children) / commands * 1e6;
}

typedef struct figure {
  double rate;                 /* commands/s, best round */
  double wal, commits;         /* per command, in the best round */
  double server_us, client_us; /* CPU per command, in the best round */
  double rates[16];            /* each round */
} figure;

static void keep(figure *f, int round, double rate, counters before, counters after, double commands, cpu_mark m) {
  double server, client;
  cpu_end(m, commands, &server, &client);
  f->rates[round] = rate;
  if (rate > f->rate) {
    f->server_us = server;
    f->client_us = client;
    f->rate = rate;
    f->wal = (after.wal_bytes - before.wal_bytes) / commands;
    f->commits = (after.commits - before.commits) / commands;
  }
}

/* ---- the floor ---------------------------------------------------------------------- */

static void floor_run(figure *f, int round, int clients) {
  fresh_domain(FLOOR_DOMAIN);
  counters before = settled();
  cpu_mark m = cpu_start();
  char cmd[2048];
  snprintf(cmd, sizeof cmd, "%s -n -M prepared -c %d -j %d -T %d -f bench/send/floor_send_1.sql '%s' 2>&1",
           pgbench_path, clients, clients < 2 ? clients : 2, seconds, url);
  FILE *p = popen(cmd, "r");
  if (p == NULL) die("pgbench", "cannot start");
  char line[512];
  double tps = 0, done = 0;
  while (fgets(line, sizeof line, p)) {
    if (sscanf(line, "tps = %lf", &tps) == 1) continue;
    sscanf(line, "number of transactions actually processed: %lf", &done);
  }
  pclose(p);
  if (tps <= 0 || done <= 0) die("pgbench", "no tps in its output");
  counters after = settled();
  keep(f, round, tps, before, after, done, m);
}

/* ---- ours, in threads of this process ------------------------------------------------ */

typedef struct caller {
  cb_runtime *rt;
  double start_at, stop_at;
  long sent;
} caller;

static void send_one(cb_runtime *rt, long i) {
  char data[64];
  snprintf(data, sizeof data, "{\"n\": %ld}", i);
  cb_command_spec spec = {0};
  spec.command_type = "Noop";
  spec.data_json = data;
  cb_send_result res;
  cb_err err;
  if (cb_bus_send(rt, DOMAIN, &spec, 1, 0, &res, &err) != CB_OK) die("send", err.message);
}

static void *caller_main(void *arg) {
  caller *c = arg;
  for (long i = 0; i < 50; i++) send_one(c->rt, i); /* warm: statements prepared */
  double wait = c->start_at - now_s();
  if (wait > 0) usleep((useconds_t)(wait * 1e6));
  long n = 0;
  while (now_s() < c->stop_at) send_one(c->rt, n++);
  c->sent = n;
  return NULL;
}

static void core_run(figure *f, int round, int threads) {
  fresh_domain(DOMAIN);
  counters before = settled();
  cpu_mark m = cpu_start();
  cb_runtime_options o = {0};
  o.conninfo = url;
  o.application_name = "bench_send_core";
  o.notify_after_commit = getenv("BENCH_SEND_NOTIFY_AFTER") && strcmp(getenv("BENCH_SEND_NOTIFY_AFTER"), "1") == 0;
  cb_runtime *rt;
  cb_err err;
  if (cb_runtime_new(&o, &rt, &err) != CB_OK) die("connect", err.message);
  caller callers[THREADS_MAX];
  pthread_t tids[THREADS_MAX];
  double start_at = now_s() + 1;
  for (int i = 0; i < threads; i++) {
    callers[i] = (caller){rt, start_at, start_at + seconds, 0};
    pthread_create(&tids[i], NULL, caller_main, &callers[i]);
  }
  long sent = 0;
  for (int i = 0; i < threads; i++) {
    pthread_join(tids[i], NULL);
    sent += callers[i].sent;
  }
  cb_runtime_free(rt);
  counters after = settled(); /* the warm-up's 50 per thread are counted too: a little, alike for all */
  keep(f, round, sent / (double)seconds, before, after, (double)sent + 50.0 * threads, m);
}

/* ---- ours, from Lua processes ---------------------------------------------------------- */

static void lua_run(figure *f, int round, int processes) {
  fresh_domain(DOMAIN);
  counters before = settled();
  cpu_mark m = cpu_start();
  char cmd[4096];
  double start_at = now_s() + 2; /* time to start Lua and connect */
  int n = snprintf(cmd, sizeof cmd, "(");
  for (int i = 0; i < processes; i++)
    n += snprintf(cmd + n, sizeof cmd - (size_t)n, "%s bench/send/caller.lua %s %.6f %d & ", lua, DOMAIN, start_at,
                  seconds);
  snprintf(cmd + n, sizeof cmd - (size_t)n, "wait) 2>&1");
  FILE *p = popen(cmd, "r");
  if (p == NULL) die("lua", "cannot start");
  char line[512];
  double sent = 0, warm = 0, first = 1e300, last = 0;
  int finished = 0;
  while (fgets(line, sizeof line, p)) {
    double s, w, t0, t1;
    if (sscanf(line, "sent %lf warm %lf %lf %lf", &s, &w, &t0, &t1) == 4) {
      sent += s;
      warm += w;
      if (t0 < first) first = t0;
      if (t1 > last) last = t1;
      if (t0 > start_at + 0.05) fprintf(stderr, "bench_send: a Lua caller started %.3f s late\n", t0 - start_at);
      finished++;
    } else {
      fputs(line, stderr);
    }
  }
  pclose(p);
  if (finished != processes) die("lua", "a caller process failed");
  counters after = settled();
  keep(f, round, sent / (last - first), before, after, sent + warm, m);
}

/* ---- report -------------------------------------------------------------------------- */

static void rounds_text(const figure *f, char *out, size_t len) {
  size_t n = 0;
  out[0] = '\0';
  for (int r = 0; r < rounds && n < len; r++)
    n += (size_t)snprintf(out + n, len - n, "%s%.0f", r ? " " : "", f->rates[r]);
}

static void print_figure(const char *name, const figure *f, const figure *floor) {
  if (f->rate == 0) return; /* not run */
  char rs[256];
  rounds_text(f, rs, sizeof rs);
  printf("%-46s %7.0f commands/s", name, f->rate);
  if (floor && floor->rate > 0) printf(" (%.2fx the floor)", f->rate / floor->rate);
  printf("; per command %.0f WAL bytes, %.3f commits, CPU us server %.0f client %.0f; rounds %s\n", f->wal, f->commits,
         f->server_us, f->client_us, rs);
}

int main(void) {
  url = getenv("DATABASE_URL");
  if (url == NULL || *url == '\0') die("DATABASE_URL", "is not set");
  if (getenv("BENCH_SEND_SECONDS")) seconds = atoi(getenv("BENCH_SEND_SECONDS"));
  if (getenv("BENCH_SEND_ROUNDS")) rounds = atoi(getenv("BENCH_SEND_ROUNDS"));
  if (rounds < 1) rounds = 1;
  if (rounds > 16) rounds = 16;
  if (getenv("COMMANDBUS_LUA")) lua = getenv("COMMANDBUS_LUA");
  const char *env = getenv("PGBENCH");
  if (env && *env) snprintf(pgbench_path, sizeof pgbench_path, "%s", env);
  else if (access("/usr/lib/postgresql/15/bin/pgbench", X_OK) == 0)
    snprintf(pgbench_path, sizeof pgbench_path, "/usr/lib/postgresql/15/bin/pgbench");
  else snprintf(pgbench_path, sizeof pgbench_path, "pgbench");

  cb_runtime_options o = {0};
  o.conninfo = url;
  o.pool_size = 1;
  o.application_name = APP;
  cb_err err;
  if (cb_runtime_new(&o, &own, &err) != CB_OK) die("connect", err.message);
  if (cb_schema_setup(own, NULL, &err) != CB_OK) die("setup", err.message);
  {
    cb_unit *u = cb_unit_new();
    cb_unit_add_flags(u, "SELECT pg_backend_pid(), current_user, current_database()", 0, NULL, CB_STMT_ONESHOT);
    if (cb_runtime_exec(own, u, &err) != CB_OK) die("backend", err.message);
    const cb_result *r = cb_unit_result(u, 0);
    own_backend = atol(cb_result_value(r, 0, 0));
    snprintf(db_title, sizeof db_title, "postgres: %s %s ", cb_result_value(r, 0, 1), cb_result_value(r, 0, 2));
    cb_unit_free(u);
  }
  if (getenv("BENCH_SEND_THREADS")) threads8 = atoi(getenv("BENCH_SEND_THREADS"));
  if (threads8 < 1 || threads8 > THREADS_MAX) threads8 = THREADS_MAX;
  fprintf(stderr, "bench_send: %d s a figure, best of %d rounds, %ld cores, PostgreSQL on the same machine\n", seconds,
          rounds, sysconf(_SC_NPROCESSORS_ONLN));

  figure floor1 = {0}, lua1 = {0}, core1 = {0}, floor8 = {0}, core8 = {0}, lua8 = {0};
  const char *only = getenv("BENCH_SEND_ONLY");
#define WANT(name) (only == NULL || strstr(only, name) != NULL)
  for (int r = 0; r < rounds; r++) {
    if (WANT("floor_1")) floor_run(&floor1, r, 1);
    if (WANT("lua_1")) lua_run(&lua1, r, 1);
    if (WANT("core_1")) core_run(&core1, r, 1);
    if (WANT("floor_8")) floor_run(&floor8, r, 8);
    if (WANT("core_8")) core_run(&core8, r, threads8);
    if (WANT("lua_8proc")) lua_run(&lua8, r, 8);
  }
  fresh_domain(DOMAIN);
  fresh_domain(FLOOR_DOMAIN);
  char queue[80];
  int existed;
  snprintf(queue, sizeof queue, "%s__commands", DOMAIN);
  cb_queue_drop(own, queue, &existed, &err);
  snprintf(queue, sizeof queue, "%s__commands", FLOOR_DOMAIN);
  cb_queue_drop(own, queue, &existed, &err);
  cb_runtime_free(own);

  print_figure("floor, 1 client (pgbench)", &floor1, NULL);
  print_figure("bus:send, 1 Lua caller", &lua1, &floor1);
  print_figure("cb_bus_send, 1 thread", &core1, &floor1);
  print_figure("floor, 8 clients (pgbench)", &floor8, NULL);
  char name8[64];
  snprintf(name8, sizeof name8, "cb_bus_send, %d threads on one runtime (pool 2)", threads8);
  print_figure(name8, &core8, &floor8);
  print_figure("bus:send, 8 Lua processes of 1 caller", &lua8, &floor8);
  printf(
      "{\"bench\":\"send\",\"seconds\":%d,\"rounds\":%d,"
      "\"floor_1_per_s\":%.0f,\"lua_1_per_s\":%.0f,\"lua_1_ratio\":%.2f,\"core_1_per_s\":%.0f,\"core_1_ratio\":%.2f,"
      "\"floor_8_per_s\":%.0f,\"core_8_per_s\":%.0f,\"core_8_ratio\":%.2f,\"lua_8proc_per_s\":%.0f,\"lua_8proc_ratio\":%.2f,"
      "\"lua_1_wal_bytes_per_cmd\":%.0f,\"lua_1_commits_per_cmd\":%.3f,\"core_8_wal_bytes_per_cmd\":%.0f,"
      "\"core_8_commits_per_cmd\":%.3f,\"floor_1_wal_bytes_per_cmd\":%.0f,\"floor_8_commits_per_cmd\":%.3f}\n",
      seconds, rounds, floor1.rate, lua1.rate, lua1.rate / floor1.rate, core1.rate, core1.rate / floor1.rate,
      floor8.rate, core8.rate, core8.rate / floor8.rate, lua8.rate, lua8.rate / floor8.rate, lua1.wal, lua1.commits,
      core8.wal, core8.commits, floor1.wal, floor8.commits);
  return 0;
}
