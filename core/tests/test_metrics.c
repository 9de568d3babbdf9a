/* Metrics, runners and signal watches from C: the exposition escapes label
 * values and leaves empty families out; a runner's heartbeats reach the
 * table and its live health reaches metrics; a runner whose heartbeats
 * stopped reads as lost; metrics count the threads awaiting a record; a
 * signal watch is called on the loop thread. Clean
 * under ASan, TSan and valgrind. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "commandbus/awaiter.h"
#include "commandbus/metrics.h"
#include "commandbus/runner.h"
#include "commandbus/schema.h"
#include "test_support.h"

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* ---- the exposition of a snapshot made by hand ------------------------------------- */

static void exposition_escapes_labels_and_leaves_empty_families_out(void **state) {
  (void)state;
  cb_queue_metrics queues[1];
  memset(queues, 0, sizeof queues);
  snprintf(queues[0].queue_name, sizeof queues[0].queue_name, "jobs");
  queues[0].queue_length = 4;
  queues[0].oldest_msg_age_sec = -1; /* empty reads 0 */
  queues[0].total_messages = 9;
  cb_status_count commands[] = {{"a\"b\\c\nd", "PENDING", 2}, {"a\"b\\c\nd", "FROM_A_PEER", 1}};
  cb_metrics m;
  memset(&m, 0, sizeof m);
  m.queues = queues;
  m.nqueues = 1;
  m.commands = commands;
  m.ncommands = 2;
  char *text = cb_metrics_text(&m);
  assert_non_null(text);
  assert_non_null(strstr(text, "# TYPE commandbus_queue_depth gauge\ncommandbus_queue_depth{queue=\"jobs\"} 4\n"));
  assert_non_null(strstr(text, "commandbus_queue_oldest_message_age_seconds{queue=\"jobs\"} 0\n"));
  assert_non_null(strstr(text, "# TYPE commandbus_queue_messages_total counter\n"));
  assert_non_null(strstr(text, "commandbus_commands{domain=\"a\\\"b\\\\c\\nd\",status=\"PENDING\"} 2\n"));
  assert_non_null(strstr(text, "commandbus_commands{domain=\"a\\\"b\\\\c\\nd\",status=\"CANCELED\"} 0\n"));
  assert_non_null(strstr(text, "commandbus_commands{domain=\"a\\\"b\\\\c\\nd\",status=\"FROM_A_PEER\"} 1\n"));
  assert_non_null(strstr(text, "commandbus_tsq_commands{domain=\"a\\\"b\\\\c\\nd\"} 0\n"));
  assert_null(strstr(text, "commandbus_processes")); /* no process: no family */
  assert_null(strstr(text, "commandbus_worker_"));   /* no worker either */
  assert_non_null(strstr(text, "commandbus_awaiter_waiters 0\n"));
  assert_int_equal(text[strlen(text) - 1], '\n');
  free(text);
}

/* ---- a runner of our own --------------------------------------------------------------- */

typedef struct fake {
  const char *state;
  uint64_t successes;
} fake;

static void fake_report(void *self, cb_runner_stat *s) {
  fake *f = self;
  snprintf(s->state, sizeof s->state, "%s", f->state);
  s->successes = f->successes;
}

static void fake_stop(void *self) { (void)self; }

/* The row of runner id in the table, waiting up to 2 s for it to say state. */
static int find_row(cb_runtime *rt, const char *domain, const char *id, const char *state, cb_runner_stat *out) {
  for (int i = 0; i < 200; i++) {
    cb_runner_stat *rows;
    size_t n;
    cb_err err;
    assert_int_equal(cb_runner_list(rt, domain, &rows, &n, &err), CB_OK);
    int found = 0;
    for (size_t k = 0; k < n && !found; k++)
      if (strcmp(rows[k].runner_id, id) == 0 && strcmp(rows[k].state, state) == 0) {
        *out = rows[k];
        found = 1;
      }
    free(rows);
    if (found) return 1;
    sleep_ms(10);
  }
  return 0;
}

static void count_visit(const cb_runner_stat *s, void *arg) {
  cb_runner_stat *seen = arg;
  if (strcmp(s->domain, seen->domain) == 0) *seen = *s;
}

static void runner_heartbeats_reach_the_table_and_metrics(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  const char *domain = test_name("runner");
  fake f = {"running", 7};
  /* Its lanes: four items waiting, spread by their keys. */
  cb_message_router_config cfg;
  cb_message_router_config_init(&cfg);
  cfg.lanes = 2;
  cb_message_router *lanes;
  assert_int_equal(cb_message_router_new(&lanes, &cfg), 0);
  static int items[4];
  const char *keys[] = {"a", "b", "c", "d"};
  uint32_t depth[2] = {0, 0};
  for (int i = 0; i < 4; i++) {
    assert_int_equal(cb_message_router_route(lanes, keys[i], 1, &items[i]), 0);
    depth[cb_message_router_lane_for(lanes, keys[i], 1)]++;
  }
  cb_message_router_stop(lanes); /* hands the ingress to the lanes, where the items wait */
  cb_runner r;
  memset(&r, 0, sizeof r);
  r.router = lanes;
  r.kind = "worker";
  r.domain = domain;
  r.lanes = 2;
  r.report = fake_report;
  r.stop = fake_stop;
  r.self = &f;
  assert_int_equal(cb_runner_start(rt, &r, &err), CB_OK);

  cb_runner_stat row;
  assert_true(find_row(rt, domain, r.id, "running", &row));
  assert_int_equal(row.successes, 7);
  assert_int_equal(row.pid, (int)getpid());
  assert_int_equal(row.lanes, 2);
  assert_int_equal(row.nlane_depths, 2);
  assert_int_equal(row.lane_depths[0], depth[0]);
  assert_int_equal(row.lane_depths[1], depth[1]);

  cb_runner_stat seen;
  memset(&seen, 0, sizeof seen);
  snprintf(seen.domain, sizeof seen.domain, "%s", domain);
  cb_runner_each(rt, count_visit, &seen);
  assert_string_equal(seen.runner_id, r.id);

  cb_metrics m;
  assert_int_equal(cb_metrics_collect(rt, 0, &m, &err), CB_OK);
  char *text = cb_metrics_text(&m);
  char line[256];
  snprintf(line, sizeof line, "commandbus_worker_successes_total{domain=\"%s\",runner=\"%s\"} 7\n", domain, r.id);
  assert_non_null(strstr(text, line));
  snprintf(line, sizeof line, "commandbus_worker_lane_depth{domain=\"%s\",runner=\"%s\",lane=\"1\"} %u\n", domain, r.id,
           depth[0]);
  assert_non_null(strstr(text, line));
  free(text);
  cb_metrics_free(&m);

  /* Stopped and removed: its last row says so, and metrics of every
   * process count it without reporting it as live. */
  f.state = "stopped";
  f.successes = 8;
  cb_runner_stopped(&r);
  cb_runner_remove(&r);
  assert_true(find_row(rt, domain, r.id, "stopped", &row));
  assert_int_equal(row.successes, 8);
  assert_int_equal(cb_metrics_collect(rt, CB_METRICS_ALL_PROCESSES, &m, &err), CB_OK);
  text = cb_metrics_text(&m);
  snprintf(line, sizeof line, "commandbus_runners{kind=\"worker\",domain=\"%s\",state=\"stopped\"} 1\n", domain);
  assert_non_null(strstr(text, line));
  snprintf(line, sizeof line, "runner=\"%s\"", r.id);
  assert_null(strstr(text, line));
  free(text);
  cb_metrics_free(&m);
  cb_runner_remove(&r); /* idempotent */

  const char *p[] = {domain};
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, "DELETE FROM commandbus.runner WHERE domain = $1", 1, p);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_unit_free(u);
  cb_runtime_free(rt);
  cb_message_router_free(lanes); /* the items are static */
}

static void a_runner_whose_heartbeats_stopped_is_lost(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  const char *domain = test_name("lost");
  char id[CB_UUID_LEN + 1];
  cb_uuid_v7(id);
  const char *p[] = {id, domain};
  cb_unit *u = cb_unit_new();
  cb_unit_add(u,
              "INSERT INTO commandbus.runner (runner_id, kind, domain, host, pid, state, lanes, started_at,"
              " heartbeat_at, heartbeat_interval) VALUES ($1::uuid, 'worker', $2, 'elsewhere', 1, 'running', 1,"
              " now() - interval '1 minute', now() - interval '16 seconds', 5)",
              2, p);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_unit_free(u);
  cb_runner_stat row;
  assert_true(find_row(rt, domain, id, "lost", &row));
  assert_string_equal(row.host, "elsewhere");
  u = cb_unit_new();
  cb_unit_add(u, "DELETE FROM commandbus.runner WHERE domain = $1", 1, p + 1);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_unit_free(u);
  cb_runtime_free(rt);
}

/* ---- awaiting threads ------------------------------------------------------------------ */

typedef struct await_arg {
  cb_runtime *rt;
  const char *domain;
  char id[CB_UUID_LEN + 1];
  int rc;
} await_arg;

static void *await_main(void *arg) {
  await_arg *a = arg;
  cb_unit *rows = NULL;
  cb_err err;
  a->rc = cb_await_command(a->rt, a->domain, a->id, 30, 0, &rows, &err);
  cb_unit_free(rows);
  return NULL;
}

static void metrics_count_the_threads_awaiting_a_record(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  await_arg a = {rt, test_name("awaited"), "", -1};
  cb_uuid_v7(a.id);
  const char *p[] = {a.domain, a.id};
  cb_unit *u = cb_unit_new();
  cb_unit_add(u,
              "INSERT INTO commandbus.command (domain, queue_name, command_id, command_type) VALUES ($1,"
              " $1 || '__commands', $2::uuid, 'Awaited')",
              2, p);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_unit_free(u);
  pthread_t t;
  assert_int_equal(pthread_create(&t, NULL, await_main, &a), 0);
  for (int i = 0; i < 500 && cb_hub_record_waiters(cb_runtime_hub(rt)) == 0; i++) sleep_ms(10);
  cb_metrics m;
  assert_int_equal(cb_metrics_collect(rt, 0, &m, &err), CB_OK);
  assert_int_equal(m.awaiting, 1);
  char *text = cb_metrics_text(&m);
  assert_non_null(strstr(text, "\ncommandbus_awaiter_waiters 1\n"));
  free(text);
  cb_metrics_free(&m);
  /* The command finishes: the waiter returns, and is no longer counted. */
  u = cb_unit_new();
  cb_unit_add(u, "UPDATE commandbus.command SET status = 'COMPLETED' WHERE domain = $1 AND command_id = $2::uuid", 2,
              p);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_unit_free(u);
  cb_hub_changed(cb_runtime_hub(rt), a.domain, a.id);
  pthread_join(t, NULL);
  assert_int_equal(a.rc, CB_OK);
  assert_int_equal(cb_hub_record_waiters(cb_runtime_hub(rt)), 0);
  u = cb_unit_new();
  cb_unit_add(u, "DELETE FROM commandbus.command WHERE domain = $1", 1, p);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_unit_free(u);
  cb_runtime_free(rt);
}

/* ---- signal watches ------------------------------------------------------------------ */

typedef struct caught {
  cb_runtime *rt;
  atomic_int signum;
  atomic_int on_loop;
} caught;

static void on_signal(int signum, void *arg) {
  caught *c = arg;
  atomic_store(&c->on_loop, cb_runtime_on_loop(c->rt));
  atomic_store(&c->signum, signum);
}

static void a_signal_watch_is_called_on_the_loop_thread(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(1);
  caught c = {rt, 0, 0};
  int id = cb_runtime_watch_signals(rt, on_signal, &c);
  assert_true(id > 0);
  sleep_ms(50); /* the loop thread starts handling the signals */
  kill(getpid(), SIGTERM);
  for (int i = 0; i < 200 && atomic_load(&c.signum) == 0; i++) sleep_ms(10);
  assert_int_equal(atomic_load(&c.signum), SIGTERM);
  assert_true(atomic_load(&c.on_loop));
  cb_runtime_unwatch_signals(rt, id);
  cb_runtime_unwatch_signals(rt, id); /* twice is fine */
  cb_runtime_close(rt);
  assert_int_equal(cb_runtime_watch_signals(rt, on_signal, &c), CB_ECLOSED);
  cb_runtime_free(rt);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(exposition_escapes_labels_and_leaves_empty_families_out),
      cmocka_unit_test(runner_heartbeats_reach_the_table_and_metrics),
      cmocka_unit_test(a_runner_whose_heartbeats_stopped_is_lost),
      cmocka_unit_test(metrics_count_the_threads_awaiting_a_record),
      cmocka_unit_test(a_signal_watch_is_called_on_the_loop_thread),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
