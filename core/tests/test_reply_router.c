/* The process reply router from C, with lanes as plain threads: a reply
 * moves its process and sends the next step's command, a stray reply is
 * archived, a reply is never applied twice, a batch holding a stale reply
 * still applies the others, and stop drains what the lanes hold. Clean under
 * ASan, TSan and valgrind. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "commandbus/bus.h"
#include "commandbus/process.h"
#include "commandbus/reply_router.h"
#include "commandbus/schema.h"
#include "commandbus/uuid.h"
#include "test_support.h"

/* ---- a world of its own per test ------------------------------------------------ */

typedef struct world {
  cb_runtime *rt;
  char domain[64];
  char commands[96]; /* <domain>__commands */
  char replies[96];  /* <domain>__process_replies */
} world;

static void world_open(world *w, const char *prefix) {
  w->rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(w->rt, NULL, &err), CB_OK);
  snprintf(w->domain, sizeof w->domain, "%s", test_name(prefix));
  snprintf(w->commands, sizeof w->commands, "%s__commands", w->domain);
  snprintf(w->replies, sizeof w->replies, "%s__process_replies", w->domain);
}

static void run_sql(world *w, const char *sql, int nparams, const char *const *params) {
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, sql, nparams, params);
  cb_err err;
  assert_int_equal(cb_runtime_exec(w->rt, u, &err), CB_OK);
  cb_unit_free(u);
}

static void world_close(world *w) {
  const char *p[] = {w->domain};
  run_sql(w, "DELETE FROM commandbus.process_audit WHERE domain = $1", 1, p);
  run_sql(w, "DELETE FROM commandbus.process WHERE domain = $1", 1, p);
  run_sql(w, "DELETE FROM commandbus.process_event WHERE domain = $1", 1, p);
  run_sql(w, "DELETE FROM commandbus.audit WHERE domain = $1", 1, p);
  run_sql(w, "DELETE FROM commandbus.command WHERE domain = $1", 1, p);
  int existed;
  cb_err err;
  cb_queue_drop(w->rt, w->commands, &existed, &err);
  cb_queue_drop(w->rt, w->replies, &existed, &err);
  cb_runtime_free(w->rt);
}

/* The integer the query (one row, one column) returns. */
static int64_t query_int(world *w, const char *sql, int nparams, const char *const *params) {
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, sql, nparams, params);
  cb_err err;
  assert_int_equal(cb_runtime_exec(w->rt, u, &err), CB_OK);
  int64_t n = cb_result_int(cb_unit_result(u, 0), 0, 0);
  cb_unit_free(u);
  return n;
}

/* Starts a process at step "reserve"; process_id gets its id, command_id
 * the id of the Reserve command it sent. */
static void start_process(world *w, char *process_id, char *command_id) {
  cb_process_start_spec spec = {
      .domain = w->domain, .process_type = "Order", .state_json = "{}", .step_name = "reserve"};
  cb_command_spec first = {.command_type = "Reserve", .data_json = "{}", .reply_to = w->replies};
  cb_send_result sent;
  cb_err err;
  assert_int_equal(cb_process_start(w->rt, &spec, &first, process_id, &sent, &err), CB_OK);
  snprintf(command_id, CB_UUID_LEN + 1, "%s", sent.command_id);
}

/* Puts the reply a worker would send for the command on the reply queue. */
static void send_reply(world *w, const char *process_id, const char *command_id) {
  char json[256];
  snprintf(json, sizeof json,
           "{\"command_id\": \"%s\", \"correlation_id\": \"%s\", \"outcome\": \"SUCCESS\", \"result\": {}}", command_id,
           process_id);
  int64_t msg_id;
  cb_err err;
  assert_int_equal(cb_queue_send(w->rt, w->replies, json, 0, &msg_id, &err), CB_OK);
}

static void process_is(world *w, const char *process_id, const char *status, const char *step) {
  const char *p[] = {w->domain, process_id, status, step};
  assert_int_equal(query_int(w,
                             "SELECT count(*) FROM commandbus.process WHERE domain = $1 AND process_id = $2::uuid"
                             " AND status = $3 AND current_step = $4",
                             4, p),
                   1);
}

static int64_t commands_of_type(world *w, const char *type) {
  const char *p[] = {w->domain, type};
  return query_int(w, "SELECT count(*) FROM commandbus.command WHERE domain = $1 AND command_type = $2", 2, p);
}

static int64_t queue_length(world *w, const char *queue) {
  cb_queue_metrics m;
  cb_err err;
  assert_int_equal(cb_queue_metrics_get(w->rt, queue, &m, &err), CB_OK);
  return m.queue_length;
}

static int64_t archived(world *w) {
  char sql[160];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM pgmq.a_%s", w->replies);
  return query_int(w, sql, 0, NULL);
}

static cb_reply_router *new_router(world *w, int lanes) {
  cb_reply_router_options o;
  cb_reply_router_options_init(&o);
  o.domain = w->domain;
  o.lanes = lanes;
  o.poll_interval = 0.05;
  cb_reply_router *r = NULL;
  cb_err err;
  assert_int_equal(cb_reply_router_new(w->rt, &o, &r, &err), CB_OK);
  return r;
}

/* ---- lanes ------------------------------------------------------------------------- */

/* The test's process manager: reserve, then charge, then done. */
static cb_reply_decision decide(const cb_reply *reply) {
  cb_reply_decision d = {0};
  if (strcmp(reply->step_name, "reserve") == 0) {
    d.status = "WAITING";
    d.step = "charge";
    d.state_json = "{\"reserved\": true}";
    d.next_type = "Charge";
    d.next_data_json = "{\"amount\": 5}";
  } else {
    d.status = "COMPLETED";
    d.step = reply->step_name;
    d.state_json = "{\"reserved\": true, \"charged\": true}";
  }
  return d;
}

typedef struct lane_arg {
  cb_reply_router *r;
  int lane;
  int sleep_ms; /* per batch, before applying it */
  int taken;
} lane_arg;

static void *lane_main(void *p) {
  lane_arg *a = p;
  cb_reply *replies[CB_REPLY_ROUTER_BATCH_MAX];
  cb_reply_decision decisions[CB_REPLY_ROUTER_BATCH_MAX];
  for (;;) {
    int ended;
    int n = cb_reply_router_take_many(a->r, a->lane, replies, CB_REPLY_ROUTER_BATCH_MAX, 100, &ended);
    if (ended) break;
    if (n == 0) continue;
    a->taken += n;
    for (int i = 0; i < n; i++) decisions[i] = decide(replies[i]);
    if (a->sleep_ms) usleep((useconds_t)a->sleep_ms * 1000);
    cb_err err;
    cb_reply_router_apply_many(a->r, replies, decisions, n, &err);
  }
  return NULL;
}

typedef struct lanes {
  lane_arg args[4];
  pthread_t threads[4];
  int n;
} lanes;

static void lanes_start(lanes *l, cb_reply_router *r, int sleep_ms) {
  l->n = cb_engine_lanes(cb_reply_router_engine(r));
  for (int i = 0; i < l->n; i++) {
    l->args[i] = (lane_arg){r, i, sleep_ms, 0};
    pthread_create(&l->threads[i], NULL, lane_main, &l->args[i]);
  }
}

static int lanes_join(lanes *l) {
  int taken = 0;
  for (int i = 0; i < l->n; i++) {
    pthread_join(l->threads[i], NULL);
    taken += l->args[i].taken;
  }
  return taken;
}

/* Runs the router with its lanes until `done` health counts are reached
 * (applied + rejected), then stops it; returns its health at the end. */
static cb_reply_router_health route_until(world *w, int lanes_count, uint64_t done) {
  cb_reply_router *r = new_router(w, lanes_count);
  lanes l;
  lanes_start(&l, r, 0);
  cb_err err;
  assert_int_equal(cb_engine_start(cb_reply_router_engine(r), &err), CB_OK);
  cb_reply_router_health h;
  for (int i = 0; i < 600; i++) {
    cb_reply_router_health_get(r, &h);
    if (h.applied + h.rejected >= done) break;
    usleep(20 * 1000);
  }
  cb_engine_stop(cb_reply_router_engine(r));
  assert_int_equal(cb_engine_wait(cb_reply_router_engine(r), 30000), 1);
  lanes_join(&l);
  cb_reply_router_health_get(r, &h);
  cb_reply_router_free(r);
  return h;
}

/* ---- tests ------------------------------------------------------------------------- */

/* Takes exactly n replies from the lane (they may arrive in several takes). */
static void take_exactly(cb_reply_router *r, int lane, cb_reply **replies, int n) {
  int got = 0;
  for (int i = 0; i < 500 && got < n; i++) {
    int ended;
    got += cb_reply_router_take_many(r, lane, replies + got, n - got, 20, &ended);
    assert_false(ended);
  }
  assert_int_equal(got, n);
}

static void stop_and_free(cb_reply_router *r) {
  cb_engine_stop(cb_reply_router_engine(r));
  assert_int_equal(cb_engine_wait(cb_reply_router_engine(r), 30000), 1);
  int ended;
  cb_reply *none[1];
  assert_int_equal(cb_reply_router_take_many(r, 0, none, 1, 0, &ended), 0);
  assert_true(ended);
  cb_reply_router_free(r);
}

static void a_reply_moves_its_process_and_sends_the_next_command(void **state) {
  world w;
  world_open(&w, "crr_apply");
  enum { N = 3 };
  char pid[N][CB_UUID_LEN + 1], cid[N][CB_UUID_LEN + 1];
  for (int i = 0; i < N; i++) {
    start_process(&w, pid[i], cid[i]);
    send_reply(&w, pid[i], cid[i]);
  }
  cb_reply_router *r = new_router(&w, 1);
  cb_err err;
  assert_int_equal(cb_engine_start(cb_reply_router_engine(r), &err), CB_OK);
  cb_reply *replies[N];
  take_exactly(r, 0, replies, N);
  cb_reply_decision decisions[N];
  for (int i = 0; i < N; i++) decisions[i] = decide(replies[i]);
  assert_int_equal(cb_reply_router_apply_many(r, replies, decisions, N, &err), CB_OK);
  cb_reply_router_health h;
  cb_reply_router_health_get(r, &h);
  assert_int_equal(h.applied, N);
  assert_int_equal(h.rejected, 0);
  assert_int_equal(h.failures, 0);
  assert_int_equal(h.in_flight, 0);
  stop_and_free(r);
  /* One transaction moved them all. */
  const char *dp[] = {w.domain};
  assert_int_equal(query_int(&w, "SELECT count(DISTINCT xmin::text) FROM commandbus.process WHERE domain = $1", 1, dp),
                   1);
  for (int i = 0; i < N; i++) {
    process_is(&w, pid[i], "WAITING", "charge");
    const char *p[] = {w.domain, pid[i]};
    /* The reply is recorded on its step, and the next step is audited with
     * the command it sent (correlated to the process, replying to its queue). */
    assert_int_equal(query_int(&w,
                               "SELECT count(*) FROM commandbus.process_audit WHERE domain = $1"
                               " AND process_id = $2::uuid AND step_name = 'reserve' AND reply_outcome = 'SUCCESS'"
                               " AND reply_data->>'outcome' = 'SUCCESS'",
                               2, p),
                     1);
    assert_int_equal(query_int(&w,
                               "SELECT count(*) FROM commandbus.process_audit pa JOIN commandbus.command c"
                               " ON c.domain = pa.domain AND c.command_id = pa.command_id"
                               " WHERE pa.domain = $1 AND pa.process_id = $2::uuid AND pa.step_name = 'charge'"
                               " AND pa.command_type = 'Charge' AND pa.reply_outcome IS NULL"
                               " AND c.command_type = 'Charge' AND c.correlation_id = $2::uuid"
                               " AND c.reply_queue = $1 || '__process_replies' AND pa.command_data->>'amount' = '5'",
                               2, p),
                     1);
    assert_int_equal(query_int(&w,
                               "SELECT count(*) FROM commandbus.process WHERE domain = $1 AND process_id = $2::uuid"
                               " AND state->>'reserved' = 'true'",
                               2, p),
                     1);
  }
  assert_int_equal(commands_of_type(&w, "Charge"), N);
  assert_int_equal(queue_length(&w, w.replies), 0);
  assert_int_equal(queue_length(&w, w.commands), 2 * N); /* Reserve (nobody ran them) and Charge */
  world_close(&w);
}

static void a_reply_for_an_unknown_process_is_archived(void **state) {
  world w;
  world_open(&w, "crr_unknown");
  cb_err err;
  assert_int_equal(cb_bus_ensure_queue(w.rt, w.replies, &err), CB_OK);
  char stranger[CB_UUID_LEN + 1], command[CB_UUID_LEN + 1];
  cb_uuid_v7(stranger);
  cb_uuid_v7(command);
  send_reply(&w, stranger, command);
  cb_reply_router_health h = route_until(&w, 1, 1);
  assert_int_equal(h.rejected, 1);
  assert_int_equal(h.applied, 0);
  assert_int_equal(queue_length(&w, w.replies), 0);
  assert_int_equal(archived(&w), 1);
  assert_int_equal(commands_of_type(&w, "Charge"), 0);
  world_close(&w);
}

static void a_duplicate_reply_is_applied_once(void **state) {
  world w;
  world_open(&w, "crr_dup");
  char pid[CB_UUID_LEN + 1], cid[CB_UUID_LEN + 1];
  start_process(&w, pid, cid);
  send_reply(&w, pid, cid);
  send_reply(&w, pid, cid); /* a worker's redelivery answered twice */

  /* Both in one batch: one process twice, so the second goes in a later
   * transaction, where the guard finds it applied and archives it. */
  cb_reply_router *r = new_router(&w, 1);
  cb_err err;
  assert_int_equal(cb_engine_start(cb_reply_router_engine(r), &err), CB_OK);
  cb_reply *replies[2];
  take_exactly(r, 0, replies, 2);
  cb_reply_decision decisions[2] = {decide(replies[0]), decide(replies[1])};
  assert_int_equal(cb_reply_router_apply_many(r, replies, decisions, 2, &err), CB_ESTATE);
  cb_reply_router_health h;
  cb_reply_router_health_get(r, &h);
  assert_int_equal(h.applied, 1);
  assert_int_equal(h.rejected, 1);
  assert_int_equal(h.in_flight, 0);
  stop_and_free(r);

  process_is(&w, pid, "WAITING", "charge");
  assert_int_equal(commands_of_type(&w, "Charge"), 1);
  const char *p[] = {w.domain, pid};
  assert_int_equal(query_int(&w,
                             "SELECT count(*) FROM commandbus.process_audit WHERE domain = $1"
                             " AND process_id = $2::uuid",
                             2, p),
                   2);
  assert_int_equal(queue_length(&w, w.replies), 0);
  assert_int_equal(archived(&w), 1);

  /* A third copy arriving later is archived when fetched: it changes nothing. */
  send_reply(&w, pid, cid);
  h = route_until(&w, 1, 1);
  assert_int_equal(h.rejected, 1);
  assert_int_equal(h.applied, 0);
  process_is(&w, pid, "WAITING", "charge");
  assert_int_equal(commands_of_type(&w, "Charge"), 1);
  world_close(&w);
}

static void a_batch_holding_a_reply_applied_before_still_applies_the_others(void **state) {
  world w;
  world_open(&w, "crr_fallback");
  enum { N = 5, STALE = 2 };
  char pid[N][CB_UUID_LEN + 1], cid[N][CB_UUID_LEN + 1];
  for (int i = 0; i < N; i++) {
    start_process(&w, pid[i], cid[i]);
    send_reply(&w, pid[i], cid[i]);
  }
  cb_reply_router *r = new_router(&w, 1);
  cb_err err;
  assert_int_equal(cb_engine_start(cb_reply_router_engine(r), &err), CB_OK);
  cb_reply *replies[N];
  take_exactly(r, 0, replies, N);
  /* Meanwhile another router applied one of them. */
  int stale = -1;
  for (int i = 0; i < N; i++)
    if (strcmp(replies[i]->process_id, pid[STALE]) == 0) stale = i;
  assert_true(stale >= 0);
  const char *p[] = {w.domain, cid[STALE]};
  run_sql(&w,
          "UPDATE commandbus.process_audit SET reply_outcome = 'SUCCESS' WHERE domain = $1"
          " AND command_id = $2::uuid",
          2, p);

  cb_reply_decision decisions[N];
  for (int i = 0; i < N; i++) decisions[i] = decide(replies[i]);
  assert_int_equal(cb_reply_router_apply_many(r, replies, decisions, N, &err), CB_ESTATE);
  cb_reply_router_health h;
  cb_reply_router_health_get(r, &h);
  assert_int_equal(h.applied, N - 1);
  assert_int_equal(h.rejected, 1);
  assert_int_equal(h.failures, 0);
  assert_int_equal(h.in_flight, 0);
  stop_and_free(r);

  for (int i = 0; i < N; i++) process_is(&w, pid[i], "WAITING", i == STALE ? "reserve" : "charge");
  assert_int_equal(commands_of_type(&w, "Charge"), N - 1);
  assert_int_equal(queue_length(&w, w.replies), 0);
  assert_int_equal(archived(&w), 1);
  world_close(&w);
}

static void stop_drains_in_flight_replies_before_wait_returns(void **state) {
  world w;
  world_open(&w, "crr_drain");
  enum { N = 6 };
  char pid[N][CB_UUID_LEN + 1], cid[N][CB_UUID_LEN + 1];
  for (int i = 0; i < N; i++) {
    start_process(&w, pid[i], cid[i]);
    send_reply(&w, pid[i], cid[i]);
  }
  cb_reply_router *r = new_router(&w, 2);
  lanes l;
  lanes_start(&l, r, 300); /* each batch takes 0.3 s to decide */
  cb_err err;
  assert_int_equal(cb_engine_start(cb_reply_router_engine(r), &err), CB_OK);
  cb_reply_router_health h;
  for (int i = 0; i < 1000; i++) {
    cb_reply_router_health_get(r, &h);
    if (h.in_flight == N) break;
    usleep(5 * 1000);
  }
  assert_int_equal(h.in_flight, N); /* all fetched, none applied yet */
  cb_engine_stop(cb_reply_router_engine(r));
  assert_int_equal(cb_engine_wait(cb_reply_router_engine(r), 30000), 1);
  /* Nothing held when wait returns: every reply taken was applied. */
  cb_reply_router_health_get(r, &h);
  assert_int_equal(h.in_flight, 0);
  assert_int_equal(h.applied, N);
  assert_string_equal(h.state, "stopped");
  assert_int_equal(lanes_join(&l), N);
  cb_reply_router_free(r);
  for (int i = 0; i < N; i++) process_is(&w, pid[i], "WAITING", "charge");
  assert_int_equal(queue_length(&w, w.replies), 0);
  world_close(&w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(a_reply_moves_its_process_and_sends_the_next_command),
      cmocka_unit_test(a_reply_for_an_unknown_process_is_archived),
      cmocka_unit_test(a_duplicate_reply_is_applied_once),
      cmocka_unit_test(a_batch_holding_a_reply_applied_before_still_applies_the_others),
      cmocka_unit_test(stop_drains_in_flight_replies_before_wait_returns),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
