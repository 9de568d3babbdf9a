/* commandbus: the worker's fetch (see worker_internal.h), on the loop
 * thread. One statement receives a batch: it reads the messages and marks
 * their commands received; the rows become works routed to lanes (keyed by
 * correlation id, else command id, so that related commands keep their
 * order on one lane), and poison messages are set aside. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "commandbus/bus.h"
#include "commandbus/limits.h"
#include "commandbus/log.h"
#include "keyed.h"
#include "worker_internal.h"

/* How many works may wait for lanes: enough for each lane to keep busy for a
 * quarter of the visibility timeout at the handlers' measured pace (fast
 * handlers: large batches, few transactions), never fewer than two per lane.
 * A work that still waits too long is not run (see cb_worker_take). */
static int capacity(cb_worker *w) {
  pthread_mutex_lock(&w->engine.lock);
  double avg = w->avg_handler_s;
  pthread_mutex_unlock(&w->engine.lock);
  double per_lane = 2;
  if (avg > 0) {
    per_lane = 0.25 * w->o.visibility_timeout / avg;
    if (per_lane < 2) per_lane = 2;
    if (per_lane > 256) per_lane = 256;
  }
  double c = per_lane * w->lanes;
  if (c > 4 * FETCH_MAX) c = 4 * FETCH_MAX;
  return (int)c;
}

int cb__worker_room(void *arg) {
  cb_worker *w = arg;
  w->capacity = capacity(w);
  /* What fetches on their way will bring counts as taken already. */
  int in_flight = w->engine.in_flight + w->engine.fetch_asked;
  int room = w->capacity - in_flight;
  if (room <= 0) return 0;
  /* Batches of at least a few, so that a busy queue is read in bulk. */
  if (in_flight > 0 && room < w->capacity / 4 && room < FETCH_MAX / 4) return 0;
  return room > FETCH_MAX ? FETCH_MAX : room;
}

/* The lock of the domain's limits, then the receive statement for `room`
 * commands; returns the receive's index (the lock's is one less). */
int cb__worker_add_fetch(void *arg, cb_unit *u, int room) {
  cb_worker *w = arg;
  char qty[16], vt[32], from[24];
  snprintf(qty, sizeof qty, "%d", room);
  snprintf(vt, sizeof vt, "%.3f", w->o.visibility_timeout);
  snprintf(from, sizeof from, "%lld", w->full_scan_due ? 0LL : (long long)w->scan_from);
  w->full_scan_due = 0;
  const char *params[] = {qty, vt, w->domain, from};
  /* The receive statement's plan is made once per connection: left to
   * choose, PostgreSQL plans it again for every execution (its generic cost
   * guesses lose to the custom plan's), which measured 4 ms a fetch, a
   * quarter of the statement's time. The generic plan is the same key
   * lookups (see worker_sql.c), with the parameters left open. The lock of
   * the limits makes the setting (plan_cache_mode), which only this
   * transaction's later statements see: nothing follows the receive but
   * its own reads.
   *
   * A domain that had no limits at the last fetch is read by the lean
   * statement, a third of the plan: executor start initialises every node
   * of a generic plan at each execution, and the limits' nodes were a good
   * part of a lone request's receive. It tests for limits itself, as the
   * full statement reads them, in its own snapshot: a limit set since the
   * last fetch stops it from receiving anything, and its sign row sends the
   * next fetch, at once, through the full statement. */
  if (cb_limits_add_lock(u, w->domain) < 0) return CB_ENOMEM;
  return cb_unit_add(u, w->limited ? w->receive_sql.data : w->lean_receive_sql.data, 4, params);
}

/* ---- poison ------------------------------------------------------------------------- */

static const char *poison_reason(const cb_result *r, int row) {
  const char *type = cb_result_value(r, row, 10);
  if (strcmp(type, "object") != 0) return "NOT_AN_OBJECT";
  if (cb_result_is_null(r, row, 11)) return "INVALID_COMMAND_ID";
  if (cb_result_is_null(r, row, 12)) return "UNKNOWN_COMMAND";
  const char *status = cb_result_value(r, row, 12);
  if (strcmp(status, "PENDING") == 0 || strcmp(status, "IN_PROGRESS") == 0) return "DUPLICATE_MESSAGE";
  return "COMMAND_ALREADY_DONE";
}

/* Adds row i, a message that names no command it may run, to the poison
 * list (JSON for cb__worker_sql_set_aside). */
static void add_poison(cb_worker *w, cb_strbuf *poison, const cb_result *r, int i) {
  const char *reason = poison_reason(r, i);
  const char *id = cb_result_is_null(r, i, 11) ? NULL : cb_result_value(r, i, 11);
  cb_log(CB_LOG_WARN, "worker %s: message %s set aside (%s)%s%s", w->domain, cb_result_value(r, i, 0), reason,
         id ? " for command " : "", id ? id : "");
  cb_strbuf_putc(poison, poison->len ? ',' : '[');
  cb_strbuf_printf(poison, "{\"msg\":%s,\"id\":%s%s%s,\"reason\":\"%s\"}", cb_result_value(r, i, 0), id ? "\"" : "",
                   id ? id : "null", id ? "\"" : "", reason);
}

/* Archives the poison messages (a JSON list) with an audit row each. */
static void set_aside(cb_worker *w, cb_strbuf *poison) {
  cb_unit *u = cb_unit_new();
  cb_strbuf sql = {0};
  cb__worker_sql_set_aside(&sql, w->queue);
  const char *params[] = {w->domain, poison->data, w->queue};
  if (u == NULL || sql.failed || poison->failed || cb_add_keyed_begin(u, w->o.statement_timeout) < 0 ||
      cb_unit_add(u, sql.data, 3, params) < 0) { /* they come back after the visibility timeout */
    cb_strbuf_free(&sql);
    cb_unit_free(u);
    return;
  }
  cb_strbuf_free(&sql);
  cb_engine_write(&w->engine, u, "setting messages aside", "they come back after the visibility timeout");
}

/* ---- the rows --------------------------------------------------------------------- */

/* Batches recently seen started need no refresh when more of their commands
 * arrive (a small ring: forgetting one only costs a cheap refresh). */
static int batch_seen_started(cb_worker *w, const char *batch_id) {
  for (int i = 0; i < STARTED_BATCHES; i++)
    if (strcmp(w->started_batches[i], batch_id) == 0) return 1;
  snprintf(w->started_batches[w->started_next], CB_UUID_LEN + 1, "%s", batch_id);
  w->started_next = (w->started_next + 1) % STARTED_BATCHES;
  return 0;
}

/* Limited command types that had no room wait for the next second's window:
 * the next poll comes just past the next whole second rather than at the
 * poll interval. */
static void poll_at_next_second(cb_worker *w) {
  double now = cb__worker_now();
  cb_engine_poll_in(&w->engine, (uint64_t)((floor(now) + 1 - now) * 1000) + 5);
}

/* Takes the rows of a completed receive statement (statement `index` of u):
 * sets poison aside, routes the rest to the lanes. Does not free u. */
void cb__worker_fetched(void *arg, cb_unit *u, int index) {
  cb_worker *w = arg;
  const cb_result *r = cb_unit_result(u, index);
  int rows = cb_result_rows(r);
  double fetched_at = cb__worker_now();
  cb_message_router_entry entries[4 * FETCH_MAX];
  int n = 0;
  int64_t lowest = 0; /* of priority 0 */
  cb_strbuf poison = {0};
  const char *batches[FETCH_MAX];
  size_t nbatches = 0;
  int limits_appeared = 0;
  for (int i = 0; i < rows; i++) {
    if (cb_result_is_null(r, i, 0)) { /* the lean receive's sign: it received nothing */
      limits_appeared = 1;
      continue;
    }
    int64_t msg_id = cb_result_int(r, i, 0);
    if (cb_result_int(r, i, 13) == 0 && (lowest == 0 || msg_id < lowest)) lowest = msg_id;
    if (cb_result_is_null(r, i, 2)) {
      add_poison(w, &poison, r, i);
      continue;
    }
    cb_work *work = cb__work_new(r, i);
    /* Awaiters in this process are not told of the receive (IN_PROGRESS):
     * an await returns only on a final state, as the trigger of
     * core/sql/009 tells other processes' awaiters only of those. */
    if (work == NULL) continue; /* redelivered after the visibility timeout */
    work->started_at = fetched_at;
    work->held = &w->held;
    __atomic_fetch_add(&w->held, 1, __ATOMIC_RELAXED);
    if (work->batch_id && nbatches < FETCH_MAX && !batch_seen_started(w, work->batch_id))
      batches[nbatches++] = work->batch_id;
    entries[n].key = work->correlation_id ? work->correlation_id : work->command_id;
    entries[n].len = strlen(entries[n].key);
    entries[n].item = work;
    n++;
  }
  if (poison.len) {
    cb_strbuf_putc(&poison, ']');
    pthread_mutex_lock(&w->engine.lock);
    w->health.poison += (uint64_t)(rows - n);
    pthread_mutex_unlock(&w->engine.lock);
    set_aside(w, &poison);
  }
  cb_strbuf_free(&poison);
  if (nbatches) cb__worker_refresh_batches(w, batches, nbatches); /* BATCH_STARTED */
  cb_engine_route(&w->engine, entries, n);
  if (lowest) w->scan_from = lowest;
  const cb_result *limits = cb_unit_result(u, index - 1);
  int limited = cb_result_rows(limits) > 0 && strcmp(cb_result_value(limits, 0, 1), "{}") != 0;
  w->limited = limited || limits_appeared;
  /* As a notification would: the engine fetches again when this one is back. */
  if (limits_appeared) w->engine.wake_pending = 1;
  else if (limited && rows < w->engine.fetch_room) poll_at_next_second(w);
}
