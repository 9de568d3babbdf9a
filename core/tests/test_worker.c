/* The worker engine from C, with lanes as plain threads: outcomes land as
 * the data contract of docs/architecture.md says, stop drains in-flight
 * work, and the whole thing is clean under ASan and TSan. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "commandbus/bus.h"
#include "commandbus/limits.h"
#include "commandbus/schema.h"
#include "commandbus/worker.h"
#include "keyed.h"
#include "test_support.h"
#include "worker_internal.h"

typedef struct lane_arg {
  cb_worker *w;
  int lane;
  int handled;
  int sleep_ms;
} lane_arg;

/* A lane: "Ok" succeeds with a result, "Fail" breaks a business rule,
 * "Boom" fails permanently, anything else fails transiently. */
static void *lane_main(void *p) {
  lane_arg *a = p;
  cb_work *work;
  for (;;) {
    int n = cb_worker_take(a->w, a->lane, &work, 1, 100);
    if (n < 0) break;
    if (n == 0) continue;
    if (a->sleep_ms) usleep((useconds_t)a->sleep_ms * 1000);
    if (strcmp(work->command_type, "Ok") == 0) cb_work_succeed(work, "{\"ok\": true}");
    else if (strcmp(work->command_type, "Fail") == 0)
      cb_work_fail(work, CB_OUTCOME_BUSINESS_RULE, "NOPE", "not allowed", "{\"why\": 1}");
    else if (strcmp(work->command_type, "Boom") == 0)
      cb_work_fail(work, CB_OUTCOME_PERMANENT, "BOOM", "exploded", NULL);
    else cb_work_fail(work, CB_OUTCOME_TRANSIENT, "AGAIN", "try later", NULL);
    cb_worker_done(a->w, work);
    a->handled++;
  }
  return NULL;
}

static int64_t count_status(cb_runtime *rt, const char *domain, const char *status) {
  cb_unit *u = cb_unit_new();
  const char *p[] = {domain, status};
  cb_unit_add(u, "SELECT count(*) FROM commandbus.command WHERE domain = $1 AND status = $2", 2, p);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  int64_t n = cb_result_int(cb_unit_result(u, 0), 0, 0);
  cb_unit_free(u);
  return n;
}

/* Waits (up to 15 s) until `n` of the domain's commands are COMPLETED. */
static void wait_completed(cb_runtime *rt, const char *domain, int64_t n) {
  for (int i = 0; count_status(rt, domain, "COMPLETED") < n; i++) {
    assert_true(i < 300);
    usleep(50 * 1000);
  }
}

/* Drops the domain's command queue, the test's last step before its
 * runtime goes. */
static void drop_commands_queue(cb_runtime *rt, const char *domain) {
  char queue[CB_QUEUE_NAME_MAX + 1];
  int existed;
  cb_err err;
  cb_command_queue_name(domain, queue);
  cb_queue_drop(rt, queue, &existed, &err);
}

static void send_many(cb_runtime *rt, const char *domain, const char *type, int n, const char *reply_to) {
  cb_command_spec *specs = calloc((size_t)n, sizeof *specs);
  cb_send_result *results = calloc((size_t)n, sizeof *results);
  for (int i = 0; i < n; i++) {
    specs[i].command_type = type;
    specs[i].data_json = "{\"n\": 1}";
    specs[i].max_attempts = 1;
    specs[i].reply_to = reply_to;
  }
  cb_err err;
  assert_int_equal(cb_bus_send(rt, domain, specs, (size_t)n, 0, results, &err), CB_OK);
  free(specs);
  free(results);
}

static int all_settled(cb_runtime *rt, const char *domain) {
  return count_status(rt, domain, "PENDING") + count_status(rt, domain, "IN_PROGRESS") == 0;
}

static void run_lanes(cb_worker *w, lane_arg *args, pthread_t *threads, int lanes, int sleep_ms) {
  for (int i = 0; i < lanes; i++) {
    args[i] = (lane_arg){w, i, 0, sleep_ms};
    pthread_create(&threads[i], NULL, lane_main, &args[i]);
  }
}

/* A worker of `lanes` lanes (at most 4) on domain, its handlers taking
 * sleep_ms each, polling every 50 ms, started. */
typedef struct test_worker {
  cb_worker *w;
  int lanes;
  lane_arg args[4];
  pthread_t threads[4];
} test_worker;

static cb_worker *start_worker(cb_runtime *rt, const char *domain, int lanes, int sleep_ms, test_worker *t) {
  cb_worker_options o;
  cb_worker_options_init(&o);
  o.domain = domain;
  o.lanes = lanes;
  o.poll_interval = 0.05;
  cb_err err;
  assert_int_equal(cb_worker_new(rt, &o, &t->w, &err), CB_OK);
  t->lanes = lanes;
  run_lanes(t->w, t->args, t->threads, lanes, sleep_ms);
  assert_int_equal(cb_engine_start(cb_worker_engine(t->w), &err), CB_OK);
  return t->w;
}

/* Stops it and joins its lanes; the worker is the caller's to free. */
static void stop_worker(test_worker *t) {
  cb_engine_stop(cb_worker_engine(t->w));
  assert_int_equal(cb_engine_wait(cb_worker_engine(t->w), 30000), 1);
  for (int i = 0; i < t->lanes; i++) pthread_join(t->threads[i], NULL);
}

static void every_outcome_lands_as_the_contract_says(void **state) {
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], reply[80];
  snprintf(domain, sizeof domain, "%s", test_name("cwork"));
  snprintf(reply, sizeof reply, "%s__replies", domain);
  send_many(rt, domain, "Ok", 300, reply);
  send_many(rt, domain, "Fail", 20, reply);
  send_many(rt, domain, "Boom", 10, NULL);
  send_many(rt, domain, "Flaky", 10, NULL); /* max_attempts 1: exhausted at once */

  test_worker tw;
  cb_worker *w = start_worker(rt, domain, 4, 0, &tw);
  for (int i = 0; i < 300 && !all_settled(rt, domain); i++) usleep(50 * 1000);
  stop_worker(&tw);
  cb_worker_health h;
  cb_worker_health_get(w, &h);
  assert_string_equal(h.state, "stopped");
  assert_int_equal(h.successes, 300);
  assert_int_equal(h.failures, 40);
  cb_worker_free(w);

  assert_int_equal(count_status(rt, domain, "COMPLETED"), 300);
  assert_int_equal(count_status(rt, domain, "FAILED"), 20);
  assert_int_equal(count_status(rt, domain, "IN_TROUBLESHOOTING_QUEUE"), 20);
  cb_queue_metrics m;
  assert_int_equal(cb_queue_metrics_get(rt, reply, &m, &err), CB_OK);
  assert_int_equal(m.queue_length, 320); /* SUCCESS and FAILED replies; none for the TSQ */
  char queue[80];
  snprintf(queue, sizeof queue, "%s__commands", domain);
  assert_int_equal(cb_queue_metrics_get(rt, queue, &m, &err), CB_OK);
  assert_int_equal(m.queue_length, 0);
  int existed;
  cb_queue_drop(rt, queue, &existed, &err);
  cb_queue_drop(rt, reply, &existed, &err);
  cb_runtime_free(rt);
}

static void stop_lets_running_handlers_finish_and_acknowledges_them(void **state) {
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("cdrain"));
  send_many(rt, domain, "Ok", 6, NULL);
  test_worker tw;
  cb_worker *w = start_worker(rt, domain, 2, 300, &tw); /* each handler takes 0.3 s */
  while (cb_worker_in_flight(w) == 0) usleep(10 * 1000);
  stop_worker(&tw);
  int handled = tw.args[0].handled + tw.args[1].handled;
  assert_true(handled >= 1);
  /* Whatever was handled was acknowledged; nothing is left half done. */
  assert_int_equal(count_status(rt, domain, "COMPLETED"), handled);
  assert_int_equal(count_status(rt, domain, "IN_PROGRESS") + count_status(rt, domain, "PENDING") +
                       count_status(rt, domain, "COMPLETED"),
                   6);
  cb_worker_free(w);
  drop_commands_queue(rt, domain);
  cb_runtime_free(rt);
}

static void a_statement_timeout_not_below_the_visibility_timeout_is_refused(void **state) {
  cb_runtime *rt = test_runtime(1);
  cb_worker_options o;
  cb_worker_options_init(&o);
  o.domain = "whatever";
  o.visibility_timeout = 10;
  o.statement_timeout = 10;
  cb_worker *w = NULL;
  cb_err err;
  assert_int_equal(cb_worker_new(rt, &o, &w, &err), CB_EINVAL);
  assert_null(w);
  assert_non_null(strstr(err.message, "statement_timeout"));
  cb_runtime_free(rt);
}

/* A stop before the start ends the lanes at once and leaves nothing for the
 * loop thread to do: the worker can be freed right away (under ASan and
 * valgrind, a stop left pending on the loop thread would touch freed
 * memory), and it does not start afterwards. */
static void a_worker_stopped_before_it_started_ends_at_once(void **state) {
  cb_runtime *rt = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("cwstop"));
  cb_worker_options o;
  cb_worker_options_init(&o);
  o.domain = domain;
  o.lanes = 2;
  for (int round = 0; round < 20; round++) {
    cb_worker *w = NULL;
    assert_int_equal(cb_worker_new(rt, &o, &w, &err), CB_OK);
    cb_engine *e = cb_worker_engine(w);
    cb_engine_stop(e);
    assert_int_equal(cb_engine_wait(e, 0), 1);
    cb_work *work;
    assert_int_equal(cb_worker_take(w, 1, &work, 1, 0), -1);
    if (round == 0) assert_int_equal(cb_engine_start(e, &err), CB_ESTATE);
    cb_runner_stat stat;
    cb_engine_report(e, &stat);
    assert_string_equal(stat.state, "stopped");
    assert_string_equal(stat.kind, "worker");
    assert_int_equal(stat.lanes, 2);
    cb_worker_free(w);
  }
  drop_commands_queue(rt, domain);
  cb_runtime_free(rt);
}

/* ---- a receive never waits for a command row ------------------------------------ */

typedef struct ack_holder {
  cb_runtime *rt;
  const char *domain, *queue_table, *key, *msg;
  int status;
} ack_holder;

static void exec_or_fail(cb_runtime *rt, const char *sql, int nparams, const char *const *params) {
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, sql, nparams, params);
  cb_err err;
  int rc = cb_runtime_exec(rt, u, &err);
  if (rc != CB_OK) fprintf(stderr, "%s: %s\n", sql, err.message);
  assert_int_equal(rc, CB_OK);
  cb_unit_free(u);
}

static int64_t count_of(cb_runtime *rt, const char *sql, const char *param) {
  cb_unit *u = cb_unit_new();
  const char *p[] = {param};
  cb_unit_add(u, sql, param ? 1 : 0, p);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  int64_t n = cb_result_int(cb_unit_result(u, 0), 0, 0);
  cb_unit_free(u);
  return n;
}

/* An acknowledgement in the order the worker's own takes its locks: the
 * command row first, then (once the test lets it go on) the message. */
static void *hold_and_acknowledge(void *p) {
  ack_holder *h = p;
  char del[160];
  snprintf(del, sizeof del, "DELETE FROM %s WHERE msg_id = $1::bigint", h->queue_table);
  const char *domain[] = {h->domain}, *key[] = {h->key}, *msg[] = {h->msg};
  cb_unit *u = cb_unit_new();
  cb_unit_add(u,
              "UPDATE commandbus.command SET status = 'COMPLETED', updated_at = now() WHERE domain = $1"
              " AND attempts = 1 AND status = 'IN_PROGRESS'",
              1, domain);
  cb_unit_add(u, "SELECT pg_advisory_xact_lock_shared($1::bigint)", 1, key);
  cb_unit_add(u, del, 1, msg);
  cb_err err;
  h->status = cb_runtime_exec(h->rt, u, &err);
  if (h->status != CB_OK) fprintf(stderr, "the acknowledgement failed: %s\n", err.message);
  cb_unit_free(u);
  return NULL;
}

/* A delivery whose visibility timeout ran out while its acknowledgement is
 * under way: the acknowledgement holds the command row and will delete the
 * message next. A receive that takes the message and then waits for the
 * command row closes a cycle (the acknowledgement's delete waits for the
 * receive): PostgreSQL ends one of them as a deadlock, and until then the
 * receive holds up every other message it took. The receive leaves such a
 * message alone: another command sent beside it completes while the
 * acknowledgement still holds its row, and then the acknowledgement
 * completes as it is, the message never received again. */
static void a_receive_leaves_a_message_whose_command_is_being_acknowledged(void **state) {
  cb_runtime *rt = test_runtime(2), *other = test_runtime(1), *gate = test_runtime(1), *acker = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], queue[80], table[96], key[32], msg[32], sql[256];
  snprintf(domain, sizeof domain, "%s", test_name("cbusy"));
  snprintf(queue, sizeof queue, "%s__commands", domain);
  snprintf(table, sizeof table, "pgmq.q_%s", queue);
  snprintf(key, sizeof key, "%lld", 3000000LL + (long long)getpid());
  send_many(rt, domain, "Ok", 1, NULL);
  /* Received once, at attempt 1, and its visibility timeout has run out. */
  const char *dp[] = {domain};
  exec_or_fail(other, "UPDATE commandbus.command SET status = 'IN_PROGRESS', attempts = 1 WHERE domain = $1", 1, dp);
  snprintf(sql, sizeof sql, "UPDATE %s SET read_ct = 1, vt = now() - interval '1 second'", table);
  exec_or_fail(other, sql, 0, NULL);
  snprintf(sql, sizeof sql, "SELECT max(msg_id) FROM %s", table);
  snprintf(msg, sizeof msg, "%lld", (long long)count_of(other, sql, NULL));

  const char *kp[] = {key};
  exec_or_fail(gate, "SELECT pg_advisory_lock($1::bigint)", 1, kp);
  ack_holder h = {acker, domain, table, key, msg, -1};
  pthread_t holder;
  pthread_create(&holder, NULL, hold_and_acknowledge, &h);
  /* It holds the command row once it waits for the gate. */
  for (int i = 0; count_of(other,
                           "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                           " AND objid = $1::bigint",
                           key) != 1;
       i++) {
    assert_true(i < 6000); /* a minute */
    usleep(10 * 1000);
  }

  send_many(rt, domain, "Ok", 1, NULL); /* the other command */
  test_worker tw;
  cb_worker *w = start_worker(rt, domain, 2, 0, &tw);
  /* Well within the statement timeout (25 s) a waiting receive would end at. */
  wait_completed(rt, domain, 1);

  exec_or_fail(gate, "SELECT pg_advisory_unlock($1::bigint)", 1, kp);
  pthread_join(holder, NULL);
  assert_int_equal(h.status, CB_OK);
  stop_worker(&tw);
  cb_worker_free(w);

  assert_int_equal(count_status(rt, domain, "COMPLETED"), 2);
  /* Only the other command was received; the acknowledged one kept its attempt. */
  assert_int_equal(
      count_of(other, "SELECT count(*) FROM commandbus.audit WHERE domain = $1 AND event_type = 'RECEIVED'", domain),
      1);
  assert_int_equal(count_of(other, "SELECT max(attempts) FROM commandbus.command WHERE domain = $1", domain), 1);
  snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
  assert_int_equal(count_of(other, sql, NULL), 0);
  int existed;
  cb_queue_drop(rt, queue, &existed, &err);
  cb_runtime_free(acker);
  cb_runtime_free(gate);
  cb_runtime_free(other);
  cb_runtime_free(rt);
}

/* ---- the two receive statements ------------------------------------------------------ */

/* Sends one command of `type` at `priority` with data {"n": n}. */
static void send_one(cb_runtime *rt, const char *domain, const char *type, int priority, int n) {
  char data[32];
  snprintf(data, sizeof data, "{\"n\": %d}", n);
  cb_command_spec spec = {0};
  spec.command_type = type;
  spec.data_json = data;
  spec.max_attempts = 3;
  spec.priority = priority;
  cb_send_result result;
  cb_err err;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &result, &err), CB_OK);
}

/* One fetch as the worker makes it (its transaction's settings, the lock of
 * the limits, then the receive statement, with or without limits) for up
 * to `room` messages. Returns the unit; the receive's rows are statement 2. */
static cb_unit *receive(cb_runtime *rt, const char *domain, int limits, int room) {
  char queue[CB_QUEUE_NAME_MAX + 1], qty[16];
  cb_command_queue_name(domain, queue);
  snprintf(qty, sizeof qty, "%d", room);
  cb_strbuf sql = {0};
  cb__worker_sql_receive(&sql, queue, limits);
  assert_false(sql.failed);
  const char *params[] = {qty, "30", domain, "0"};
  cb_unit *u = cb_unit_new();
  cb_add_keyed_begin(u, 10);
  cb_limits_add_lock(u, domain);
  cb_unit_add(u, sql.data, 4, params);
  cb_strbuf_free(&sql);
  cb_err err;
  int rc = cb_runtime_exec(rt, u, &err);
  if (rc != CB_OK) fprintf(stderr, "receive: %s\n", err.message);
  assert_int_equal(rc, CB_OK);
  return u;
}

/* One domain's receive, as text: each row's data and priority, or its
 * poison reason's inputs (its message's kind and the command's status). */
static void receive_as_text(cb_runtime *rt, const char *domain, int limits, int room, char *out, size_t size) {
  cb_unit *u = receive(rt, domain, limits, room);
  const cb_result *r = cb_unit_result(u, 2);
  size_t len = 0;
  out[0] = '\0';
  for (int i = 0; i < cb_result_rows(r); i++) {
    if (cb_result_is_null(r, i, 2))
      len += (size_t)snprintf(out + len, size - len, "poison(%s,%s) ", cb_result_value(r, i, 10),
                              cb_result_is_null(r, i, 12) ? "-" : cb_result_value(r, i, 12));
    else
      len += (size_t)snprintf(out + len, size - len, "%s@%s#%s ", cb_result_value(r, i, 4), cb_result_value(r, i, 13),
                              cb_result_value(r, i, 5));
    assert_true(len < size);
  }
  cb_unit_free(u);
}

typedef struct row_holder {
  cb_runtime *rt;
  const char *domain, *key;
  int status;
} row_holder;

/* Holds the domain's "Held" command row until the test lets it go. */
static void *hold_row(void *p) {
  row_holder *h = p;
  const char *domain[] = {h->domain}, *key[] = {h->key};
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, "SELECT 1 FROM commandbus.command WHERE domain = $1 AND command_type = 'Held' FOR NO KEY UPDATE", 1,
              domain);
  cb_unit_add(u, "SELECT pg_advisory_xact_lock_shared($1::bigint)", 1, key);
  cb_err err;
  h->status = cb_runtime_exec(h->rt, u, &err);
  cb_unit_free(u);
  return NULL;
}

/* Both receive statements take the same messages in the same order and
 * write the same rows: priorities first (higher first, the same priority in
 * the order sent), poison handed back to be set aside, and a redelivered
 * message whose command another transaction holds left in the queue. */
static void both_receive_statements_receive_alike(void **state) {
  cb_runtime *rt = test_runtime(2), *holder = test_runtime(1), *gate = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char result[2][1024];
  for (int limits = 0; limits < 2; limits++) {
    char domain[64], table[96], sql[512];
    snprintf(domain, sizeof domain, "%s", test_name(limits ? "crecvfull" : "crecvlean"));
    snprintf(table, sizeof table, "pgmq.q_%s__commands", domain);
    /* A command received once whose visibility timeout ran out: its
     * message is read again, while another transaction holds the command. */
    send_one(rt, domain, "Held", 0, 0);
    const char *dp[] = {domain};
    exec_or_fail(rt, "UPDATE commandbus.command SET status = 'IN_PROGRESS', attempts = 1 WHERE domain = $1", 1, dp);
    snprintf(sql, sizeof sql, "UPDATE %s SET read_ct = 1, vt = now() - interval '1 second'", table);
    exec_or_fail(rt, sql, 0, NULL);
    send_one(rt, domain, "T", 0, 1);
    send_one(rt, domain, "T", 5, 2);
    send_one(rt, domain, "T", -3, 3);
    send_one(rt, domain, "T", 5, 4);
    send_one(rt, domain, "T", 0, 5);
    snprintf(sql, sizeof sql, "INSERT INTO %s (vt, message) VALUES (now(), '[1]')", table);
    exec_or_fail(rt, sql, 0, NULL); /* not an object */
    snprintf(
        sql, sizeof sql,
        "INSERT INTO %s (vt, message) VALUES (now(), '{\"command_id\": \"00000000-0000-0000-0000-000000000001\"}')",
        table);
    exec_or_fail(rt, sql, 0, NULL); /* no such command */
    char key[32];
    snprintf(key, sizeof key, "%lld", 4000000LL + 2LL * getpid() + limits);
    const char *kp[] = {key};
    exec_or_fail(gate, "SELECT pg_advisory_lock($1::bigint)", 1, kp);
    row_holder h = {holder, domain, key, -1};
    pthread_t t;
    pthread_create(&t, NULL, hold_row, &h);
    for (int i = 0; count_of(gate,
                             "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                             " AND objid = $1::bigint",
                             key) != 1;
         i++) {
      assert_true(i < 6000); /* a minute */
      usleep(10 * 1000);
    }
    receive_as_text(rt, domain, limits, 20, result[limits], sizeof result[limits]);
    exec_or_fail(gate, "SELECT pg_advisory_unlock($1::bigint)", 1, kp);
    pthread_join(t, NULL);
    assert_int_equal(h.status, CB_OK);
    /* Received: five commands at their first attempt, audited; the held one
     * untouched, its message still in the queue, unread this time. */
    assert_int_equal(count_status(rt, domain, "IN_PROGRESS"), 6);
    assert_int_equal(count_of(rt,
                              "SELECT count(*) FROM commandbus.audit WHERE domain = $1 AND event_type = 'RECEIVED'"
                              " AND (details_json->>'attempt')::int = 1",
                              domain),
                     5);
    assert_int_equal(count_of(rt,
                              "SELECT count(*) FROM commandbus.command WHERE domain = $1 AND attempts = 1"
                              " AND lease_expires_at > now()",
                              domain),
                     5);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s WHERE read_ct = 1 AND vt < now()", table);
    assert_int_equal(count_of(rt, sql, NULL), 1);
    drop_commands_queue(rt, domain);
  }
  /* Priorities, each command's attempt; the poison rows after them (priority 0, by msg_id). */
  assert_string_equal(result[1],
                      "{\"n\": 2}@5#1 {\"n\": 4}@5#1 {\"n\": 1}@0#1 {\"n\": 5}@0#1 poison(array,-) poison(object,-) "
                      "{\"n\": 3}@-3#1 ");
  assert_string_equal(result[0], result[1]);
  cb_runtime_free(gate);
  cb_runtime_free(holder);
  cb_runtime_free(rt);
}

/* The lean statement, run for a domain that has limits, receives nothing
 * (no attempt, no audit, the message untouched) and says so by its one
 * row whose msg_id is null; the full statement applies the limit. */
static void the_lean_receive_takes_nothing_from_a_domain_with_limits(void **state) {
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], table[96], sql[256];
  snprintf(domain, sizeof domain, "%s", test_name("crecvlim"));
  snprintf(table, sizeof table, "pgmq.q_%s__commands", domain);
  for (int i = 0; i < 3; i++) send_one(rt, domain, "T", 0, i);
  assert_int_equal(cb_limits_set(rt, domain, "T", 2, 0, &err), CB_OK);

  cb_unit *u = receive(rt, domain, 0, 10);
  const cb_result *r = cb_unit_result(u, 2);
  assert_int_equal(cb_result_rows(r), 1);
  assert_true(cb_result_is_null(r, 0, 0));
  cb_unit_free(u);
  assert_int_equal(count_status(rt, domain, "PENDING"), 3);
  assert_int_equal(
      count_of(rt, "SELECT count(*) FROM commandbus.audit WHERE domain = $1 AND event_type = 'RECEIVED'", domain), 0);
  snprintf(sql, sizeof sql, "SELECT count(*) FROM %s WHERE read_ct = 0 AND vt <= now()", table);
  assert_int_equal(count_of(rt, sql, NULL), 3);

  u = receive(rt, domain, 1, 10); /* two a second */
  r = cb_unit_result(u, 2);
  assert_int_equal(cb_result_rows(r), 2);
  assert_false(cb_result_is_null(r, 0, 0));
  cb_unit_free(u);
  assert_int_equal(count_status(rt, domain, "IN_PROGRESS"), 2);

  /* With the limit gone the lean statement receives as the full one does. */
  assert_int_equal(cb_limits_set(rt, domain, "T", 0, 0, &err), CB_OK);
  u = receive(rt, domain, 0, 10);
  r = cb_unit_result(u, 2);
  assert_int_equal(cb_result_rows(r), 1);
  assert_false(cb_result_is_null(r, 0, 0));
  cb_unit_free(u);
  assert_int_equal(count_status(rt, domain, "IN_PROGRESS"), 3);
  drop_commands_queue(rt, domain);
  cb_runtime_free(rt);
}

/* A worker that found no limits reads with the lean statement; a rate limit
 * set while it runs holds from its next fetch on. */
static void a_limit_set_while_the_worker_runs_holds(void **state) {
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("crecvset"));
  send_many(rt, domain, "Ok", 1, NULL);
  test_worker tw;
  cb_worker *w = start_worker(rt, domain, 2, 0, &tw);
  wait_completed(rt, domain, 1);
  /* It fetched and found no limits (and polls every 50 ms meanwhile). */
  assert_int_equal(cb_limits_set(rt, domain, "Ok", 2, 0, &err), CB_OK);
  send_many(rt, domain, "Ok", 6, NULL);
  wait_completed(rt, domain, 7);
  stop_worker(&tw);
  cb_worker_free(w);
  /* The six after the limit: at most two a second. */
  assert_int_equal(count_of(rt,
                            "SELECT max(n) FROM (SELECT count(*) AS n FROM commandbus.audit a"
                            " JOIN commandbus.command k ON k.domain = a.domain AND k.command_id = a.command_id"
                            " WHERE a.domain = $1 AND a.event_type = 'RECEIVED' AND k.created_at >"
                            " (SELECT min(created_at) FROM commandbus.command WHERE domain = $1)"
                            " GROUP BY date_trunc('second', a.ts)) x",
                            domain),
                   2);
  drop_commands_queue(rt, domain);
  cb_runtime_free(rt);
}

/* The worker's receive and acknowledgement statements run on their generic
 * plans, made once per connection: none is planned again at each execution
 * (PostgreSQL's own choice planned the acknowledgement every time). The
 * runtime has one connection for statements, so the worker's plans are in
 * the plan cache the test reads. */
static void the_worker_statements_are_not_planned_at_each_execution(void **state) {
  cb_runtime *rt = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("cplans"));
  test_worker tw;
  cb_worker *w = start_worker(rt, domain, 1, 0, &tw);
  for (int n = 1; n <= 8; n++) { /* one at a time: a round and a fetch each */
    send_many(rt, domain, n % 2 ? "Ok" : "Fail", 1, NULL);
    for (int i = 0; count_status(rt, domain, "COMPLETED") + count_status(rt, domain, "FAILED") < n; i++) {
      assert_true(i < 300);
      usleep(20 * 1000);
    }
  }
  stop_worker(&tw);
  cb_worker_free(w);
  const char *acks =
      "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE"
      " 'WITH i AS (SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(id uuid, msg bigint, attempt int%'";
  const char *receives = "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%RECEIVED%'";
  char sql[512];
  snprintf(sql, sizeof sql, "%s AND generic_plans > 0", acks);
  assert_int_equal(count_of(rt, sql, NULL), 2); /* success and business-rule failure */
  snprintf(sql, sizeof sql, "%s AND custom_plans > 0", acks);
  assert_int_equal(count_of(rt, sql, NULL), 0);
  snprintf(sql, sizeof sql, "%s AND generic_plans > 0", receives);
  assert_true(count_of(rt, sql, NULL) >= 1);
  snprintf(sql, sizeof sql, "%s AND custom_plans > 0", receives);
  assert_int_equal(count_of(rt, sql, NULL), 0);
  drop_commands_queue(rt, domain);
  cb_runtime_free(rt);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(every_outcome_lands_as_the_contract_says),
      cmocka_unit_test(stop_lets_running_handlers_finish_and_acknowledges_them),
      cmocka_unit_test(a_statement_timeout_not_below_the_visibility_timeout_is_refused),
      cmocka_unit_test(a_worker_stopped_before_it_started_ends_at_once),
      cmocka_unit_test(a_receive_leaves_a_message_whose_command_is_being_acknowledged),
      cmocka_unit_test(both_receive_statements_receive_alike),
      cmocka_unit_test(the_lean_receive_takes_nothing_from_a_domain_with_limits),
      cmocka_unit_test(a_limit_set_while_the_worker_runs_holds),
      cmocka_unit_test(the_worker_statements_are_not_planned_at_each_execution),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
