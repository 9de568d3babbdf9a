/* commandbus: the engine of a runner (see engine.h). */
#include "engine_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "commandbus/log.h"
#include "keyed.h"

static const char *state_names[] = {"starting", "running", "stopping", "stopped"};

static void set_state(cb_engine *e, int state) {
  pthread_mutex_lock(&e->lock);
  e->state = state;
  pthread_cond_broadcast(&e->changed);
  pthread_mutex_unlock(&e->lock);
}

const char *cb_engine_state_name(const cb_engine *e) { return state_names[e->state]; }
int cb_engine_lanes(const cb_engine *e) { return e->c.lanes; }
const char *cb_engine_domain(const cb_engine *e) { return e->c.domain; }

static void report(void *self, cb_runner_stat *stat) {
  cb_engine *e = self;
  pthread_mutex_lock(&e->lock);
  snprintf(stat->state, sizeof stat->state, "%s", state_names[e->state]);
  pthread_mutex_unlock(&e->lock);
  e->c.ops->report(e->c.owner, stat);
}

void cb_engine_report(cb_engine *e, cb_runner_stat *stat) {
  memset(stat, 0, sizeof *stat);
  snprintf(stat->kind, sizeof stat->kind, "%s", e->c.kind);
  snprintf(stat->domain, sizeof stat->domain, "%s", e->c.domain);
  stat->lanes = e->c.lanes;
  report(e, stat);
}

static void stop_runner(void *self) { cb_engine_stop(self); }

int cb_engine_init(cb_engine *e, cb_runtime *rt, const cb_engine_config *c, cb_err *err) {
  memset(e, 0, sizeof *e);
  e->rt = rt;
  e->c = *c;
  e->watch_id = -1;
  e->state = CB_ENGINE_STARTING;
  pthread_mutex_init(&e->lock, NULL);
  pthread_cond_init(&e->changed, NULL);
  e->ready = 1;
  cb_queue_channel(c->queue, e->channel);
  e->runner.kind = c->kind;
  e->runner.domain = c->domain;
  e->runner.lanes = c->lanes;
  e->runner.report = report;
  e->runner.stop = stop_runner;
  e->runner.self = e;
  cb_message_router_config cfg;
  cb_message_router_config_init(&cfg);
  cfg.lanes = c->lanes;
  cfg.batch_size = 16;
  cfg.batch_timeout_ms = 0; /* hand work over at once: fetches are batches already */
  cfg.policy = CB_MESSAGE_ROUTER_BLOCK;
  cfg.block_timeout_ms = -1; /* never drop what was received */
  cfg.ingress_capacity = (size_t)c->capacity + 64;
  cfg.lane_capacity = (size_t)c->capacity + 1;
  if (cb_message_router_new(&e->router, &cfg) != 0) return cb_err_set(err, CB_ENOMEM, "out of memory");
  e->runner.router = e->router;
  return cb_runtime_listen(rt, e->channel, err);
}

/* ---- fetching (loop) ------------------------------------------------------------ */

/* A fetch of its own on its way (fetch_one); `u` once it came back. */
typedef struct engine_fetch {
  cb_engine *e;
  cb_unit *u;
  int index, room;
  unsigned seq;
} engine_fetch;

static int max_fetches(const cb_engine *e) {
  int n = e->c.max_fetches;
  return n < 1 ? 1 : n > CB_ENGINE_MAX_FETCHES ? CB_ENGINE_MAX_FETCHES : n;
}

int cb_engine_room(cb_engine *e) {
  if (e->drained || e->stop_seen || e->finished || e->riding) return 0;
  /* A second fetch only while the queue is known to hold more than one
   * reads: after a notification or a poll, one fetch finds out. */
  if (e->fetching >= (e->last_full ? max_fetches(e) : 1)) return 0;
  return e->c.ops->room(e->c.owner);
}

static int add_fetch(cb_engine *e, cb_unit *u, int room, int *index) {
  int i = e->c.ops->add_fetch(e->c.owner, u, room);
  if (i < 0) return i;
  *index = i;
  e->fetching++;
  e->fetch_asked += room;
  e->fetch_seq++;
  e->wake_pending = 0; /* this fetch runs after the notification: it sees what was sent */
  return CB_OK;
}

int cb_engine_fetch_into(cb_engine *e, cb_unit *u, int *index) {
  *index = -1;
  if (e->fetching) return CB_OK; /* riding fetches go alone: no order to keep */
  int room = cb_engine_room(e);
  if (room <= 0) return CB_OK;
  int rc = add_fetch(e, u, room, index);
  if (rc == CB_OK) {
    e->riding = 1;
    e->riding_room = room;
  }
  return rc;
}

void cb_engine_fetch_cancel(cb_engine *e) {
  e->fetching--;
  e->fetch_asked -= e->riding_room;
  e->riding = 0;
}

/* A fetch came back: hands its rows to the owner (or logs the failure); 1
 * when there may be more to fetch. `newest`: no fetch was built after it. */
static int fetch_came_back(cb_engine *e, cb_unit *u, int index, int room, int newest) {
  e->fetching--;
  e->fetch_asked -= room;
  if (cb_unit_status(u) != CB_OK) {
    const cb_err *err = cb_unit_error(u);
    if (!e->fetch_failing) /* once per outage, not once per poll */
      cb_log(CB_LOG_WARN, "%s %s: fetch failed (%s: %s); retrying at each poll", e->c.name, e->c.domain,
             cb_strerror(err->code), err->message);
    e->fetch_failing = 1;
    e->drained = 0;
    e->last_full = 0;
    return 0; /* next try at the poll, not at once */
  }
  if (e->fetch_failing) cb_log(CB_LOG_INFO, "%s %s: fetching again", e->c.name, e->c.domain);
  e->fetch_failing = 0;
  e->fetch_room = room;
  e->c.ops->fetched(e->c.owner, u, index);
  /* Fewer rows than it asked for: it took what the queue held (when it
   * read). A fetch built after it read later and has the last word. */
  e->last_full = cb_result_rows(cb_unit_result(u, index)) >= room;
  int more = e->last_full || e->wake_pending;
  if (newest || more) e->drained = !more;
  return more;
}

int cb_engine_fetched(cb_engine *e, cb_unit *u, int index) {
  e->riding = 0;
  return fetch_came_back(e, u, index, e->riding_room, 1);
}

static void on_fetched(cb_unit *u, void *arg) {
  engine_fetch *f = arg;
  cb_engine *e = f->e;
  f->u = u;
  int more = 0;
  /* The oldest first: a later one that came back first waits for it. */
  while (e->nown > 0 && e->own[0]->u) {
    engine_fetch *first = e->own[0];
    e->nown--;
    memmove(e->own, e->own + 1, (size_t)e->nown * sizeof *e->own);
    more |= fetch_came_back(e, first->u, first->index, first->room, first->seq == e->fetch_seq);
    cb_unit_free(first->u);
    free(first);
  }
  if (more) cb_engine_fetch(e);
  cb_engine_check(e);
}

/* Sends one fetch of its own; 0 when none could go. */
static int fetch_one(cb_engine *e) {
  int room = cb_engine_room(e);
  if (room <= 0) return 0;
  cb_unit *u = cb_unit_new();
  engine_fetch *f = malloc(sizeof *f);
  int index;
  if (u == NULL || f == NULL || cb_add_keyed_begin(u, e->c.statement_timeout) < 0 ||
      add_fetch(e, u, room, &index) != CB_OK) {
    cb_unit_free(u);
    free(f);
    return 0;
  }
  *f = (engine_fetch){.e = e, .u = NULL, .index = index, .room = room, .seq = e->fetch_seq};
  e->own[e->nown++] = f;
  cb_unit_on_done(u, on_fetched, f);
  if (cb_runtime_submit(e->rt, &u, 1) != CB_OK) {
    e->nown--;
    e->fetching--;
    e->fetch_asked -= room;
    free(f);
    cb_unit_free(u);
    return 0;
  }
  return 1;
}

void cb_engine_fetch(cb_engine *e) {
  while (fetch_one(e)) continue;
}

static void free_item(const cb_engine *e, void *item) {
  if (e->c.ops->free_item) e->c.ops->free_item(item);
  else free(item);
}

void cb_engine_route(cb_engine *e, cb_message_router_entry *entries, int n) {
  if (n <= 0) return;
  e->in_flight += n;
  long routed = cb_message_router_route_many(e->router, entries, (size_t)n);
  for (long i = routed < 0 ? 0 : routed; i < n; i++) { /* only when stopping: redelivered later */
    free_item(e, entries[i].item);
    e->in_flight--;
  }
}

typedef struct pending_write {
  cb_engine *e;
  const char *what, *then;
} pending_write;

static void on_written(cb_unit *u, void *arg) {
  pending_write *wr = arg;
  cb_engine *e = wr->e;
  e->writes--;
  if (cb_unit_status(u) != CB_OK) {
    const cb_err *err = cb_unit_error(u);
    cb_log(CB_LOG_WARN, "%s %s: %s failed (%s: %s); %s", e->c.name, e->c.domain, wr->what, cb_strerror(err->code),
           err->message, wr->then);
  }
  free(wr);
  cb_unit_free(u);
  cb_engine_check(e);
}

void cb_engine_write(cb_engine *e, cb_unit *u, const char *what, const char *then) {
  pending_write *wr = malloc(sizeof *wr);
  if (wr == NULL) {
    cb_log(CB_LOG_WARN, "%s %s: %s failed (out of memory); %s", e->c.name, e->c.domain, what, then);
    cb_unit_free(u);
    return;
  }
  *wr = (pending_write){e, what, then};
  cb_unit_on_done(u, on_written, wr);
  e->writes++;
  if (cb_runtime_submit(e->rt, &u, 1) != CB_OK) {
    e->writes--;
    free(wr);
    cb_unit_free(u);
  }
}

static void on_poll(uv_timer_t *t) {
  cb_engine *e = t->data;
  e->drained = 0; /* redeliveries and delays that ran out notify nobody */
  if (e->c.ops->polled) e->c.ops->polled(e->c.owner);
  cb_engine_fetch(e);
}

/* A send committed. A fetch on its way may have read the queue before it:
 * the notification is kept (wake_pending) until a fetch built after it has
 * run, so that the message never waits for the next poll. */
static void on_notified(void *arg) {
  cb_engine *e = arg;
  e->wake_pending = 1;
  e->drained = 0;
  cb_engine_fetch(e);
}

static uint64_t poll_ms(const cb_engine *e) {
  uint64_t ms = (uint64_t)(e->c.poll_interval * 1000);
  return ms ? ms : 1;
}

void cb_engine_poll_in(cb_engine *e, uint64_t ms) {
  if (!e->timer_open || e->stop_seen || uv_timer_get_due_in(&e->poll_timer) <= ms) return;
  uv_timer_start(&e->poll_timer, on_poll, ms, poll_ms(e));
}

/* ---- handed back (any thread, then the loop) ------------------------------------------ */

static void on_wake(cb_runtime *rt, void *arg) {
  (void)rt;
  cb_engine *e = arg;
  pthread_mutex_lock(&e->lock);
  e->wake_scheduled = 0;
  int n = e->handed_back;
  e->handed_back = 0;
  pthread_mutex_unlock(&e->lock);
  e->in_flight -= n;
  if (e->c.ops->collect) e->c.ops->collect(e->c.owner);
  cb_engine_fetch(e);
  cb_engine_check(e);
}

int cb_engine_hand_back(cb_engine *e, int n) {
  e->handed_back += n;
  int first = !e->wake_scheduled;
  e->wake_scheduled = 1;
  return first;
}

void cb_engine_wake_now(cb_engine *e) {
  if (cb_runtime_call(e->rt, on_wake, e) != CB_OK) {
    pthread_mutex_lock(&e->lock);
    e->wake_scheduled = 0;
    pthread_mutex_unlock(&e->lock);
  }
}

int cb_engine_take(cb_engine *e, int lane, void **items, int max, int timeout_ms) {
  int n = cb_message_router_take(e->router, lane, items, (size_t)max, timeout_ms);
  if (n == CB_MESSAGE_ROUTER_END) return -1;
  if (n <= 0) {
    if (cb_runtime_is_closed(e->rt)) cb_engine_stop(e); /* the bus was closed under the runner */
    return 0;
  }
  return n;
}

/* ---- start, stop and finish -------------------------------------------------------- */

/* The engine's handles live inside its owner: the owner may be freed only
 * once libuv has finished closing them, so STOPPED is announced by the last
 * close callback. */
static void closed_one(cb_engine *e) {
  if (--e->handles_closing == 0) {
    cb_log(CB_LOG_INFO, "%s %s: stopped", e->c.name, e->c.domain);
    cb_runner_stopped(&e->runner); /* before a waiter may see STOPPED and free the owner */
    set_state(e, CB_ENGINE_STOPPED);
  }
}

static void on_handle_closed(uv_handle_t *h) { closed_one(h->data); }

void cb_engine_close_handle(cb_engine *e, uv_handle_t *h) {
  e->handles_closing++;
  h->data = e;
  uv_close(h, on_handle_closed);
}

void cb_engine_check(cb_engine *e) {
  const cb_engine_ops *ops = e->c.ops;
  if (!e->stop_seen || e->finished || e->fetching || e->in_flight > 0 || e->writes > 0 ||
      (ops->busy && ops->busy(e->c.owner)))
    return;
  e->finished = 1;
  if (e->watch_id >= 0) cb_runtime_unwatch(e->rt, e->watch_id);
  e->watch_id = -1;
  cb_message_router_stop(e->router); /* lanes are empty: they end at once */
  e->handles_closing = 1;            /* held until every close below is issued */
  if (e->timer_open) {
    cb_engine_close_handle(e, (uv_handle_t *)&e->poll_timer);
    e->timer_open = 0;
  }
  if (ops->finishing) ops->finishing(e->c.owner);
  closed_one(e); /* drops the hold */
}

static void stop_on_loop(cb_runtime *rt, void *arg) {
  (void)rt;
  cb_engine *e = arg;
  if (e->stop_seen) return;
  e->stop_seen = 1;
  if (e->timer_open) uv_timer_stop(&e->poll_timer);
  if (e->c.ops->stopping) e->c.ops->stopping(e->c.owner);
  cb_engine_check(e);
}

static void start_on_loop(cb_runtime *rt, void *arg) {
  cb_engine *e = arg;
  uv_loop_t *loop = cb_runtime_loop(rt);
  uv_timer_init(loop, &e->poll_timer);
  e->poll_timer.data = e;
  e->timer_open = 1;
  uv_timer_start(&e->poll_timer, on_poll, poll_ms(e), poll_ms(e));
  e->watch_id = cb_runtime_watch(rt, e->channel, on_notified, e);
  if (e->c.ops->started) e->c.ops->started(e->c.owner, loop);
  set_state(e, CB_ENGINE_RUNNING);
  cb_err err;
  if (cb_runner_start(rt, &e->runner, &err) != CB_OK) /* only signals can fail, and only when closing */
    cb_log(CB_LOG_WARN, "%s %s: %s", e->c.name, e->c.domain, err.message);
  cb_log(CB_LOG_INFO, "%s %s: running with %d lane(s) on %s, visibility timeout %g s", e->c.name, e->c.domain,
         e->c.lanes, e->c.queue, e->c.visibility_timeout);
  cb_engine_fetch(e);
  /* A stop requested before this ran is honoured now. */
  pthread_mutex_lock(&e->lock);
  int stop = e->stop_requested;
  pthread_mutex_unlock(&e->lock);
  if (stop) stop_on_loop(rt, e);
}

void cb_engine_watch_signals(cb_engine *e) { e->runner.stop_on_signals = 1; }

int cb_engine_start(cb_engine *e, cb_err *err) {
  pthread_mutex_lock(&e->lock);
  e->started = 1;
  pthread_mutex_unlock(&e->lock);
  if (cb_message_router_start(e->router) != 0)
    return cb_err_set(err, CB_ESTATE, "the %s was already started or stopped", e->c.name);
  int rc = cb_runtime_call(e->rt, start_on_loop, e);
  if (rc != CB_OK) {
    cb_message_router_stop(e->router);
    set_state(e, CB_ENGINE_STOPPED);
    return cb_err_set(err, rc, "the bus is closed");
  }
  return CB_OK;
}

void cb_engine_stop(cb_engine *e) {
  pthread_mutex_lock(&e->lock);
  int first = !e->stop_requested;
  e->stop_requested = 1;
  if (e->state == CB_ENGINE_RUNNING) e->state = CB_ENGINE_STOPPING;
  int started = e->started;
  pthread_mutex_unlock(&e->lock);
  /* Never started: nothing on the loop thread to drain (and nothing to
   * call there: the owner may be freed at once); the lanes end now. With
   * the runtime closed there is no loop to drain through: end the
   * lanes now (their leftover work is freed with the owner). */
  if (!started || cb_runtime_is_closed(e->rt) || (first && cb_runtime_call(e->rt, stop_on_loop, e) != CB_OK)) {
    cb_message_router_stop(e->router);
    set_state(e, CB_ENGINE_STOPPED);
  }
}

int cb_engine_wait(cb_engine *e, int timeout_ms) {
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  pthread_mutex_lock(&e->lock);
  while (e->state != CB_ENGINE_STOPPED) {
    /* Short waits (a runtime closed under the runner is noticed), never
     * past the caller's timeout: run()'s tick comes every tick_interval. */
    long slice_ms = 100;
    if (timeout_ms >= 0) {
      struct timespec now;
      clock_gettime(CLOCK_MONOTONIC, &now);
      long left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
      if (left <= 0) break;
      if (left < slice_ms) slice_ms = left;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += slice_ms * 1000000L;
    if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
    pthread_cond_timedwait(&e->changed, &e->lock, &ts);
    if (e->state == CB_ENGINE_STOPPED) break;
    if (cb_runtime_is_closed(e->rt)) {
      pthread_mutex_unlock(&e->lock);
      cb_message_router_stop(e->router);
      set_state(e, CB_ENGINE_STOPPED);
      return 1;
    }
  }
  int stopped = e->state == CB_ENGINE_STOPPED;
  pthread_mutex_unlock(&e->lock);
  return stopped;
}

void cb_engine_destroy(cb_engine *e) {
  if (!e->ready) return;
  if (e->router) {
    pthread_mutex_lock(&e->lock);
    int running = e->started && e->state != CB_ENGINE_STOPPED;
    pthread_mutex_unlock(&e->lock);
    if (running) { /* the loop thread may still hold it: stop, and wait for the end */
      cb_engine_stop(e);
      cb_engine_wait(e, -1);
    }
    cb_runner_remove(&e->runner); /* its last row says how it ended */
    cb_message_router_stop(e->router);
    /* Items still queued in lanes (never taken) are the owner's to free. */
    for (int lane = 0; lane < e->c.lanes; lane++) {
      void *items[64];
      int n;
      while ((n = cb_message_router_take(e->router, lane, items, 64, 0)) > 0)
        for (int i = 0; i < n; i++) free_item(e, items[i]);
    }
    cb_message_router_free(e->router);
    e->router = NULL;
  }
  pthread_cond_destroy(&e->changed);
  pthread_mutex_destroy(&e->lock);
  e->ready = 0;
}
