/* commandbus: the worker (see worker.h): its lifecycle and its lanes; the
 * fetch and the acknowledgements are in worker_fetch.c and worker_acks.c
 * (worker_internal.h tells who does what).
 *
 * Threads: the engine and the fields marked [loop] live on the runtime's
 * loop thread; lanes talk to it only through the message router (work in)
 * and the done list under the engine's lock (outcomes out). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commandbus/bus.h"
#include "commandbus/log.h"
#include "worker_internal.h"

/* ---- the engine's hooks (loop) ------------------------------------------------------- */

static void free_item(void *work) { cb__work_free(work); }

static int busy(void *arg) {
  cb_worker *w = arg;
  return w->rounds_in_flight > 0 || w->ack_head != NULL || w->upkeep_running;
}

static void on_stuck_check(uv_timer_t *t) {
  cb_worker *w = t->data;
  double now = cb__worker_now();
  pthread_mutex_lock(&w->engine.lock);
  for (int i = 0; i < w->lanes; i++) {
    cb_work *work = w->current[i];
    if (work && !work->stuck_reported && now - work->started_at > w->o.visibility_timeout + 5) {
      work->stuck_reported = 1;
      w->health.stuck++;
      cb_log(CB_LOG_WARN,
             "worker %s: handler for %s (command %s) on lane %d has run %.0f s, past the visibility timeout "
             "(%g s): stuck; its message may be redelivered to another worker",
             w->domain, work->command_type, work->command_id, i, now - work->started_at, w->o.visibility_timeout);
    }
  }
  pthread_mutex_unlock(&w->engine.lock);
}

static void started(void *arg, uv_loop_t *loop) {
  cb_worker *w = arg;
  uv_timer_init(loop, &w->stuck_timer);
  uv_timer_init(loop, &w->drain_timer);
  w->stuck_timer.data = w->drain_timer.data = w;
  w->timers_open = 1;
  uv_timer_start(&w->stuck_timer, on_stuck_check, 1000, 1000);
  w->upkeep_running = 1;
  cb_upkeep_start(w->upkeep);
}

static void on_drain_deadline(uv_timer_t *t) {
  cb_worker *w = t->data;
  cb_log(CB_LOG_WARN,
         "worker %s: drain timeout (%g s) passed with %d command(s) in flight; leaving them for "
         "redelivery",
         w->domain, w->o.drain_timeout, w->engine.in_flight);
  pthread_mutex_lock(&w->engine.lock);
  w->abandon = 1;
  pthread_mutex_unlock(&w->engine.lock);
  w->abandon_acks = 1;
  if (w->ack_head && w->rounds_in_flight == 0) { /* the database is still away */
    cb_log(CB_LOG_WARN, "worker %s: giving up outcomes that could not be recorded; they will be redelivered",
           w->domain);
    cb__work_list_free(w->ack_head);
    w->ack_head = w->ack_tail = NULL;
  }
  cb_message_router_stop(w->engine.router); /* lanes drop what they have not started */
  cb_engine_check(&w->engine);
}

static void on_upkeep_stopped(void *arg) {
  cb_worker *w = arg;
  w->upkeep_running = 0;
  cb_engine_check(&w->engine);
}

static void stopping(void *arg) {
  cb_worker *w = arg;
  if (w->upkeep_running) cb_upkeep_stop(w->upkeep, on_upkeep_stopped, w);
  if (w->timers_open) uv_timer_start(&w->drain_timer, on_drain_deadline, (uint64_t)(w->o.drain_timeout * 1000), 0);
  if (w->engine.in_flight || w->rounds_in_flight)
    cb_log(CB_LOG_INFO, "worker %s: stopping; waiting for %d command(s) in flight", w->domain, w->engine.in_flight);
}

static void finishing(void *arg) {
  cb_worker *w = arg;
  if (!w->timers_open) return;
  cb_engine_close_handle(&w->engine, (uv_handle_t *)&w->stuck_timer);
  cb_engine_close_handle(&w->engine, (uv_handle_t *)&w->drain_timer);
  w->timers_open = 0;
}

static void polled(void *arg) {
  cb_worker *w = arg;
  w->full_scan_due = 1;
  w->acks_held = 0; /* outcomes kept while the database was away: try again */
  cb__worker_flush_acks(w);
}

/* What metrics, heartbeats and health() see of the worker. */
static void report(void *w, cb_runner_stat *s) {
  cb_worker_health h;
  cb_worker_health_get(w, &h);
  s->in_flight = h.in_flight;
  s->successes = h.successes;
  s->failures = h.failures;
  s->retries = h.retries;
  s->consecutive_failures = h.consecutive_failures;
  s->stuck = h.stuck;
  s->poison = h.poison;
  s->last_success_at = h.last_success_at;
  _Static_assert(CB_RUNNER_REMOVED_KINDS == CB_RETENTION_KINDS, "a heartbeat carries every kind retention removes");
  cb_retention_counts_values(&h.upkeep.removed, s->removed);
  s->scheduled = h.upkeep.scheduled;
}

static const cb_engine_ops ops = {
    .room = cb__worker_room,
    .add_fetch = cb__worker_add_fetch,
    .fetched = cb__worker_fetched,
    .collect = cb__worker_collect,
    .busy = busy,
    .started = started,
    .stopping = stopping,
    .finishing = finishing,
    .polled = polled,
    .report = report,
    .free_item = free_item,
};

/* ---- options and lifecycle ------------------------------------------------------- */

void cb_worker_options_init(cb_worker_options *o) {
  memset(o, 0, sizeof *o);
  o->visibility_timeout = 30;
  o->statement_timeout = 25;
  o->poll_interval = 1;
  o->backoff[0] = 10;
  o->backoff[1] = 60;
  o->backoff[2] = 300;
  o->nbackoff = 3;
  o->drain_timeout = 30;
  o->retention = 1;
  o->retention_interval = 60;
  o->schedules = 1;
}

static int options_valid(const cb_worker_options *o, cb_err *err) {
  int rc = cb_domain_valid(o->domain, err);
  if (rc != CB_OK) return rc;
  if (o->visibility_timeout <= 0) return cb_err_set(err, CB_EINVAL, "visibility_timeout must be positive");
  if (o->statement_timeout <= 0) return cb_err_set(err, CB_EINVAL, "statement_timeout must be positive");
  if (o->statement_timeout >= o->visibility_timeout)
    return cb_err_set(err, CB_EINVAL,
                      "statement_timeout (%g s) must be shorter than visibility_timeout (%g s): otherwise a "
                      "slow acknowledgement could outlive the message's invisibility and the command run twice",
                      o->statement_timeout, o->visibility_timeout);
  if (o->poll_interval <= 0) return cb_err_set(err, CB_EINVAL, "poll_interval must be positive");
  if (o->nbackoff < 0 || o->nbackoff > CB_MAX_BACKOFF)
    return cb_err_set(err, CB_EINVAL, "backoff has %d entries; at most %d allowed", o->nbackoff, CB_MAX_BACKOFF);
  for (int i = 0; i < o->nbackoff; i++)
    if (o->backoff[i] < 0) return cb_err_set(err, CB_EINVAL, "backoff[%d] must not be negative", i + 1);
  return CB_OK;
}

int cb_worker_new(cb_runtime *rt, const cb_worker_options *opts, cb_worker **out, cb_err *err) {
  *out = NULL;
  int rc = options_valid(opts, err);
  if (rc != CB_OK) return rc;
  cb_worker *w = calloc(1, sizeof *w);
  if (w == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  w->rt = rt;
  w->o = *opts;
  snprintf(w->domain, sizeof w->domain, "%s", opts->domain);
  w->o.domain = w->domain;
  cb_command_queue_name(w->domain, w->queue);
  w->lanes = opts->lanes > 0 ? opts->lanes : cb_default_threads();
  if (w->lanes > CB_MESSAGE_ROUTER_MAX_LANES) w->lanes = CB_MESSAGE_ROUTER_MAX_LANES;
  w->capacity = w->lanes * 2;
  cb__worker_sql_receive(&w->receive_sql, w->queue, 1);
  cb__worker_sql_receive(&w->lean_receive_sql, w->queue, 0);
  w->limited = 1;
  cb_upkeep_options uo = {.retention = opts->retention,
                          .retention_interval = opts->retention_interval,
                          .schedules = opts->schedules,
                          .statement_timeout = opts->statement_timeout};
  w->upkeep = cb_upkeep_new(rt, w->domain, &uo);
  w->current = calloc((size_t)w->lanes, sizeof *w->current);
  w->buffers = calloc((size_t)w->lanes, sizeof *w->buffers);
  if (w->current == NULL || w->buffers == NULL || w->upkeep == NULL || w->receive_sql.failed ||
      w->lean_receive_sql.failed) {
    cb_worker_free(w);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  cb_engine_config c = {.kind = "worker",
                        .name = "worker",
                        .domain = w->domain,
                        .queue = w->queue,
                        .lanes = w->lanes,
                        .capacity = 4 * FETCH_MAX,
                        .max_fetches = FETCHES_IN_FLIGHT,
                        .visibility_timeout = opts->visibility_timeout,
                        .statement_timeout = opts->statement_timeout,
                        .poll_interval = opts->poll_interval,
                        .ops = &ops,
                        .owner = w};
  rc = cb_bus_ensure_command_queue(rt, w->domain, 1, err);
  if (rc == CB_OK) rc = cb_engine_init(&w->engine, rt, &c, err);
  if (rc != CB_OK) {
    cb_worker_free(w);
    return rc;
  }
  *out = w;
  return CB_OK;
}

cb_engine *cb_worker_engine(cb_worker *w) { return &w->engine; }

void cb_worker_free(cb_worker *w) {
  if (w == NULL) return;
  cb_engine_destroy(&w->engine);
  /* Works taken from the router that no lane started are ours to free. */
  for (int lane = 0; w->buffers && lane < w->lanes; lane++) {
    lane_buffer *b = &w->buffers[lane];
    for (int i = b->next; i < b->count; i++) cb__work_free(b->items[i]);
  }
  cb__work_list_free(w->done_head);
  cb__work_list_free(w->ack_head);
  free(w->current);
  free(w->buffers);
  cb_upkeep_free(w->upkeep);
  cb_strbuf_free(&w->receive_sql);
  cb_strbuf_free(&w->lean_receive_sql);
  for (int kind = 0; kind < ACK_KINDS; kind++) cb_strbuf_free(&w->ack_sql[kind]);
  free(w);
}

/* ---- lanes -------------------------------------------------------------------------- */

int cb_worker_take(cb_worker *w, int lane, cb_work **works, int max, int timeout_ms) {
  if (lane < 0 || lane >= w->lanes || max < 1) return -1;
  lane_buffer *b = &w->buffers[lane];
  if (b->next >= b->count) {
    b->next = b->count = 0;
    int n = cb_engine_take(&w->engine, lane, b->items, 64, timeout_ms);
    if (n <= 0) return n;
    b->count = n;
  }
  /* One at a time, so that `current` tells exactly which handler runs. */
  cb_work *work = b->items[b->next++];
  double now = cb__worker_now();
  pthread_mutex_lock(&w->engine.lock);
  /* Waited in the lane for most of its visibility timeout: another worker
   * may get it any moment, so running it here could run it twice. */
  int expired = now - work->started_at > 0.9 * w->o.visibility_timeout;
  int abandon = w->abandon || expired;
  if (expired)
    cb_log(CB_LOG_WARN, "worker %s: command %s waited %.0f s for a lane; leaving it for redelivery", w->domain,
           work->command_id, now - work->started_at);
  if (!abandon) {
    work->lane = lane;
    work->started_at = work->handler_started_at = now;
    w->current[lane] = work;
  }
  pthread_mutex_unlock(&w->engine.lock);
  if (abandon) { /* past the drain deadline: leave it for redelivery */
    work->outcome = CB_OUTCOME_NONE;
    cb_worker_done(w, work);
    return cb_worker_take(w, lane, works, max, 0);
  }
  works[0] = work;
  return 1;
}

/* Counts the outcome (the lock held). */
static void count_outcome(cb_worker *w, const cb_work *work) {
  if (work->outcome == CB_OUTCOME_NONE) return;
  if (w->current[work->lane] == work) w->current[work->lane] = NULL;
  double now = cb__worker_now();
  double took = now - work->handler_started_at; /* started_at is the stuck clock, which extensions move */
  w->avg_handler_s = w->avg_handler_s == 0 ? took : 0.9 * w->avg_handler_s + 0.1 * took;
  if (w->avg_handler_s < 1e-6) w->avg_handler_s = 1e-6;
  if (work->outcome == CB_OUTCOME_SUCCESS) {
    w->health.successes++;
    w->health.consecutive_failures = 0;
    w->health.last_success_at = now;
  } else {
    w->health.failures++;
    w->health.consecutive_failures++;
    if (work->outcome == CB_OUTCOME_TRANSIENT && work->attempt < work->max_attempts) w->health.retries++;
  }
}

void cb_worker_done(cb_worker *w, cb_work *work) {
  work->next = NULL;
  pthread_mutex_lock(&w->engine.lock);
  count_outcome(w, work);
  cb__work_list_append(&w->done_head, &w->done_tail, work);
  /* One wake-up per batch of outcomes: later ones join the list until the
   * loop takes it. */
  int wake = cb_engine_hand_back(&w->engine, 1);
  pthread_mutex_unlock(&w->engine.lock);
  if (wake) cb_engine_wake_now(&w->engine);
}

int cb_worker_extend_visibility(cb_worker *w, cb_work *work, double seconds, cb_err *err) {
  if (seconds <= 0) return cb_err_set(err, CB_EINVAL, "seconds must be positive");
  cb_messages m;
  int rc = cb_queue_set_vt(w->rt, w->queue, work->msg_id, seconds, &m, err);
  if (rc == CB_OK && m.count == 0) rc = cb_err_set(err, CB_ENOTFOUND, "message %lld is gone", (long long)work->msg_id);
  if (rc == CB_OK) {
    pthread_mutex_lock(&w->engine.lock);
    work->started_at = cb__worker_now() - w->o.visibility_timeout + seconds; /* stuck clock restarts */
    pthread_mutex_unlock(&w->engine.lock);
  }
  cb_messages_free(&m);
  return rc;
}

void cb_worker_health_get(cb_worker *w, cb_worker_health *h) {
  pthread_mutex_lock(&w->engine.lock);
  *h = w->health;
  h->state = cb_engine_state_name(&w->engine);
  pthread_mutex_unlock(&w->engine.lock);
  h->in_flight = cb_worker_in_flight(w);
  h->held = __atomic_load_n(&w->held, __ATOMIC_RELAXED);
  cb_upkeep_stats_get(w->upkeep, &h->upkeep);
}

int cb_worker_in_flight(cb_worker *w) {
  /* Read without the loop: an estimate for monitoring (lanes' current). */
  pthread_mutex_lock(&w->engine.lock);
  int n = 0;
  for (int i = 0; i < w->lanes; i++) n += w->current[i] != NULL;
  pthread_mutex_unlock(&w->engine.lock);
  return n;
}
