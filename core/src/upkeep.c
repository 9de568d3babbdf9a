/* commandbus: a domain's background jobs (see upkeep.h). One timer ticks
 * every TICK_MS; at each tick a job that is due and not already waiting for
 * its transaction submits one. */
#include "commandbus/upkeep.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "commandbus/bus.h"
#include "commandbus/log.h"
#include "commandbus/queue.h"
#include "commandbus/schedule.h"
#include "keyed.h"

#define TICK_MS 50         /* a retention pass goes on at most this long after a full batch */
#define SCHEDULE_EVERY 1.0 /* seconds between schedule passes */
#define MAX_QUEUES 3

struct cb_upkeep {
  cb_runtime *rt;
  cb_upkeep_options o;
  char domain[CB_QUEUE_NAME_MAX + 1];
  char queue[CB_QUEUE_NAME_MAX + 1];

  /* [loop] */
  uv_timer_t timer;
  int started, stopping, timer_open;
  int units; /* transactions submitted and not answered */
  void (*stopped)(void *arg);
  void *stopped_arg;
  double next_schedule_at;
  int schedule_busy, schedule_failing;
  double next_retention_at;
  int retention_busy, retention_failing;
  int step; /* of the pass under way, -1: between passes */
  char queues[MAX_QUEUES][CB_QUEUE_NAME_MAX + 1];
  int nqueues, queue_index;
  cb_retention_counts pass; /* removed by the pass under way */
  double pass_started;

  pthread_mutex_t lock; /* guards stats */
  cb_upkeep_stats stats;
};

static double now_unix(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

cb_upkeep *cb_upkeep_new(cb_runtime *rt, const char *domain, const cb_upkeep_options *o) {
  cb_upkeep *k = calloc(1, sizeof *k);
  if (k == NULL) return NULL;
  k->rt = rt;
  k->o = *o;
  if (!(k->o.retention_interval > 0)) k->o.retention_interval = 60;
  snprintf(k->domain, sizeof k->domain, "%s", domain);
  cb_command_queue_name(domain, k->queue);
  k->step = -1;
  pthread_mutex_init(&k->lock, NULL);
  return k;
}

void cb_upkeep_free(cb_upkeep *k) {
  if (k == NULL) return;
  pthread_mutex_destroy(&k->lock);
  free(k);
}

void cb_upkeep_stats_get(cb_upkeep *k, cb_upkeep_stats *out) {
  pthread_mutex_lock(&k->lock);
  *out = k->stats;
  pthread_mutex_unlock(&k->lock);
}

static void maybe_stopped(cb_upkeep *k) {
  if (!k->stopping || k->timer_open || k->units > 0 || k->stopped == NULL) return;
  void (*stopped)(void *) = k->stopped;
  k->stopped = NULL;
  stopped(k->stopped_arg);
}

/* Submits u with done as its callback; frees it when the runtime refuses. */
static int submit(cb_upkeep *k, cb_unit *u, cb_unit_done done) {
  cb_unit_on_done(u, done, k);
  k->units++;
  if (cb_runtime_submit(k->rt, &u, 1) != CB_OK) {
    k->units--;
    cb_unit_free(u);
    return 0;
  }
  return 1;
}

/* Logs a job's failure once per outage; returns the new failing flag. */
static int report(cb_upkeep *k, const cb_unit *u, int failing, const char *job) {
  if (cb_unit_status(u) == CB_OK) {
    if (failing) cb_log(CB_LOG_INFO, "worker %s: %s works again", k->domain, job);
    return 0;
  }
  const cb_err *e = cb_unit_error(u);
  if (!failing)
    cb_log(CB_LOG_WARN, "worker %s: %s failed (%s: %s); trying again later", k->domain, job, cb_strerror(e->code),
           e->message);
  return 1;
}

/* ---- schedules ------------------------------------------------------------------ */

static void on_notified(cb_unit *u, void *arg) {
  cb_upkeep *k = arg;
  k->units--;
  cb_unit_free(u);
  maybe_stopped(k);
}

static void on_schedule_pass(cb_unit *u, void *arg) {
  cb_upkeep *k = arg;
  k->units--;
  k->schedule_busy = 0;
  k->schedule_failing = report(k, u, k->schedule_failing, "sending due schedules");
  int sent = cb_unit_status(u) == CB_OK ? cb_result_rows(cb_unit_result(u, cb_unit_count(u) - 1)) : 0;
  cb_unit_free(u);
  if (sent > 0) {
    pthread_mutex_lock(&k->lock);
    k->stats.scheduled += (uint64_t)sent;
    pthread_mutex_unlock(&k->lock);
    cb_log(CB_LOG_DEBUG, "worker %s: sent %d scheduled command(s)", k->domain, sent);
    /* After the commit: wake the domain's workers for what was sent. */
    cb_unit *n = cb_unit_new();
    if (n && !k->stopping && cb_queue_add_notify(n, k->queue) >= 0) submit(k, n, on_notified);
    else cb_unit_free(n);
  }
  maybe_stopped(k);
}

static void schedule_pass(cb_upkeep *k) {
  cb_unit *u = cb_unit_new();
  if (u == NULL) return;
  cb_add_keyed_begin(u, k->o.statement_timeout);
  if (cb_schedule_add_pass(u, k->domain) < 0) {
    cb_unit_free(u);
    return;
  }
  k->schedule_busy = submit(k, u, on_schedule_pass);
}

/* ---- retention -------------------------------------------------------------------- */

static void end_pass(cb_upkeep *k, int finished) {
  double now = now_unix();
  k->step = -1;
  /* Jittered, so that processes drift apart rather than meet. */
  k->next_retention_at = now + k->o.retention_interval * (0.9 + 0.2 * (double)rand() / RAND_MAX);
  if (!finished) return;
  pthread_mutex_lock(&k->lock);
  k->stats.retention_passes++;
  k->stats.last_retention_at = now;
  pthread_mutex_unlock(&k->lock);
  const cb_retention_counts *c = &k->pass;
  if (cb_retention_counts_total(c) > 0)
    cb_log(CB_LOG_INFO,
           "worker %s: retention removed %lld command(s) with %lld audit row(s), %lld archived message(s), "
           "%lld batch(es), %lld process(es), %lld dedup key(s), %lld schedule record(s) in %.1f s",
           k->domain, (long long)c->commands, (long long)c->audit, (long long)c->archive, (long long)c->batches,
           (long long)c->processes, (long long)c->dedup_keys, (long long)c->schedule_runs, now - k->pass_started);
}

static void on_retention_step(cb_unit *u, void *arg) {
  cb_upkeep *k = arg;
  k->units--;
  k->retention_busy = 0;
  k->retention_failing = report(k, u, k->retention_failing, "retention");
  if (cb_unit_status(u) != CB_OK) {
    cb_unit_free(u);
    end_pass(k, 0);
    maybe_stopped(k);
    return;
  }
  if (k->step == CB_RETAIN_STEPS) { /* the list of queues */
    const cb_result *r = cb_unit_result(u, cb_unit_count(u) - 1);
    k->nqueues = 0;
    for (int i = 0; i < cb_result_rows(r) && k->nqueues < MAX_QUEUES; i++)
      snprintf(k->queues[k->nqueues++], CB_QUEUE_NAME_MAX + 1, "%s", cb_result_value(r, i, 0));
    k->queue_index = 0;
    k->step = 0;
  } else {
    /* Counted as each batch commits: a pass cut short by a failure still
     * tells what it removed. */
    cb_retention_counts batch = {0};
    int64_t n = cb_retention_read_step(u, cb_unit_count(u) - 1, k->step, &batch);
    cb_retention_counts_add(&k->pass, &batch);
    pthread_mutex_lock(&k->lock);
    cb_retention_counts_add(&k->stats.removed, &batch);
    pthread_mutex_unlock(&k->lock);
    if (n < CB_RETENTION_BATCH) { /* this kind is done: the next one */
      if (k->step == CB_RETAIN_ARCHIVE && ++k->queue_index < k->nqueues) {
        /* the next queue's archive */
      } else {
        k->step++;
      }
    }
  }
  cb_unit_free(u);
  if (k->step >= CB_RETAIN_STEPS) end_pass(k, 1);
  /* Otherwise the next batch goes at the next tick: between batches the
   * worker's own transactions have the pool. */
  maybe_stopped(k);
}

/* Submits the pass's next transaction. */
static void retention_next(cb_upkeep *k) {
  cb_unit *u = cb_unit_new();
  if (u == NULL) return;
  if (k->step < 0) { /* a new pass: which queues have archives */
    memset(&k->pass, 0, sizeof k->pass);
    k->pass_started = now_unix();
    k->step = CB_RETAIN_STEPS;
    cb_retention_add_queues(u, k->domain);
  } else {
    if (k->step == CB_RETAIN_ARCHIVE && k->queue_index >= k->nqueues) k->step++;
    cb_add_keyed_begin(u, k->o.statement_timeout);
    if (cb_retention_add_step(u, k->step, k->domain, k->queues[k->queue_index], NULL, NULL, CB_RETENTION_BATCH) < 0) {
      cb_unit_free(u);
      end_pass(k, 0);
      return;
    }
  }
  k->retention_busy = submit(k, u, on_retention_step);
  if (!k->retention_busy) end_pass(k, 0);
}

/* ---- the timer ---------------------------------------------------------------------- */

static void on_tick(uv_timer_t *t) {
  cb_upkeep *k = t->data;
  if (k->stopping) return;
  double now = now_unix();
  if (k->o.schedules && !k->schedule_busy && now >= k->next_schedule_at) {
    /* Just past each whole second: due times are whole seconds or minutes. */
    k->next_schedule_at = floor(now / SCHEDULE_EVERY) * SCHEDULE_EVERY + SCHEDULE_EVERY + 0.02;
    schedule_pass(k);
  }
  if (k->o.retention && !k->retention_busy && (k->step >= 0 || now >= k->next_retention_at)) retention_next(k);
}

void cb_upkeep_start(cb_upkeep *k) {
  if (k->started || k->stopping || (!k->o.retention && !k->o.schedules)) return;
  k->started = 1;
  double now = now_unix();
  k->next_schedule_at = now;
  k->next_retention_at = now + k->o.retention_interval * (0.1 + 0.9 * (double)rand() / RAND_MAX);
  uv_timer_init(cb_runtime_loop(k->rt), &k->timer);
  k->timer.data = k;
  k->timer_open = 1;
  uv_timer_start(&k->timer, on_tick, 0, TICK_MS);
}

static void on_timer_closed(uv_handle_t *h) {
  cb_upkeep *k = h->data;
  k->timer_open = 0;
  maybe_stopped(k);
}

void cb_upkeep_stop(cb_upkeep *k, void (*stopped)(void *arg), void *arg) {
  if (k->stopping) return;
  k->stopping = 1;
  k->stopped = stopped;
  k->stopped_arg = arg;
  if (k->timer_open) {
    uv_timer_stop(&k->timer);
    uv_close((uv_handle_t *)&k->timer, on_timer_closed);
    return;
  }
  maybe_stopped(k);
}
