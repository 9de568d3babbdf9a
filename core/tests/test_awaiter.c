/* Awaiting commands and processes (the scenarios that matter): the poll
 * schedules, sixteen waiters released together by one completion (no lost
 * wake-up), a waiter that registers while a writer holds the command, a
 * polling waiter, historical events, unknown ids, purges that
 * wake nobody, and the event sink's bounded queue. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "commandbus/awaiter.h"
#include "commandbus/bus.h"
#include "commandbus/events.h"
#include "commandbus/process.h"
#include "commandbus/schema.h"
#include "commandbus/worker.h"
#include "test_support.h"

static void the_poll_schedule_is_25_ms_doubling_capped_at_1_s(void **state) {
  const int expected[] = {25, 50, 100, 200, 400, 800, 1000, 1000};
  for (int i = 0; i < 8; i++) assert_int_equal(cb_await_backoff_ms(i), expected[i]);
  assert_int_equal(cb_await_backoff_ms(100), 1000);
}

typedef struct waiter_arg {
  cb_runtime *rt;
  const char *domain;
  const char *id;
  int rc;
  char status[32];
  int statements; /* in the read that returned */
} waiter_arg;

static void *await_main(void *p) {
  waiter_arg *a = p;
  cb_unit *rows = NULL;
  cb_err err;
  a->rc = cb_await_command(a->rt, a->domain, a->id, 20, 0, &rows, &err);
  if (a->rc == CB_OK) {
    snprintf(a->status, sizeof a->status, "%s", cb_result_value(cb_unit_result(rows, cb_unit_count(rows) - 1), 0, 3));
    a->statements = cb_unit_count(rows);
  }
  cb_unit_free(rows);
  return NULL;
}

static void *lane_main(void *p) {
  cb_worker *w = p;
  cb_work *work;
  int n;
  while ((n = cb_worker_take(w, 0, &work, 1, 100)) >= 0) {
    if (n == 0) continue;
    usleep(300 * 1000); /* the waiters are all waiting by now */
    cb_work_succeed(work, "{\"done\": true}");
    cb_worker_done(w, work);
  }
  return NULL;
}

static void sixteen_waiters_are_released_together_by_one_completion(void **state) {
  cb_runtime *rt = test_runtime(4);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("await16"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result sent;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK);

  waiter_arg args[16];
  pthread_t threads[16];
  for (int i = 0; i < 16; i++) {
    args[i] = (waiter_arg){rt, domain, sent.command_id, -99, "", 0};
    pthread_create(&threads[i], NULL, await_main, &args[i]);
  }
  cb_worker_options o;
  cb_worker_options_init(&o);
  o.domain = domain;
  o.lanes = 1;
  o.poll_interval = 0.05;
  cb_worker *w;
  assert_int_equal(cb_worker_new(rt, &o, &w, &err), CB_OK);
  pthread_t lane;
  pthread_create(&lane, NULL, lane_main, w);
  assert_int_equal(cb_engine_start(cb_worker_engine(w), &err), CB_OK);
  for (int i = 0; i < 16; i++) {
    pthread_join(threads[i], NULL);
    assert_int_equal(args[i].rc, CB_OK);
    assert_string_equal(args[i].status, "COMPLETED");
  }
  cb_engine_stop(cb_worker_engine(w));
  cb_engine_wait(cb_worker_engine(w), -1);
  pthread_join(lane, NULL);
  cb_worker_free(w);
  char queue[80];
  snprintf(queue, sizeof queue, "%s__commands", domain);
  int existed;
  cb_queue_drop(rt, queue, &existed, &err);
  cb_runtime_free(rt);
}

static void the_safety_poll_doubles_from_25_ms_up_to_30_s(void **state) {
  (void)state;
  static const int expected[] = {25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000};
  for (int i = 0; i < 13; i++) assert_int_equal(cb_await_safety_backoff_ms(i), expected[i]);
  assert_int_equal(cb_await_safety_backoff_ms(1000), 30000);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Starts a one-step process in domain; its id goes to id (37 bytes). */
static void start_process(cb_runtime *rt, const char *domain, char *id) {
  char reply[80];
  snprintf(reply, sizeof reply, "%s__process_replies", domain);
  cb_process_start_spec spec = {domain, "Test", "{\"n\": 1}", "only", NULL};
  cb_command_spec cmd = {0};
  cmd.command_type = "Step";
  cmd.reply_to = reply;
  cb_send_result sent;
  cb_err err;
  assert_int_equal(cb_process_start(rt, &spec, &cmd, id, &sent, &err), CB_OK);
}

/* Changes a process as the core's writers do: the change, then (after the
 * commit) local awaiters woken and the sink fed from what was appended. */
static void change_process(cb_runtime *rt, const char *domain, const char *id, const char *status,
                           const char *state_json) {
  cb_unit *u = cb_unit_new();
  const char *params[] = {domain, id, status, state_json};
  cb_events_add_begin(u);
  cb_unit_add(u,
              "UPDATE commandbus.process SET status = $3, state = $4::jsonb, completed_at = now()"
              " WHERE domain = $1 AND process_id = $2::uuid",
              4, params);
  int read = cb_events_add_read(u);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_events_published(rt, u, read);
  cb_unit_free(u);
}

static void drop_domain_queues(cb_runtime *rt, const char *domain) {
  const char *suffixes[] = {"__commands", "__process_replies"};
  for (int i = 0; i < 2; i++) {
    char queue[80];
    snprintf(queue, sizeof queue, "%s%s", domain, suffixes[i]);
    int existed;
    cb_err err;
    cb_queue_drop(rt, queue, &existed, &err);
  }
}

typedef struct process_waiter {
  cb_runtime *rt;
  const char *domain, *id;
  pthread_barrier_t *go;
  int flags;
  int rc;
  double resolved_at;
  char status[32];
  char state[128];
} process_waiter;

static void *await_process_main(void *p) {
  process_waiter *a = p;
  if (a->go) pthread_barrier_wait(a->go);
  cb_unit *rows = NULL;
  cb_err err;
  a->rc = cb_await_process(a->rt, a->domain, a->id, 10, a->flags, &rows, &err);
  a->resolved_at = now_s();
  if (a->rc == CB_OK) {
    const cb_result *r = cb_unit_result(rows, cb_unit_count(rows) - 1);
    snprintf(a->status, sizeof a->status, "%s", cb_result_value(r, 0, 3));
    snprintf(a->state, sizeof a->state, "%s", cb_result_value(r, 0, 5));
  }
  cb_unit_free(rows);
  return NULL;
}

static void sixteen_process_waiters_racing_a_completion_resolve_alike(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(4);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], id[CB_UUID_LEN + 1];
  snprintf(domain, sizeof domain, "%s", test_name("pawait16"));
  start_process(rt, domain, id);
  pthread_barrier_t go;
  pthread_barrier_init(&go, NULL, 17);
  process_waiter args[16];
  pthread_t threads[16];
  for (int i = 0; i < 16; i++) {
    args[i] = (process_waiter){rt, domain, id, &go, 0, -99, 0, "", ""};
    pthread_create(&threads[i], NULL, await_process_main, &args[i]);
  }
  pthread_barrier_wait(&go); /* released together; the completion races their first reads */
  change_process(rt, domain, id, "COMPLETED", "{\"raced\": true}");
  double completed = now_s();
  for (int i = 0; i < 16; i++) {
    pthread_join(threads[i], NULL);
    assert_int_equal(args[i].rc, CB_OK);
    assert_string_equal(args[i].status, "COMPLETED");
    assert_string_equal(args[i].state, "{\"raced\": true}");
    assert_true(args[i].resolved_at - completed < 2.0);
  }
  pthread_barrier_destroy(&go);
  drop_domain_queues(rt, domain);
  cb_runtime_free(rt);
}

static void a_polling_waiter_resolves_by_backoff_without_notifications(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], id[CB_UUID_LEN + 1];
  snprintf(domain, sizeof domain, "%s", test_name("ppoll"));
  start_process(rt, domain, id);
  process_waiter a = {rt, domain, id, NULL, CB_AWAIT_NO_LISTEN, -99, 0, "", ""};
  pthread_t thread;
  double t0 = now_s();
  pthread_create(&thread, NULL, await_process_main, &a);
  usleep(300 * 1000);
  /* Behind the hub's back: a plain statement, no local wake-up, and the
   * waiter does not listen. */
  cb_unit *u = cb_unit_new();
  const char *params[] = {domain, id};
  cb_unit_add(u, "UPDATE commandbus.process SET status = 'FAILED' WHERE domain = $1 AND process_id = $2::uuid", 2,
              params);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_unit_free(u);
  pthread_join(thread, NULL);
  assert_int_equal(a.rc, CB_OK);
  assert_string_equal(a.status, "FAILED");
  /* Reads at 0, 25, 75, 175, 375 ms (then 775): resolved by the 375 ms read. */
  assert_true(a.resolved_at - t0 < 1.5);
  drop_domain_queues(rt, domain);
  cb_runtime_free(rt);
}

static void historical_events_return_at_once_and_unknown_ids_say_so(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], id[CB_UUID_LEN + 1];
  snprintf(domain, sizeof domain, "%s", test_name("phist"));
  start_process(rt, domain, id);
  int64_t seq;
  assert_int_equal(cb_process_append_event(rt, domain, id, "progress", "{\"pct\": 10}", &seq, &err), CB_OK);
  assert_int_equal(seq, 2);
  double t0 = now_s();
  cb_unit *rows;
  assert_int_equal(cb_await_event(rt, domain, id, "progress", 0, 10, 0, &rows, &err), CB_OK);
  assert_true(now_s() - t0 < 0.5);
  const cb_result *r = cb_unit_result(rows, cb_unit_count(rows) - 1);
  assert_int_equal(cb_result_int(r, 0, 2), 2);
  cb_unit_free(rows);
  assert_int_equal(cb_await_event(rt, domain, id, "progress", 2, 0.1, 0, &rows, &err), CB_ETIMEOUT);
  const char *unknown = "01234567-89ab-7def-8123-456789abcdef";
  assert_int_equal(cb_await_process(rt, domain, unknown, 1, 0, &rows, &err), CB_ENOTFOUND);
  assert_string_equal(err.message, "unknown process `01234567-89ab-7def-8123-456789abcdef`");
  assert_int_equal(cb_await_event(rt, domain, unknown, "progress", 0, 1, 0, &rows, &err), CB_ENOTFOUND);
  assert_string_equal(err.message, "unknown process `01234567-89ab-7def-8123-456789abcdef`");
  drop_domain_queues(rt, domain);
  cb_runtime_free(rt);
}

static void removing_finished_processes_wakes_nobody(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  assert_int_equal(cb_runtime_listen(rt, CB_AWAIT_CHANNEL, &err), CB_OK);
  char domain[64], id[CB_UUID_LEN + 1], key[128];
  snprintf(domain, sizeof domain, "%s", test_name("ppurge"));
  start_process(rt, domain, id);
  change_process(rt, domain, id, "COMPLETED", "{}");
  /* Watched as a waiter would: by the hub key and a row in the awaiter table
   * (so that a NOTIFY would be sent, and heard, if removal made one). */
  cb_hub_change_key(domain, id, key);
  cb_hub_sub *sub = cb_hub_subscribe(cb_runtime_hub(rt), key);
  cb_unit *u = cb_unit_new();
  const char *params[] = {domain, id};
  cb_unit_add(u,
              "INSERT INTO commandbus.awaiter (domain, id, waiter, expires_at)"
              " VALUES ($1, $2::uuid, $2::uuid, now() + interval '1 minute')",
              2, params);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  int64_t count;
  assert_int_equal(cb_process_purge(rt, domain, 0, &count, &err), CB_OK);
  assert_int_equal(count, 1);
  assert_int_equal(cb_hub_wait(sub, 300), 0); /* nothing woke it */
  cb_hub_unsubscribe(sub);
  cb_unit_reset(u);
  cb_unit_add(u, "DELETE FROM commandbus.awaiter WHERE domain = $1 AND id = $2::uuid", 2, params);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_unit_free(u);
  drop_domain_queues(rt, domain);
  cb_runtime_free(rt);
}

static void the_sink_gets_committed_events_in_order_and_counts_what_does_not_fit(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], id[CB_UUID_LEN + 1];
  snprintf(domain, sizeof domain, "%s", test_name("psink"));
  cb_events_sink_on(rt, 3);
  start_process(rt, domain, id);
  int64_t seq;
  assert_int_equal(cb_process_append_event(rt, domain, id, "a", NULL, &seq, &err), CB_OK);
  assert_int_equal(cb_process_append_event(rt, domain, id, "b", NULL, &seq, &err), CB_OK);
  assert_int_equal(cb_process_append_event(rt, domain, id, "c", NULL, &seq, &err), CB_OK); /* does not fit */
  change_process(rt, domain, id, "COMPLETED", "{}");                                       /* terminal: never pushed */
  cb_events_stats st;
  cb_events_stats_get(rt, &st);
  assert_int_equal(st.pushed, 3);
  assert_int_equal(st.dropped, 1);
  cb_process_event *got[8];
  assert_int_equal(cb_events_take(rt, got, 8), 3);
  const char *types[] = {"STARTED", "a", "b"};
  for (int i = 0; i < 3; i++) {
    assert_int_equal(got[i]->sequence, i + 1);
    assert_string_equal(got[i]->event_type, types[i]);
    assert_string_equal(got[i]->process_id, id);
    free(got[i]);
  }
  /* The log has everything, the terminal event included. */
  cb_unit *rows;
  assert_int_equal(cb_process_events(rt, domain, id, 0, &rows, &err), CB_OK);
  const cb_result *r = cb_unit_result(rows, cb_unit_count(rows) - 1);
  assert_int_equal(cb_result_rows(r), 5);
  assert_string_equal(cb_result_value(r, 4, 3), "COMPLETED");
  cb_unit_free(rows);
  assert_int_equal(cb_process_append_event(rt, domain, id, "late", NULL, &seq, &err), CB_ESTATE);
  cb_events_sink_off(rt);
  drop_domain_queues(rt, domain);
  cb_runtime_free(rt);
}

/* ---- a waiter that registers while a writer holds the command ------------ */

typedef struct holder_arg {
  cb_runtime *rt;
  const char *domain, *id;
  double hold_s;
  int rc;
} holder_arg;

/* A writer elsewhere: completes the command, then holds its transaction
 * open for hold_s before committing (its trigger has looked for waiters
 * already, before anyone registered). */
static void *holder_main(void *p) {
  holder_arg *a = p;
  char hold[32];
  snprintf(hold, sizeof hold, "%.3f", a->hold_s);
  const char *params[] = {a->domain, a->id, hold};
  cb_unit *u = cb_unit_new();
  cb_unit_add(u,
              "UPDATE commandbus.command SET status = 'COMPLETED', updated_at = now()"
              " WHERE domain = $1 AND command_id = $2::uuid",
              2, params);
  /* The domain in a comment names this test's holder among the backends
   * of the other builds running the same test at once (see holder_probe). */
  char sleep_sql[160];
  snprintf(sleep_sql, sizeof sleep_sql, "SELECT pg_sleep($3::float8), $1::text, $2::text /* holder %s */", a->domain);
  cb_unit_add(u, sleep_sql, 3, params);
  cb_err err;
  a->rc = cb_runtime_exec(a->rt, u, &err);
  cb_unit_free(u);
  return NULL;
}

/* 1 when the query (a SELECT EXISTS about the backends) says true. */
static int backend_waits(cb_runtime *rt, const char *sql) {
  cb_unit *u = test_sql(rt, sql);
  int yes = cb_unit_status(u) == CB_OK && strcmp(cb_result_value(cb_unit_result(u, 0), 0, 0), "t") == 0;
  cb_unit_free(u);
  return yes;
}

/* Asks until the query says true, for at most within_s. */
static int wait_for_backend(cb_runtime *rt, const char *sql, double within_s) {
  double until = now_s() + within_s;
  while (now_s() < until) {
    if (backend_waits(rt, sql)) return 1;
    usleep(10 * 1000);
  }
  return 0;
}

/* The probes below, for this test's holder of `domain` only: the plain,
 * sanitizer and valgrind builds run this test at the same time on one
 * database, and each must see its own holder and waiter. */
static const char *holder_probe(char *sql, size_t n, const char *what, const char *domain) {
  const char *holder =
      "SELECT 1 FROM pg_stat_activity h WHERE h.datname = current_database()"
      " AND h.wait_event = 'PgSleep' AND h.query LIKE '%%/* holder %s */%%'";
  char h[256];
  snprintf(h, sizeof h, holder, domain);
  if (strcmp(what, "sleeping") == 0) snprintf(sql, n, "SELECT EXISTS (%s)", h);
  else /* a waiter's read FOR SHARE blocked by that holder */
    snprintf(sql, n,
             "SELECT EXISTS (SELECT 1 FROM pg_stat_activity w WHERE w.datname = current_database()"
             " AND w.wait_event_type = 'Lock' AND w.query LIKE '%%FROM commandbus.command%%FOR SHARE%%'"
             " AND EXISTS (%s AND h.pid = ANY(pg_blocking_pids(w.pid))))",
             h);
  return sql;
}

static void a_waiter_registering_under_a_writer_waits_for_its_commit_and_reads_its_outcome(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(3);
  cb_runtime *waiter_rt = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("await_gap"));
  char probe[768];
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result sent;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK);

  holder_arg h = {rt, domain, sent.command_id, 1.5, -99};
  pthread_t holder;
  pthread_create(&holder, NULL, holder_main, &h);
  assert_true(wait_for_backend(rt, holder_probe(probe, sizeof probe, "sleeping", domain), 10));

  assert_int_equal(cb_runtime_listen(waiter_rt, CB_AWAIT_CHANNEL, &err), CB_OK); /* counted before */
  uint64_t units_before = cb_runtime_units_sent(waiter_rt);
  waiter_arg a = {waiter_rt, domain, sent.command_id, -99, "", 0};
  pthread_t waiter;
  pthread_create(&waiter, NULL, await_main, &a);
  /* The registering read waits for the writer instead of reading the row
   * as it was before the writer's change... */
  assert_true(wait_for_backend(rt, holder_probe(probe, sizeof probe, "blocking", domain), 10));
  pthread_join(holder, NULL);
  assert_int_equal(h.rc, CB_OK);
  pthread_join(waiter, NULL);
  /* ...and reads it as the writer committed it: no second read was needed
   * (the one other unit is the registration's removal). */
  assert_int_equal(a.rc, CB_OK);
  assert_string_equal(a.status, "COMPLETED");
  usleep(100 * 1000);
  assert_true(cb_runtime_units_sent(waiter_rt) - units_before <= 2);

  /* A writer holding the row past the waiter's timeout: TIMEOUT, as for any
   * command that does not finish in time (not a lock error). */
  cb_send_result second;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &second, &err), CB_OK);
  holder_arg h2 = {rt, domain, second.command_id, 1.0, -99};
  pthread_create(&holder, NULL, holder_main, &h2);
  assert_true(wait_for_backend(rt, holder_probe(probe, sizeof probe, "sleeping", domain), 10));
  cb_unit *rows = NULL;
  assert_int_equal(cb_await_command(waiter_rt, domain, second.command_id, 0.2, 0, &rows, &err), CB_ETIMEOUT);
  assert_null(rows);
  pthread_join(holder, NULL);
  assert_int_equal(h2.rc, CB_OK);
  cb_runtime_free(waiter_rt);
  char queue[80];
  snprintf(queue, sizeof queue, "%s__commands", domain);
  int existed;
  cb_queue_drop(rt, queue, &existed, &err);
  cb_runtime_free(rt);
}

static void exec_on_command(cb_runtime *rt, const char *sql, const char *domain, const char *id) {
  cb_unit *u = cb_unit_new();
  const char *params[] = {domain, id};
  cb_unit_add(u, sql, 2, params);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_unit_free(u);
}

/* Whether the write (one transaction) notified the command's awaiters. A
 * marker notification on the same channel follows it, from a later
 * transaction: PostgreSQL delivers notifications in commit order on the
 * listening connection, so once the marker is heard, the write's
 * notification, had there been one, has been heard too. No timing. */
static int write_notified(cb_runtime *rt, const char *sql, const char *domain, const char *id, cb_hub_sub *command,
                          cb_hub_sub *marker) {
  exec_on_command(rt, sql, domain, id);
  exec_on_command(rt, "SELECT pg_notify('" CB_AWAIT_CHANNEL "', $1 || ':marker'), $2", domain, id);
  assert_int_equal(cb_hub_wait(marker, 30000), 1);
  return cb_hub_wait(command, 0);
}

static void only_states_an_await_returns_on_notify_whoever_writes_them(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  assert_int_equal(cb_runtime_listen(rt, CB_AWAIT_CHANNEL, &err), CB_OK);
  char domain[64], key[CB_HUB_KEY_MAX];
  snprintf(domain, sizeof domain, "%s", test_name("awfinal"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result sent;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK);
  const char *id = sent.command_id;
  /* Watched as a waiter would: by the hub key and a row in the awaiter table. */
  cb_hub_change_key(domain, id, key);
  cb_hub_sub *command = cb_hub_subscribe(cb_runtime_hub(rt), key);
  cb_hub_change_key(domain, "marker", key);
  cb_hub_sub *marker = cb_hub_subscribe(cb_runtime_hub(rt), key);
  exec_on_command(rt,
                  "INSERT INTO commandbus.awaiter (domain, id, waiter, expires_at)"
                  " VALUES ($1, $2::uuid, $2::uuid, now() + interval '10 minutes')",
                  domain, id);
  const char *receive = "SELECT status FROM commandbus.sp_receive_command($1, $2::uuid)"; /* as rcmd's worker */
  const char *pending = "UPDATE commandbus.command SET status = 'PENDING' WHERE domain = $1 AND command_id = $2::uuid";
  assert_int_equal(write_notified(rt, receive, domain, id, command, marker), 0);
  assert_int_equal(write_notified(rt, pending, domain, id, command, marker), 0);
  /* Each state an await returns on, written as an operator would. */
  static const char *const final[] = {"COMPLETED", "FAILED", "CANCELED", "IN_TROUBLESHOOTING_QUEUE"};
  for (int i = 0; i < 4; i++) {
    char sql[200];
    snprintf(sql, sizeof sql, "UPDATE commandbus.command SET status = '%s' WHERE domain = $1 AND command_id = $2::uuid",
             final[i]);
    assert_int_equal(write_notified(rt, sql, domain, id, command, marker), 1);
    assert_int_equal(write_notified(rt, pending, domain, id, command, marker), 0); /* an operator's retry */
  }
  /* rcmd's worker finishing it. */
  assert_int_equal(write_notified(rt, receive, domain, id, command, marker), 0);
  assert_int_equal(write_notified(rt, "SELECT commandbus.sp_finish_command($1, $2::uuid, 'COMPLETED', 'COMPLETED')",
                                  domain, id, command, marker),
                   1);
  cb_hub_unsubscribe(command);
  cb_hub_unsubscribe(marker);
  exec_on_command(rt, "DELETE FROM commandbus.awaiter WHERE domain = $1 AND id = $2::uuid", domain, id);
  char queue[80];
  snprintf(queue, sizeof queue, "%s__commands", domain);
  int existed;
  cb_queue_drop(rt, queue, &existed, &err);
  cb_runtime_free(rt);
}

/* The count a query answers, its nparams parameters ($1, $2) bound to a and b. */
static int64_t count_of(cb_runtime *rt, const char *sql, int nparams, const char *a, const char *b) {
  cb_unit *u = cb_unit_new();
  const char *params[] = {a, b};
  cb_unit_add(u, sql, nparams, params);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  int64_t n = atoll(cb_result_value(cb_unit_result(u, 0), 0, 0));
  cb_unit_free(u);
  return n;
}

static int64_t registrations(cb_runtime *rt, const char *domain, const char *id) {
  return count_of(rt,
                  "SELECT count(*) FROM commandbus.awaiter WHERE domain = $1 AND ($2::uuid IS NULL OR id = $2::uuid)",
                  2, domain, id);
}

/* The read a completion wakes also removes the waiter's registration, in
 * the same statement: no transaction of its own after the await returns,
 * no statement of its own in the read's, and nothing left behind when it
 * has. */
static void a_woken_waiter_unregisters_in_the_read_that_returns(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("awunreg"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result sent;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK);
  waiter_arg arg = {rt, domain, sent.command_id, -99, "", 0};
  pthread_t thread;
  pthread_create(&thread, NULL, await_main, &arg);
  double until = now_s() + 20;
  while (registrations(rt, domain, sent.command_id) == 0 && now_s() < until) usleep(5 * 1000);
  assert_int_equal(registrations(rt, domain, sent.command_id), 1);
  exec_on_command(rt, "UPDATE commandbus.command SET status = 'COMPLETED' WHERE domain = $1 AND command_id = $2::uuid",
                  domain, sent.command_id);
  pthread_join(thread, NULL);
  assert_int_equal(arg.rc, CB_OK);
  assert_string_equal(arg.status, "COMPLETED");
  assert_int_equal(arg.statements, 1);
  assert_int_equal(registrations(rt, domain, sent.command_id), 0);
  char queue[80];
  snprintf(queue, sizeof queue, "%s__commands", domain);
  int existed;
  cb_queue_drop(rt, queue, &existed, &err);
  cb_runtime_free(rt);
}

/* ---- requests: a send that registers its waiter -------------------------- */

typedef struct request_lane {
  cb_worker *w;
  cb_runtime *rt;
  const char *domain;
  int received;   /* commands the worker had */
  int registered; /* of them, those whose caller was registered by then */
} request_lane;

static void *request_lane_main(void *p) {
  request_lane *l = p;
  cb_work *work;
  int n;
  while ((n = cb_worker_take(l->w, 0, &work, 1, 100)) >= 0) {
    if (n == 0) continue;
    l->received++;
    l->registered += registrations(l->rt, l->domain, work->command_id) == 1;
    cb_work_succeed(work, "{\"done\": true}");
    cb_worker_done(l->w, work);
  }
  return NULL;
}

#define REQUESTERS 6
#define REQUESTS_EACH 3

typedef struct requester {
  cb_runtime *rt;
  const char *domain;
  int ok;            /* requests answered with their own command, COMPLETED */
  int one_statement; /* of them, those answered by a read of one statement (it unregisters too) */
} requester;

static void *requester_main(void *p) {
  requester *a = p;
  for (int i = 0; i < REQUESTS_EACH; i++) {
    cb_command_spec spec = {0};
    spec.command_type = "Work";
    spec.data_json = "{\"n\": 1}";
    cb_send_result sent;
    cb_unit *rows = NULL;
    cb_err err;
    if (cb_await_send(a->rt, a->domain, &spec, 0, 20, 0, &sent, &rows, &err) != CB_OK) continue;
    const cb_result *r = cb_unit_result(rows, cb_unit_count(rows) - 1);
    a->ok += sent.msg_id > 0 && strcmp(cb_result_value(r, 0, 1), sent.command_id) == 0 &&
             strcmp(cb_result_value(r, 0, 3), "COMPLETED") == 0;
    a->one_statement += cb_unit_count(rows) == 1;
    cb_unit_free(rows);
  }
  return NULL;
}

/* Callers on threads of one runtime (their sends may share transactions)
 * request commands that a worker on a runtime of its own (its own
 * connections, as another process's) completes: each hears of its command
 * through the registration its send's transaction made (the worker finds it
 * there when it receives the command), and none is left when they return. */
static void requests_return_the_outcome_a_worker_elsewhere_gives(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2), *elsewhere = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("request"));
  assert_int_equal(cb_bus_ensure_command_queue(rt, domain, 0, &err), CB_OK);
  cb_worker_options o;
  cb_worker_options_init(&o);
  o.domain = domain;
  o.lanes = 1;
  o.poll_interval = 0.05;
  cb_worker *w;
  assert_int_equal(cb_worker_new(elsewhere, &o, &w, &err), CB_OK);
  request_lane lane = {w, elsewhere, domain, 0, 0};
  pthread_t thread, threads[REQUESTERS];
  pthread_create(&thread, NULL, request_lane_main, &lane);
  assert_int_equal(cb_engine_start(cb_worker_engine(w), &err), CB_OK);
  requester args[REQUESTERS];
  for (int i = 0; i < REQUESTERS; i++) {
    args[i] = (requester){rt, domain, 0, 0};
    pthread_create(&threads[i], NULL, requester_main, &args[i]);
  }
  for (int i = 0; i < REQUESTERS; i++) {
    pthread_join(threads[i], NULL);
    assert_int_equal(args[i].ok, REQUESTS_EACH);
    /* Every answer came from one statement that read the command and
     * removed the registration (under one snapshot: it cannot read the
     * command done and miss its registration). */
    assert_int_equal(args[i].one_statement, REQUESTS_EACH);
  }
  cb_engine_stop(cb_worker_engine(w));
  cb_engine_wait(cb_worker_engine(w), -1);
  pthread_join(thread, NULL);
  assert_int_equal(lane.received, REQUESTERS * REQUESTS_EACH);
  assert_int_equal(lane.registered, REQUESTERS * REQUESTS_EACH);
  assert_int_equal(registrations(rt, domain, NULL), 0);
  cb_worker_free(w);
  cb_runtime_free(elsewhere);
  drop_domain_queues(rt, domain);
  cb_runtime_free(rt);
}

/* Timed out, the command stays sent and its registration goes. */
static void a_request_that_times_out_leaves_the_command_and_no_registration(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("reqtime"));
  cb_command_spec spec = {0};
  spec.command_type = "Never";
  cb_send_result sent;
  cb_unit *rows = NULL;
  assert_int_equal(cb_await_send(rt, domain, &spec, 0, 0.2, 0, &sent, &rows, &err), CB_ETIMEOUT);
  assert_null(rows);
  assert_true(sent.msg_id > 0);
  assert_non_null(strstr(err.message, sent.command_id));
  double until = now_s() + 10;
  while (registrations(rt, domain, sent.command_id) > 0 && now_s() < until) usleep(5 * 1000);
  assert_int_equal(registrations(rt, domain, sent.command_id), 0);
  assert_int_equal(cb_bus_get_command(rt, domain, sent.command_id, &rows, &err), CB_OK);
  assert_string_equal(cb_result_value(cb_unit_result(rows, 0), 0, 3), "PENDING");
  cb_unit_free(rows);
  drop_domain_queues(rt, domain);
  cb_runtime_free(rt);
}

static int64_t commands_with_id(cb_runtime *rt, const char *id) {
  return count_of(rt, "SELECT count(*) FROM commandbus.command WHERE command_id = $1::uuid", 1, id, NULL);
}

/* A send refused (an id that exists, a dedup key held, data the server
 * cannot read) writes nothing and registers no waiter. */
static void a_refused_request_registers_nothing(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("reqrefuse"));
  cb_command_spec first = {0};
  first.command_type = "Work";
  first.dedup_key = "the-key";
  first.dedup_for = 60;
  cb_send_result held, sent;
  assert_int_equal(cb_bus_send(rt, domain, &first, 1, 0, &held, &err), CB_OK);
  cb_unit *rows = NULL;

  cb_command_spec same_id = {0};
  same_id.command_type = "Work";
  same_id.command_id = held.command_id;
  assert_int_equal(cb_await_send(rt, domain, &same_id, 0, 5, 0, &sent, &rows, &err), CB_EDUPLICATE);
  assert_string_equal(sent.duplicate_of, held.command_id);
  assert_int_equal(registrations(rt, domain, held.command_id), 0);

  cb_command_spec same_key = {0};
  same_key.command_type = "Work";
  same_key.dedup_key = "the-key";
  same_key.dedup_for = 60;
  assert_int_equal(cb_await_send(rt, domain, &same_key, 0, 5, 0, &sent, &rows, &err), CB_EDUPLICATE);
  assert_string_equal(sent.duplicate_of, held.command_id);
  assert_int_equal(commands_with_id(rt, sent.command_id), 0);
  assert_int_equal(registrations(rt, domain, sent.command_id), 0);

  cb_command_spec bad_data = {0};
  bad_data.command_type = "Work";
  bad_data.data_json = "{not json";
  assert_int_equal(cb_await_send(rt, domain, &bad_data, 0, 5, 0, &sent, &rows, &err), CB_EINVAL);
  assert_int_equal(commands_with_id(rt, sent.command_id), 0);
  assert_int_equal(registrations(rt, domain, sent.command_id), 0);

  cb_command_spec no_type = {0};
  assert_int_equal(cb_await_send(rt, domain, &no_type, 0, 5, 0, &sent, &rows, &err), CB_EINVAL);
  assert_int_equal(cb_await_send(rt, domain, &first, 0, -1, 0, &sent, &rows, &err), CB_EINVAL);
  assert_null(rows);
  assert_int_equal(registrations(rt, domain, held.command_id), 0);
  drop_domain_queues(rt, domain);
  cb_runtime_free(rt);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(the_poll_schedule_is_25_ms_doubling_capped_at_1_s),
      cmocka_unit_test(sixteen_waiters_are_released_together_by_one_completion),
      cmocka_unit_test(the_safety_poll_doubles_from_25_ms_up_to_30_s),
      cmocka_unit_test(a_waiter_registering_under_a_writer_waits_for_its_commit_and_reads_its_outcome),
      cmocka_unit_test(sixteen_process_waiters_racing_a_completion_resolve_alike),
      cmocka_unit_test(a_polling_waiter_resolves_by_backoff_without_notifications),
      cmocka_unit_test(historical_events_return_at_once_and_unknown_ids_say_so),
      cmocka_unit_test(removing_finished_processes_wakes_nobody),
      cmocka_unit_test(only_states_an_await_returns_on_notify_whoever_writes_them),
      cmocka_unit_test(a_woken_waiter_unregisters_in_the_read_that_returns),
      cmocka_unit_test(requests_return_the_outcome_a_worker_elsewhere_gives),
      cmocka_unit_test(a_request_that_times_out_leaves_the_command_and_no_registration),
      cmocka_unit_test(a_refused_request_registers_nothing),
      cmocka_unit_test(the_sink_gets_committed_events_in_order_and_counts_what_does_not_fit),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
