/*
 * send_batch of many fresh commands by COPY against the statement it used
 * before (make bench-send_batch): N (BENCH_COMMANDS, 50,000) fresh commands
 * of one domain, delay 0, in one call, each shape on a fresh domain,
 * alternating, BENCH_SEND_BATCH_ROUNDS (3) pairs:
 *
 *   statement  cb_bus_add_send run as a unit: chunks of 1,000 commands as
 *              JSON arrays, pipelined, one INSERT ... SELECT statement per
 *              chunk writing the command rows, the queue messages and the
 *              SENT audit rows (what send_batch did for every size, and
 *              still does below bus.c's COPY_MIN and for sends composed
 *              into other units).
 *   copy       cb_bus_send, i.e. bus:send_batch: the message and audit ids
 *              drawn first, then one transaction of three COPY ... FROM
 *              STDIN and the queue's notify.
 *
 * For each: commands/s, the CPU its backends used per command (utime +
 * stime of /proc/<pid>/stat, the draw included) and WAL bytes per command
 * (the cluster's: other sessions' WAL is counted too on a shared server).
 * After each run the rows are checked against what the send statement
 * writes (the message and the SENT details rebuilt from the command row
 * with jsonb_build_object). Environment: DATABASE_URL (required; a
 * database of its own, made fresh by the caller), BENCH_COMMANDS,
 * BENCH_SEND_BATCH_ROUNDS. Ends with one JSON line.
 */
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "commandbus/bus.h"
#include "commandbus/runtime.h"
#include "commandbus/schema.h"

#define APP "bench_send_batch" /* the runtime's connections, whose CPU is counted */

static const char *url;
static int n_commands = 50000;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *why) {
  fprintf(stderr, "bench/send_batch: %s: %s\n", what, why);
  exit(1);
}

static PGconn *connect_as(const char *application_name) {
  const char *keys[] = {"dbname", "application_name", NULL};
  const char *values[] = {url, application_name, NULL};
  PGconn *pg = PQconnectdbParams(keys, values, 1);
  if (PQstatus(pg) != CONNECTION_OK) die("connect", PQerrorMessage(pg));
  return pg;
}

/* Runs sql (no parameters) and returns the first value of its first row as a
 * number, 0 when there is none. */
static double query_number(PGconn *pg, const char *sql) {
  PGresult *r = PQexec(pg, sql);
  if (PQresultStatus(r) != PGRES_TUPLES_OK && PQresultStatus(r) != PGRES_COMMAND_OK) die(sql, PQresultErrorMessage(r));
  double v = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0 ? atof(PQgetvalue(r, 0, 0)) : 0;
  PQclear(r);
  return v;
}

static void exec_ok(PGconn *pg, const char *sql) { query_number(pg, sql); }

/* CPU ticks (utime + stime) a backend has used so far. */
static long backend_ticks(int pid) {
  char path[64], text[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE *f = fopen(path, "r");
  if (f == NULL) return 0;
  size_t len = fread(text, 1, sizeof text - 1, f);
  fclose(f);
  text[len] = '\0';
  const char *p = strrchr(text, ')');
  long utime = 0, stime = 0;
  /* after ") ": state, ppid, pgrp, session, tty, tpgid, flags, minflt,
   * cminflt, majflt, cmajflt, utime, stime */
  if (p) sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %ld %ld", &utime, &stime);
  return utime + stime;
}

/* The pids of the backends with this application_name. */
static int backends(PGconn *own, const char *application_name, int *pids, int max) {
  char sql[256];
  snprintf(sql, sizeof sql, "SELECT pid FROM pg_stat_activity WHERE application_name = '%s'", application_name);
  PGresult *r = PQexec(own, sql);
  int n = 0;
  for (int i = 0; i < PQntuples(r) && n < max; i++) pids[n++] = atoi(PQgetvalue(r, i, 0));
  PQclear(r);
  return n;
}

static long ticks_of(const int *pids, int n) {
  long sum = 0;
  for (int i = 0; i < n; i++) sum += backend_ticks(pids[i]);
  return sum;
}

static double wal_bytes(PGconn *own) {
  return query_number(own, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')");
}

/* A domain with its queue made (by one command sent through the bus,
 * removed again), so that both shapes write into the same kind of queue. */
static void fresh_domain(cb_runtime *rt, PGconn *own, const char *domain) {
  cb_command_spec spec = {.command_type = "Warm"};
  cb_send_result res;
  cb_err err;
  if (cb_bus_send(rt, domain, &spec, 1, 0, &res, &err) != CB_OK) die("send", err.message);
  char sql[512];
  snprintf(sql, sizeof sql,
           "DELETE FROM commandbus.audit WHERE domain = '%s'; DELETE FROM commandbus.command WHERE domain = '%s';"
           " DELETE FROM pgmq.q_%s__commands",
           domain, domain, domain);
  exec_ok(own, sql);
  snprintf(sql, sizeof sql, "VACUUM ANALYZE commandbus.command, commandbus.audit, pgmq.q_%s__commands", domain);
  exec_ok(own, sql);
}

/* Whether the domain holds n commands whose message and SENT audit row are
 * exactly what the send statement builds from the command's columns. */
static void check_rows(PGconn *own, const char *domain, const char *shape) {
  char sql[1536];
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM commandbus.command c JOIN pgmq.q_%s__commands m ON m.msg_id = c.msg_id"
           " JOIN commandbus.audit a ON a.domain = c.domain AND a.command_id = c.command_id AND a.event_type = 'SENT'"
           " WHERE c.domain = '%s' AND c.status = 'PENDING' AND c.attempts = 0 AND c.max_attempts = 3"
           " AND c.queue_name = '%s__commands' AND c.reply_queue = '' AND c.batch_id IS NULL"
           " AND m.read_ct = 0 AND m.vt <= now()"
           " AND m.message = jsonb_build_object('domain', c.domain, 'command_type', c.command_type,"
           " 'command_id', c.command_id, 'correlation_id', c.correlation_id, 'data', m.message->'data')"
           " AND jsonb_typeof(m.message->'data'->'n') = 'number'"
           " AND a.details_json = jsonb_build_object('command_type', c.command_type, 'correlation_id',"
           " c.correlation_id, 'reply_to', NULL, 'msg_id', c.msg_id, 'batch_id', NULL)",
           domain, domain, domain);
  double good = query_number(own, sql);
  if ((int)good != n_commands) {
    char why[128];
    snprintf(why, sizeof why, "%.0f of %d commands have the rows a send writes", good, n_commands);
    die(shape, why);
  }
}

typedef struct figure {
  double rate, cpu_us, wal;
} figure;

/* One send of n_commands by one shape: by_copy through cb_bus_send, else
 * cb_bus_add_send's statements run as a unit. */
static figure send_run(cb_runtime *rt, PGconn *own, const char *domain, int by_copy) {
  cb_command_spec *specs = calloc((size_t)n_commands, sizeof *specs);
  cb_send_result *results = calloc((size_t)n_commands, sizeof *results);
  char(*data)[32] = calloc((size_t)n_commands, sizeof *data);
  const char *shape = by_copy ? "copy" : "statement";
  if (!specs || !results || !data) die(shape, "out of memory");
  for (int i = 0; i < n_commands; i++) {
    snprintf(data[i], sizeof data[i], "{\"n\":%d}", i + 1);
    specs[i] = (cb_command_spec){.command_type = "Noop", .data_json = data[i]};
  }
  int pids[8];
  int np = backends(own, APP, pids, 8);
  long t0 = ticks_of(pids, np);
  double w0 = wal_bytes(own), s0 = now_s();
  cb_err err;
  int rc;
  if (by_copy) {
    rc = cb_bus_send(rt, domain, specs, (size_t)n_commands, 0, results, &err);
  } else {
    cb_unit *u = cb_unit_new();
    rc = cb_bus_add_send(rt, u, domain, specs, (size_t)n_commands, 0, results, NULL, &err);
    if (rc == CB_OK) rc = cb_runtime_exec(rt, u, &err);
    cb_unit_free(u);
  }
  if (rc != CB_OK) die(shape, err.message);
  double s1 = now_s();
  figure f = {n_commands / (s1 - s0), (double)(ticks_of(pids, np) - t0) / sysconf(_SC_CLK_TCK) * 1e6 / n_commands,
              (wal_bytes(own) - w0) / n_commands};
  free(specs);
  free(results);
  free(data);
  check_rows(own, domain, shape);
  return f;
}

static void drop_domain(PGconn *own, const char *domain) {
  char sql[768];
  snprintf(sql, sizeof sql,
           "DELETE FROM commandbus.audit WHERE domain = '%s'; DELETE FROM commandbus.command WHERE domain = '%s';"
           " DROP TABLE IF EXISTS pgmq.q_%s__commands, pgmq.a_%s__commands;"
           " DELETE FROM pgmq.meta WHERE queue_name = '%s__commands'",
           domain, domain, domain, domain, domain);
  exec_ok(own, sql);
}

static void print_figure(const char *shape, int round, figure f) {
  printf("round %d %-9s %7.0f commands/s  backend CPU %5.1f us/command  WAL %5.0f B/command\n", round, shape, f.rate,
         f.cpu_us, f.wal);
  fflush(stdout);
}

int main(void) {
  url = getenv("DATABASE_URL");
  if (url == NULL || url[0] == '\0') die("DATABASE_URL", "not set");
  if (getenv("BENCH_COMMANDS")) n_commands = atoi(getenv("BENCH_COMMANDS"));
  int rounds = getenv("BENCH_SEND_BATCH_ROUNDS") ? atoi(getenv("BENCH_SEND_BATCH_ROUNDS")) : 3;
  if (n_commands < 1 || rounds < 1) die("BENCH_COMMANDS, BENCH_SEND_BATCH_ROUNDS", "must be positive");

  cb_runtime_options o = {.conninfo = url, .pool_size = 1, .application_name = APP};
  cb_runtime *rt;
  cb_err err;
  if (cb_runtime_new(&o, &rt, &err) != CB_OK) die("connect", err.message);
  if (cb_schema_setup(rt, NULL, &err) != CB_OK) die("setup", err.message);
  PGconn *own = connect_as("bench_send_batch_driver");

  figure best_statement = {0}, best_copy = {0};
  for (int round = 1; round <= rounds; round++) {
    char domain[64];
    snprintf(domain, sizeof domain, "bench_send_batch_s%d", round);
    fresh_domain(rt, own, domain);
    figure s = send_run(rt, own, domain, 0);
    print_figure("statement", round, s);
    drop_domain(own, domain);
    snprintf(domain, sizeof domain, "bench_send_batch_c%d", round);
    fresh_domain(rt, own, domain);
    figure c = send_run(rt, own, domain, 1);
    print_figure("copy", round, c);
    drop_domain(own, domain);
    if (s.rate > best_statement.rate) best_statement = s;
    if (c.rate > best_copy.rate) best_copy = c;
  }
  printf(
      "{\"bench\":\"send_batch\",\"commands\":%d,\"statement_per_s\":%.0f,\"copy_per_s\":%.0f,\"ratio\":%.2f,"
      "\"statement_cpu_us\":%.1f,\"copy_cpu_us\":%.1f,\"statement_wal_b\":%.0f,\"copy_wal_b\":%.0f}\n",
      n_commands, best_statement.rate, best_copy.rate, best_copy.rate / best_statement.rate, best_statement.cpu_us,
      best_copy.cpu_us, best_statement.wal, best_copy.wal);
  PQfinish(own);
  cb_runtime_free(rt);
  return 0;
}
