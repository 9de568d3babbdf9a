/*
 * The floor of one request in flight: the rows and commits of a commandbus
 * request, written by two processes over plain libpq and nothing else (no
 * runtime, no loop thread, no pool, no handler, no Lua), so that a figure
 * of ours can be read beside what this cluster and machine allow at all.
 *
 *   caller (this process, one connection, LISTEN commandbus_await)
 *     send: the command, its queue message, its SENT audit row and the
 *     waiter's registration (commandbus.awaiter), and the queue's NOTIFY,
 *     one statement, one commit (flushed);
 *   worker (a forked process, one connection, LISTEN pgmq_notify_<queue>)
 *     wakes on the notification; receive: the message's visibility timeout
 *     and read count, the command's IN_PROGRESS, attempts and lease, the
 *     RECEIVED audit row, one statement, one commit (flushed: the receive
 *     is durable before a handler would start); then the completion: the
 *     command COMPLETED, the COMPLETED audit row, the message deleted, one
 *     statement, one commit (flushed), whose NOTIFY to the caller comes from
 *     the command table's trigger (core/sql/009), as ours does;
 *   caller wakes on that notification and reads the command row, removing
 *     the waiter's registration in the same transaction (not flushed: the
 *     awaiter table is unlogged, core/sql/002).
 *
 * Three flushed commits and four wake-ups of a process a request. Prints
 * send -> received (the worker's receive committed: where a handler would
 * start) and send -> answer (the caller holds the completed row), p50 and
 * p99 in ms, the CPU a request of the two processes and of their backends,
 * and one JSON line. BENCH_REQUESTS requests (default 1000) after
 * BENCH_WARMUP (default 20) to warm up; the schema is set up and a queue of
 * its own made and dropped. BENCH_FLOOR_RAW=1 prints each request's two
 * times too ("raw <received s> <answer s>"), for a caller that runs the
 * floor in turns with its own requests and pools them, as bench/peers'
 * latency part does (make bench-peers). Alone: make bench-request_floor.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <libpq-fe.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "commandbus/queue.h"
#include "commandbus/runtime.h"
#include "commandbus/schema.h"
#include "commandbus/uuid.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts); /* system-wide: comparable across processes */
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *why) {
  fprintf(stderr, "bench/request_floor: %s: %s\n", what, why);
  exit(1);
}

/* Each statement is planned once (as ours are: see worker_fetch.c), not
 * again at every execution. */
static PGconn *connect_pq(const char *url) {
  PGconn *c = PQconnectdb(url);
  if (PQstatus(c) != CONNECTION_OK) die("connect", PQerrorMessage(c));
  PGresult *r = PQexec(c, "SET plan_cache_mode = force_generic_plan");
  if (PQresultStatus(r) != PGRES_COMMAND_OK) die("plan_cache_mode", PQerrorMessage(c));
  PQclear(r);
  return c;
}

static void run(PGconn *c, const char *sql) {
  PGresult *r = PQexec(c, sql);
  if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) die(sql, PQerrorMessage(c));
  PQclear(r);
}

static void prepare(PGconn *c, const char *name, const char *sql) {
  PGresult *r = PQprepare(c, name, sql, 0, NULL);
  if (PQresultStatus(r) != PGRES_COMMAND_OK) die(name, PQerrorMessage(c));
  PQclear(r);
}

static PGresult *exec_prepared(PGconn *c, const char *name, int n, const char *const *params) {
  PGresult *r = PQexecPrepared(c, name, n, params, NULL, NULL, 0);
  if (PQresultStatus(r) != PGRES_TUPLES_OK) die(name, PQerrorMessage(c));
  return r;
}

/* Blocks until a notification arrives on c; returns it (PQfreemem it). */
static PGnotify *next_notify(PGconn *c) {
  for (;;) {
    if (!PQconsumeInput(c)) die("wait for a notification", PQerrorMessage(c));
    PGnotify *n = PQnotifies(c);
    if (n) return n;
    struct pollfd p = {PQsocket(c), POLLIN, 0};
    if (poll(&p, 1, 10000) == 0) die("wait for a notification", "none came within 10 s");
  }
}

static double backend_cpu_s(PGconn *c) {
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", PQbackendPID(c));
  FILE *f = fopen(path, "r");
  if (!f) return 0; /* another user's backend: not counted */
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  char *p = strrchr(buf, ')');
  unsigned long long ut = 0, st = 0;
  if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2) return 0;
  return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static double own_cpu_s(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
         ru.ru_stime.tv_usec / 1e6;
}

/* ---- the worker (a forked process) ------------------------------------------------- */

/* For each notification: receive what is there, one message at a time, and
 * complete it; tells the caller (pipe `out`) when each receive committed
 * ("%.9f\n"). Writes its CPU and its backend's ("cpu %f %f\n") and ends at
 * "stop" on `in`. */
static void worker_main(const char *url, const char *domain, const char *queue, int in, int out) {
  PGconn *c = connect_pq(url);
  char sql[4096];
  snprintf(sql, sizeof sql, "LISTEN pgmq_notify_%s", queue);
  run(c, sql);
  snprintf(sql, sizeof sql,
           "WITH m AS (UPDATE pgmq.q_%s q SET vt = clock_timestamp() + make_interval(secs => 30),"
           " read_ct = q.read_ct + 1 WHERE q.msg_id = (SELECT msg_id FROM pgmq.q_%s WHERE msg_id >= $2::bigint"
           " AND vt <= clock_timestamp() ORDER BY msg_id LIMIT 1 FOR UPDATE SKIP LOCKED)"
           " RETURNING q.msg_id, q.message),"
           " c AS (UPDATE commandbus.command k SET attempts = k.attempts + 1, status = 'IN_PROGRESS',"
           " updated_at = now(), lease_expires_at = clock_timestamp() + make_interval(secs => 30) FROM m"
           " WHERE k.domain = $1 AND k.command_id = (SELECT (message->>'command_id')::uuid FROM m)"
           " AND k.msg_id = m.msg_id AND k.status IN ('PENDING', 'IN_PROGRESS')"
           " RETURNING k.command_id, k.attempts, k.max_attempts, m.msg_id),"
           " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
           " SELECT $1, command_id, 'RECEIVED', jsonb_build_object('msg_id', msg_id, 'attempt', attempts,"
           " 'max_attempts', max_attempts) FROM c)"
           " SELECT command_id::text, msg_id, attempts FROM c",
           queue, queue);
  prepare(c, "receive", sql);
  snprintf(sql, sizeof sql,
           "WITH c AS (UPDATE commandbus.command k SET status = 'COMPLETED', updated_at = now(),"
           " lease_expires_at = NULL WHERE k.domain = $1 AND k.command_id = $2::uuid AND k.attempts = $3::int"
           " AND k.status = 'IN_PROGRESS' RETURNING k.command_id, k.reply_queue),"
           " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
           " SELECT $1, command_id, 'COMPLETED', jsonb_build_object('msg_id', $4::bigint,"
           " 'reply_to', nullif(reply_queue, ''), 'has_result', false) FROM c),"
           " d AS (DELETE FROM pgmq.q_%s q WHERE q.msg_id = $4::bigint AND EXISTS (SELECT FROM c))"
           " SELECT count(*) FROM c",
           queue);
  prepare(c, "complete", sql);
  if (write(out, "ready\n", 6) != 6) exit(1);
  double cpu0 = own_cpu_s(), bcpu0 = backend_cpu_s(c);
  int measuring = 0;
  long long last_msg = 0;
  for (;;) {
    /* The caller's word (start measuring, stop) or a notification. */
    struct pollfd p[2] = {{in, POLLIN, 0}, {PQsocket(c), POLLIN, 0}};
    if (!PQconsumeInput(c)) die("worker", PQerrorMessage(c));
    PGnotify *n = PQnotifies(c);
    if (n == NULL) {
      if (poll(p, 2, -1) < 0) die("worker", "poll");
      if (p[0].revents) {
        char word[16] = "";
        ssize_t got = read(in, word, sizeof word - 1);
        if (got <= 0 || strncmp(word, "stop", 4) == 0) break;
        if (strncmp(word, "measure", 7) == 0) {
          measuring = 1;
          cpu0 = own_cpu_s();
          bcpu0 = backend_cpu_s(c);
        }
      }
      continue;
    }
    PQfreemem(n);
    while ((n = PQnotifies(c)) != NULL) PQfreemem(n);
    for (;;) {
      /* From the last message received on, as our worker reads (its
       * scan_from): the index entries of every message completed before
       * lie below it. */
      char from[24];
      snprintf(from, sizeof from, "%lld", last_msg);
      const char *rp[] = {domain, from};
      PGresult *r = exec_prepared(c, "receive", 2, rp);
      if (PQntuples(r) == 0) {
        PQclear(r);
        break;
      }
      char line[64];
      int len = snprintf(line, sizeof line, "%.9f\n", now_s());
      if (write(out, line, (size_t)len) != len) exit(1);
      const char *cp[] = {domain, PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 2), PQgetvalue(r, 0, 1)};
      last_msg = atoll(PQgetvalue(r, 0, 1));
      PGresult *d = exec_prepared(c, "complete", 4, cp);
      PQclear(d);
      PQclear(r);
    }
  }
  char line[96];
  int len = snprintf(line, sizeof line, "cpu %.6f %.6f\n", measuring ? own_cpu_s() - cpu0 : 0,
                     measuring ? backend_cpu_s(c) - bcpu0 : 0);
  if (write(out, line, (size_t)len) != len) exit(1);
  PQfinish(c);
  exit(0);
}

/* ---- the caller ---------------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double pct(double *v, int n, double p) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  int i = (int)(p / 100.0 * n + 0.999999) - 1; /* nearest rank, as bench/support/common.lua */
  return v[i < 0 ? 0 : i];
}

static int read_line(FILE *f, char *buf, int n) { return fgets(buf, n, f) != NULL; }

static void setup(const char *url, const char *domain, const char *queue, int drop) {
  cb_runtime_options o = {0};
  o.conninfo = url;
  o.pool_size = 1;
  o.application_name = "commandbus-bench-request-floor";
  cb_runtime *rt;
  cb_err err;
  if (cb_runtime_new(&o, &rt, &err) != CB_OK) die("connect", err.message);
  int applied, existed;
  if (!drop && cb_schema_setup(rt, &applied, &err) != CB_OK) die("setup", err.message);
  cb_queue_drop(rt, queue, &existed, &err);
  if (!drop && cb_queue_create(rt, queue, &err) != CB_OK) die("create the queue", err.message);
  cb_runtime_free(rt);
  (void)domain;
}

int main(void) {
  const char *url = getenv("DATABASE_URL");
  if (url == NULL) die("DATABASE_URL", "not set");
  int requests = getenv("BENCH_REQUESTS") ? atoi(getenv("BENCH_REQUESTS")) : 1000;
  if (requests < 1) die("BENCH_REQUESTS", "must be at least 1");
  int warmup = getenv("BENCH_WARMUP") ? atoi(getenv("BENCH_WARMUP")) : 20;
  if (warmup < 0) die("BENCH_WARMUP", "must not be negative");
  int raw = getenv("BENCH_FLOOR_RAW") && strcmp(getenv("BENCH_FLOOR_RAW"), "1") == 0;
  char domain[64], queue[96];
  snprintf(domain, sizeof domain, "bench_floor_%d", (int)getpid());
  snprintf(queue, sizeof queue, "%s__commands", domain);
  /* The runtime's threads are joined before the fork. */
  setup(url, domain, queue, 0);

  int to_worker[2], from_worker[2];
  if (pipe(to_worker) != 0 || pipe(from_worker) != 0) die("pipe", "failed");
  pid_t pid = fork();
  if (pid < 0) die("fork", "failed");
  if (pid == 0) {
    close(to_worker[1]);
    close(from_worker[0]);
    worker_main(url, domain, queue, to_worker[0], from_worker[1]);
  }
  close(to_worker[0]);
  close(from_worker[1]);
  FILE *from = fdopen(from_worker[0], "r");
  char line[128];
  if (!read_line(from, line, sizeof line) || strcmp(line, "ready\n") != 0) die("worker", "did not start");

  PGconn *c = connect_pq(url);
  run(c, "LISTEN commandbus_await");
  char sql[4096];
  snprintf(sql, sizeof sql,
           "WITH ids AS (SELECT $2::uuid AS id, nextval('pgmq.q_%s_msg_id_seq') AS msg),"
           " c AS (INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id, command_type, status,"
           " attempts, max_attempts, reply_queue, correlation_id) SELECT $1, '%s', msg, id, 'Signal', 'PENDING', 0,"
           " 3, '', id FROM ids),"
           " m AS (INSERT INTO pgmq.q_%s (msg_id, vt, message) OVERRIDING SYSTEM VALUE SELECT msg,"
           " clock_timestamp(), jsonb_build_object('domain', $1::text, 'command_type', 'Signal', 'command_id', id,"
           " 'correlation_id', id, 'data', $4::jsonb) FROM ids),"
           " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json) SELECT $1, id, 'SENT',"
           " jsonb_build_object('command_type', 'Signal', 'correlation_id', id, 'reply_to', NULL, 'msg_id', msg,"
           " 'batch_id', NULL) FROM ids),"
           " w AS (INSERT INTO commandbus.awaiter (domain, id, waiter, expires_at)"
           " SELECT $1, id, $3::uuid, now() + interval '10 minutes' FROM ids)"
           " SELECT pg_notify('pgmq_notify_%s', '')",
           queue, queue, queue, queue);
  prepare(c, "send", sql);
  prepare(c, "read",
          "WITH d AS (DELETE FROM commandbus.awaiter a WHERE a.domain = $1 AND a.id = $2::uuid"
          " AND a.waiter = $3::uuid)"
          " SELECT domain, command_id::text, command_type, status, attempts, max_attempts, msg_id, queue_name,"
          " nullif(reply_queue, ''), correlation_id::text, batch_id::text, last_error_type, last_error_code,"
          " last_error_msg, created_at::text, updated_at::text FROM commandbus.command"
          " WHERE domain = $1 AND command_id = $2::uuid");

  double *to_received = malloc(sizeof(double) * (size_t)requests);
  double *to_answer = malloc(sizeof(double) * (size_t)requests);
  if (!to_received || !to_answer) die("memory", "out of memory");
  double cpu0 = 0, bcpu0 = 0, wall0 = 0;
  for (int i = 0; i < warmup + requests; i++) {
    if (i == warmup) {
      if (write(to_worker[1], "measure", 7) != 7) die("worker", "gone");
      usleep(20000);
      cpu0 = own_cpu_s();
      bcpu0 = backend_cpu_s(c);
      wall0 = now_s();
    }
    char id[CB_UUID_LEN + 1], waiter[CB_UUID_LEN + 1], data[32];
    cb_uuid_v7(id);
    cb_uuid_v7(waiter);
    snprintf(data, sizeof data, "{\"i\": %d}", i);
    const char *sp[] = {domain, id, waiter, data};
    double t0 = now_s();
    PQclear(exec_prepared(c, "send", 4, sp));
    for (;;) { /* the completion of this command (nothing else is awaited) */
      PGnotify *n = next_notify(c);
      int ours = strstr(n->extra, id) != NULL;
      PQfreemem(n);
      if (ours) break;
    }
    PGresult *r = exec_prepared(c, "read", 3, sp);
    double t2 = now_s();
    if (PQntuples(r) != 1 || strcmp(PQgetvalue(r, 0, 3), "COMPLETED") != 0) die("read", "the command is not COMPLETED");
    PQclear(r);
    if (!read_line(from, line, sizeof line)) die("worker", "gone");
    double t1 = atof(line);
    if (i >= warmup) {
      to_received[i - warmup] = t1 - t0;
      to_answer[i - warmup] = t2 - t0;
    }
  }
  double wall = now_s() - wall0, cpu = own_cpu_s() - cpu0, bcpu = backend_cpu_s(c) - bcpu0;
  if (write(to_worker[1], "stop", 4) != 4) die("worker", "gone");
  double wcpu = 0, wbcpu = 0;
  if (!read_line(from, line, sizeof line) || sscanf(line, "cpu %lf %lf", &wcpu, &wbcpu) != 2) die("worker", "no cpu");
  waitpid(pid, NULL, 0);
  fclose(from);
  close(to_worker[1]);
  PQfinish(c);
  setup(url, domain, queue, 1);
  {
    /* The domain's rows go with its queue. */
    PGconn *d = connect_pq(url);
    const char *p[] = {domain};
    PQclear(PQexecParams(d, "DELETE FROM commandbus.audit WHERE domain = $1", 1, NULL, p, NULL, NULL, 0));
    PQclear(PQexecParams(d, "DELETE FROM commandbus.command WHERE domain = $1", 1, NULL, p, NULL, NULL, 0));
    PQfinish(d);
  }

  if (raw)
    for (int i = 0; i < requests; i++) printf("raw %.9f %.9f\n", to_received[i], to_answer[i]);
  double r50 = pct(to_received, requests, 50), r99 = pct(to_received, requests, 99);
  double a50 = pct(to_answer, requests, 50), a99 = pct(to_answer, requests, 99);
  double per = 1000.0 / requests;
  printf("request floor (raw libpq, %d requests one in flight, after %d to warm up):\n", requests, warmup);
  printf("  send to received (the receive committed): p50 %.2f ms, p99 %.2f ms\n", r50 * 1000, r99 * 1000);
  printf("  send to answer (the completed row read): p50 %.2f ms, p99 %.2f ms\n", a50 * 1000, a99 * 1000);
  printf(
      "  CPU a request: caller %.3f ms, its backend %.3f ms, worker %.3f ms, its backend %.3f ms;"
      " %.0f requests/s\n",
      cpu * per, bcpu * per, wcpu * per, wbcpu * per, requests / wall);
  printf(
      "{\"bench\":\"request_floor\",\"requests\":%d,\"floor_received_p50_ms\":%.2f,\"floor_received_p99_ms\":%.2f,"
      "\"floor_answer_p50_ms\":%.2f,\"floor_answer_p99_ms\":%.2f,\"floor_cpu_ms\":%.3f}\n",
      requests, r50 * 1000, r99 * 1000, a50 * 1000, a99 * 1000, (cpu + bcpu + wcpu + wbcpu) * per);
  free(to_received);
  free(to_answer);
  return 0;
}
