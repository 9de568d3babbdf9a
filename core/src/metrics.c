/* commandbus: metrics and their Prometheus exposition (see metrics.h).
 *
 * Families, in the order they are written (labels in braces):
 *   commandbus_queue_depth{queue}, _oldest_message_age_seconds{queue},
 *     commandbus_queue_messages_total{queue}
 *   commandbus_commands{domain,status}, commandbus_tsq_commands{domain},
 *     commandbus_processes{domain,status}: every known status of a domain,
 *     0 included, so that a status emptied reads 0 rather than vanishing
 *   commandbus_runners{kind,domain,state}, commandbus_runner_info{kind,
 *     domain,runner,host,pid,state} (1 per live runner)
 *   commandbus_worker_*{domain,runner} and commandbus_reply_router_*{domain,
 *     runner} (RUNNER_FIELDS), commandbus_worker_retention_removed_total{domain,
 *     runner,kind}, their _lane_depth{domain,runner,lane}
 *   commandbus_message_router_*{router} (ROUTER_FIELDS), _lane_depth{router,
 *     lane} (lanes count from 1, as router:take(lane) does)
 *   commandbus_awaiter_waiters, commandbus_process_events_*
 * A family with no sample is left out. With heartbeats from every process,
 * per-runner families show only live runners (not stopped, not lost). */
#include "commandbus/metrics.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commandbus/hub.h"
#include "commandbus/retention.h"
#include "strbuf.h"

/* ---- collecting ----------------------------------------------------------------- */

typedef struct collector {
  cb_metrics *m;
  size_t cap;
  int failed;
} collector;

static int grow(void **items, size_t *cap, size_t need, size_t size) {
  if (need <= *cap) return 1;
  size_t n = *cap ? *cap * 2 : 8;
  void *p = realloc(*items, n * size);
  if (p == NULL) return 0;
  *items = p;
  *cap = n;
  return 1;
}

static void keep_runner(const cb_runner_stat *s, void *arg) {
  collector *c = arg;
  if (c->failed || !grow((void **)&c->m->runners, &c->cap, c->m->nrunners + 1, sizeof *c->m->runners)) {
    c->failed = 1;
    return;
  }
  c->m->runners[c->m->nrunners++] = *s;
}

static void keep_router(cb_message_router *router, const char *name, void *arg) {
  collector *c = arg;
  cb_metrics *m = c->m;
  int lanes = cb_message_router_lanes(router);
  size_t *depths = calloc((size_t)lanes, sizeof *depths);
  if (c->failed || depths == NULL || !grow((void **)&m->routers, &c->cap, m->nrouters + 1, sizeof *m->routers)) {
    free(depths);
    c->failed = 1;
    return;
  }
  cb_router_metrics *rm = &m->routers[m->nrouters++];
  memset(rm, 0, sizeof *rm);
  snprintf(rm->name, sizeof rm->name, "%s", name);
  rm->lanes = lanes;
  cb_message_router_stats_get(router, &rm->stats);
  rm->ingress_depth = cb_message_router_ingress_depth(router);
  for (int i = 0; i < lanes; i++) depths[i] = cb_message_router_lane_depth(router, i);
  rm->lane_depths = depths;
}

/* Rows (domain, status, count) of a finished statement. */
static int read_counts(const cb_result *r, cb_status_count **out, size_t *n) {
  int rows = cb_result_rows(r);
  *out = calloc((size_t)rows + 1, sizeof **out);
  if (*out == NULL) return 0;
  for (int i = 0; i < rows; i++) {
    (*out)[i].domain = cb_result_value(r, i, 0);
    (*out)[i].status = cb_result_value(r, i, 1);
    (*out)[i].count = cb_result_int(r, i, 2);
  }
  *n = (size_t)rows;
  return 1;
}

int cb_metrics_collect(cb_runtime *rt, int flags, cb_metrics *m, cb_err *err) {
  memset(m, 0, sizeof *m);
  m->all_processes = (flags & CB_METRICS_ALL_PROCESSES) != 0;
  int rc = cb_queue_metrics_all(rt, &m->queues, &m->nqueues, err);
  if (rc != CB_OK) return rc;
  if ((m->owner = cb_unit_new()) == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  cb_unit_add(m->owner,
              "SELECT domain, status, count(*) FROM commandbus.command GROUP BY domain, status ORDER BY domain, status",
              0, NULL);
  cb_unit_add(m->owner,
              "SELECT domain, status, count(*) FROM commandbus.process GROUP BY domain, status ORDER BY domain, status",
              0, NULL);
  if ((rc = cb_runtime_exec(rt, m->owner, err)) != CB_OK) return rc;
  if (!read_counts(cb_unit_result(m->owner, 0), &m->commands, &m->ncommands) ||
      !read_counts(cb_unit_result(m->owner, 1), &m->processes, &m->nprocesses))
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  collector c = {m, 0, 0};
  if (m->all_processes) {
    if ((rc = cb_runner_list(rt, NULL, &m->runners, &m->nrunners, err)) != CB_OK) return rc;
  } else {
    cb_runner_each(rt, keep_runner, &c);
  }
  collector routers = {m, 0, 0};
  cb_message_router_each(keep_router, &routers);
  if (c.failed || routers.failed) return cb_err_set(err, CB_ENOMEM, "out of memory");
  m->awaiting = cb_hub_record_waiters(cb_runtime_hub(rt));
  cb_events_stats_get(rt, &m->events);
  return CB_OK;
}

void cb_metrics_free(cb_metrics *m) {
  if (m == NULL) return;
  for (size_t i = 0; i < m->nrouters; i++) free(m->routers[i].lane_depths);
  free(m->routers);
  free(m->queues);
  free(m->commands);
  free(m->processes);
  free(m->runners);
  cb_unit_free(m->owner);
  memset(m, 0, sizeof *m);
}

/* ---- the exposition -------------------------------------------------------------- */

/* Writes families: a family's HELP and TYPE lines go out with its first
 * sample, so that a family without samples leaves no trace. */
typedef struct writer {
  cb_strbuf b;
  const char *name, *type, *help;
  int started;
} writer;

static void family(writer *w, const char *name, const char *type, const char *help) {
  w->name = name;
  w->type = type;
  w->help = help;
  w->started = 0;
}

static void escaped(cb_strbuf *b, const char *s, int quote) {
  for (; *s; s++) {
    if (*s == '\\') cb_strbuf_puts(b, "\\\\");
    else if (*s == '\n') cb_strbuf_puts(b, "\\n");
    else if (*s == '"' && quote) cb_strbuf_puts(b, "\\\"");
    else cb_strbuf_putc(b, *s);
  }
}

/* One sample of the current family; labels are (name, value) pairs ending
 * with NULL. */
static void sample(writer *w, double value, ...) {
  if (!w->started) {
    cb_strbuf_printf(&w->b, "# HELP %s ", w->name);
    escaped(&w->b, w->help, 0);
    cb_strbuf_printf(&w->b, "\n# TYPE %s %s\n", w->name, w->type);
    w->started = 1;
  }
  cb_strbuf_puts(&w->b, w->name);
  va_list ap;
  va_start(ap, value);
  int n = 0;
  for (const char *label; (label = va_arg(ap, const char *)) != NULL; n++) {
    const char *v = va_arg(ap, const char *);
    cb_strbuf_printf(&w->b, "%s%s=\"", n ? "," : "{", label);
    escaped(&w->b, v, 1);
    cb_strbuf_putc(&w->b, '"');
  }
  va_end(ap);
  if (n) cb_strbuf_putc(&w->b, '}');
  if (value == (double)(int64_t)value && value < 1e15 && value > -1e15)
    cb_strbuf_printf(&w->b, " %lld\n", (long long)value);
  else cb_strbuf_printf(&w->b, " %.15g\n", value);
}

/* ---- commands and processes by status ---- */

static const char *const COMMAND_STATUSES[] = {
    "PENDING", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELED", "IN_TROUBLESHOOTING_QUEUE", NULL};
static const char *const PROCESS_STATUSES[] = {
    "PENDING", "WAITING", "WAITING_FOR_TSQ", "COMPENSATING", "COMPLETED", "COMPENSATED", "FAILED", "CANCELED", NULL};

static int known(const char *const *statuses, const char *status) {
  for (int i = 0; statuses[i]; i++)
    if (strcmp(statuses[i], status) == 0) return 1;
  return 0;
}

/* The count of status among rows [from, to) (one domain's), 0 if absent. */
static int64_t count_of(const cb_status_count *rows, size_t from, size_t to, const char *status) {
  for (size_t i = from; i < to; i++)
    if (strcmp(rows[i].status, status) == 0) return rows[i].count;
  return 0;
}

/* Calls fn for each domain's run of rows (rows are ordered by domain). */
static void by_domain(writer *w, const cb_status_count *rows, size_t n, const char *const *statuses,
                      void (*fn)(writer *w, const cb_status_count *rows, size_t from, size_t to,
                                 const char *const *statuses)) {
  for (size_t from = 0, to; from < n; from = to) {
    for (to = from + 1; to < n && strcmp(rows[to].domain, rows[from].domain) == 0; to++) continue;
    fn(w, rows, from, to, statuses);
  }
}

static void status_samples(writer *w, const cb_status_count *rows, size_t from, size_t to,
                           const char *const *statuses) {
  const char *domain = rows[from].domain;
  for (int i = 0; statuses[i]; i++)
    sample(w, (double)count_of(rows, from, to, statuses[i]), "domain", domain, "status", statuses[i], NULL);
  for (size_t i = from; i < to; i++) /* statuses a peer wrote that we do not know */
    if (!known(statuses, rows[i].status))
      sample(w, (double)rows[i].count, "domain", domain, "status", rows[i].status, NULL);
}

static void tsq_sample(writer *w, const cb_status_count *rows, size_t from, size_t to, const char *const *statuses) {
  (void)statuses;
  sample(w, (double)count_of(rows, from, to, "IN_TROUBLESHOOTING_QUEUE"), "domain", rows[from].domain, NULL);
}

/* ---- workers and reply routers ---- */

enum { AS_U64, AS_INT, AS_DOUBLE };

typedef struct runner_field {
  const char *kind, *name, *type, *help;
  size_t offset;
  int as;
} runner_field;

#define RF(kind, name, type, field, as, help) \
  { kind, name, type, help, offsetof(cb_runner_stat, field), as }
static const runner_field RUNNER_FIELDS[] = {
    RF("worker", "commandbus_worker_lanes", "gauge", lanes, AS_INT, "Handler lanes (concurrency) of the worker."),
    RF("worker", "commandbus_worker_in_flight", "gauge", in_flight, AS_INT, "Commands whose handler runs now."),
    RF("worker", "commandbus_worker_successes_total", "counter", successes, AS_U64,
       "Commands the worker's handlers completed."),
    RF("worker", "commandbus_worker_failures_total", "counter", failures, AS_U64,
       "Handler failures of any kind: transient, permanent or business rule."),
    RF("worker", "commandbus_worker_retries_total", "counter", retries, AS_U64,
       "Transient failures whose command is tried again after a backoff."),
    RF("worker", "commandbus_worker_consecutive_failures", "gauge", consecutive_failures, AS_U64,
       "Handler failures since the last success."),
    RF("worker", "commandbus_worker_stuck_total", "counter", stuck, AS_U64,
       "Handlers seen running past the visibility timeout."),
    RF("worker", "commandbus_worker_poison_total", "counter", poison, AS_U64,
       "Messages set aside because they are not commands (or not this worker's to run)."),
    RF("worker", "commandbus_worker_last_success_timestamp_seconds", "gauge", last_success_at, AS_DOUBLE,
       "When a handler last succeeded (Unix time); 0 if never."),
    RF("worker", "commandbus_worker_scheduled_total", "counter", scheduled, AS_U64,
       "Commands the worker sent for due schedules."),
    RF("reply_router", "commandbus_reply_router_lanes", "gauge", lanes, AS_INT,
       "Lanes (concurrency) of the reply router."),
    RF("reply_router", "commandbus_reply_router_in_flight", "gauge", in_flight, AS_INT,
       "Replies fetched and not yet applied, rejected or released."),
    RF("reply_router", "commandbus_reply_router_applied_total", "counter", applied, AS_U64,
       "Replies applied to their process."),
    RF("reply_router", "commandbus_reply_router_rejected_total", "counter", rejected, AS_U64,
       "Replies archived unapplied: no or an unknown or finished process, applied before, malformed."),
    RF("reply_router", "commandbus_reply_router_failures_total", "counter", failures, AS_U64,
       "Replies left for redelivery because a process manager's hook raised."),
};

static double field_value(const cb_runner_stat *s, const runner_field *f) {
  const char *p = (const char *)s + f->offset;
  switch (f->as) {
    case AS_U64: return (double)*(const uint64_t *)p;
    case AS_INT: return (double)*(const int *)p;
    default: return *(const double *)p;
  }
}

static int live(const cb_metrics *m, const cb_runner_stat *s) {
  return !m->all_processes || (strcmp(s->state, "stopped") != 0 && strcmp(s->state, "lost") != 0);
}

static void runner_families(writer *w, const cb_metrics *m) {
  family(w, "commandbus_runners", "gauge", "Workers and reply routers by kind, domain and state.");
  for (size_t i = 0; i < m->nrunners; i++) {
    const cb_runner_stat *s = &m->runners[i];
    int seen = 0, n = 0;
    for (size_t j = 0; j < m->nrunners; j++) {
      const cb_runner_stat *o = &m->runners[j];
      int same = !strcmp(o->kind, s->kind) && !strcmp(o->domain, s->domain) && !strcmp(o->state, s->state);
      if (same && j < i) seen = 1;
      n += same;
    }
    if (!seen) sample(w, n, "kind", s->kind, "domain", s->domain, "state", s->state, NULL);
  }
  family(w, "commandbus_runner_info", "gauge", "1 for each live worker or reply router: where it runs, and its state.");
  for (size_t i = 0; i < m->nrunners; i++) {
    const cb_runner_stat *s = &m->runners[i];
    char pid[16];
    snprintf(pid, sizeof pid, "%d", s->pid);
    if (live(m, s))
      sample(w, 1, "kind", s->kind, "domain", s->domain, "runner", s->runner_id, "host", s->host, "pid", pid, "state",
             s->state, NULL);
  }
  for (size_t f = 0; f < sizeof RUNNER_FIELDS / sizeof RUNNER_FIELDS[0]; f++) {
    const runner_field *rf = &RUNNER_FIELDS[f];
    family(w, rf->name, rf->type, rf->help);
    for (size_t i = 0; i < m->nrunners; i++) {
      const cb_runner_stat *s = &m->runners[i];
      if (live(m, s) && strcmp(s->kind, rf->kind) == 0)
        sample(w, field_value(s, rf), "domain", s->domain, "runner", s->runner_id, NULL);
    }
  }
  family(w, "commandbus_worker_retention_removed_total", "counter",
         "Rows the worker's retention passes removed, by kind: commands, audit (their audit rows), archive "
         "(archived messages), batches, processes, dedup_keys, schedule_runs.");
  for (size_t i = 0; i < m->nrunners; i++) {
    const cb_runner_stat *s = &m->runners[i];
    if (!live(m, s) || strcmp(s->kind, "worker") != 0) continue;
    for (int k = 0; k < CB_RUNNER_REMOVED_KINDS; k++)
      sample(w, (double)s->removed[k], "domain", s->domain, "runner", s->runner_id, "kind", cb_retention_kinds[k],
             NULL);
  }
  static const char *const kinds[][2] = {{"worker", "commandbus_worker_lane_depth"},
                                         {"reply_router", "commandbus_reply_router_lane_depth"}};
  for (int k = 0; k < 2; k++) {
    family(w, kinds[k][1], "gauge", "Items waiting in each lane's queue for a handler.");
    for (size_t i = 0; i < m->nrunners; i++) {
      const cb_runner_stat *s = &m->runners[i];
      if (!live(m, s) || strcmp(s->kind, kinds[k][0]) != 0) continue;
      for (int lane = 0; lane < s->nlane_depths; lane++) {
        char l[16];
        snprintf(l, sizeof l, "%d", lane + 1); /* lanes count from 1, as in Lua */
        sample(w, s->lane_depths[lane], "domain", s->domain, "runner", s->runner_id, "lane", l, NULL);
      }
    }
  }
}

/* ---- message routers ---- */

typedef struct router_field {
  const char *name, *type, *help;
  size_t offset;
  double scale;
} router_field;

#define MF(name, type, field, scale, help) \
  { name, type, help, offsetof(cb_message_router_stats, field), scale }
static const router_field ROUTER_FIELDS[] = {
    MF("commandbus_message_router_routed_total", "counter", routed, 1, "Items placed in a lane."),
    MF("commandbus_message_router_dropped_total", "counter", dropped, 1,
       "Items refused by a full ingress, or lost to a full lane."),
    MF("commandbus_message_router_batches_total", "counter", batches_sent, 1,
       "Hand-overs from the ingress to the lanes."),
    MF("commandbus_message_router_queue_full_total", "counter", queue_full_events, 1,
       "Times the dispatcher found a lane full."),
    MF("commandbus_message_router_routing_errors_total", "counter", routing_errors, 1,
       "Route calls refused: a bad argument, or the router was stopping."),
    MF("commandbus_message_router_delivered_total", "counter", delivered, 1, "Items handed to lane consumers."),
    MF("commandbus_message_router_latency_average_seconds", "gauge", latency_avg_ns, 1e-9,
       "Average time from route to take, over the delivered items."),
    MF("commandbus_message_router_latency_max_seconds", "gauge", latency_max_ns, 1e-9,
       "Longest time from route to take."),
};

static void router_families(writer *w, const cb_metrics *m) {
  for (size_t f = 0; f < sizeof ROUTER_FIELDS / sizeof ROUTER_FIELDS[0]; f++) {
    const router_field *rf = &ROUTER_FIELDS[f];
    family(w, rf->name, rf->type, rf->help);
    for (size_t i = 0; i < m->nrouters; i++) {
      uint64_t v = *(const uint64_t *)((const char *)&m->routers[i].stats + rf->offset);
      sample(w, (double)v * rf->scale, "router", m->routers[i].name, NULL);
    }
  }
  family(w, "commandbus_message_router_ingress_depth", "gauge", "Items waiting in the ingress for the dispatcher.");
  for (size_t i = 0; i < m->nrouters; i++)
    sample(w, (double)m->routers[i].ingress_depth, "router", m->routers[i].name, NULL);
  family(w, "commandbus_message_router_lane_depth", "gauge", "Items waiting in each lane.");
  for (size_t i = 0; i < m->nrouters; i++)
    for (int lane = 0; lane < m->routers[i].lanes; lane++) {
      char l[16];
      snprintf(l, sizeof l, "%d", lane + 1); /* lanes count from 1, as in Lua */
      sample(w, (double)m->routers[i].lane_depths[lane], "router", m->routers[i].name, "lane", l, NULL);
    }
}

char *cb_metrics_text(const cb_metrics *m) {
  writer w;
  memset(&w, 0, sizeof w);
  family(&w, "commandbus_queue_depth", "gauge", "Messages in the queue, visible or not.");
  for (size_t i = 0; i < m->nqueues; i++)
    sample(&w, (double)m->queues[i].queue_length, "queue", m->queues[i].queue_name, NULL);
  family(&w, "commandbus_queue_oldest_message_age_seconds", "gauge",
         "Age of the oldest message in the queue; 0 when empty.");
  for (size_t i = 0; i < m->nqueues; i++) {
    int64_t age = m->queues[i].oldest_msg_age_sec;
    sample(&w, (double)(age > 0 ? age : 0), "queue", m->queues[i].queue_name, NULL);
  }
  family(&w, "commandbus_queue_messages_total", "counter", "Messages ever sent to the queue.");
  for (size_t i = 0; i < m->nqueues; i++)
    sample(&w, (double)m->queues[i].total_messages, "queue", m->queues[i].queue_name, NULL);
  family(&w, "commandbus_commands", "gauge", "Commands by domain and status.");
  by_domain(&w, m->commands, m->ncommands, COMMAND_STATUSES, status_samples);
  family(&w, "commandbus_tsq_commands", "gauge", "Commands waiting in the troubleshooting queue for an operator.");
  by_domain(&w, m->commands, m->ncommands, COMMAND_STATUSES, tsq_sample);
  family(&w, "commandbus_processes", "gauge", "Processes (sagas) by domain and status.");
  by_domain(&w, m->processes, m->nprocesses, PROCESS_STATUSES, status_samples);
  runner_families(&w, m);
  router_families(&w, m);
  family(&w, "commandbus_awaiter_waiters", "gauge",
         "Threads of this process awaiting a command, process or process event.");
  sample(&w, (double)m->awaiting, NULL);
  family(&w, "commandbus_process_events_pushed_total", "counter", "Process events queued for this process's sink.");
  sample(&w, (double)m->events.pushed, NULL);
  family(&w, "commandbus_process_events_dropped_total", "counter",
         "Process events dropped because the sink's queue was full (the log keeps them).");
  sample(&w, (double)m->events.dropped, NULL);
  family(&w, "commandbus_process_events_queued", "gauge", "Process events waiting for the sink.");
  sample(&w, (double)m->events.queued, NULL);
  family(&w, "commandbus_process_events_capacity", "gauge", "Room in the sink's queue (0 while no sink is on).");
  sample(&w, (double)m->events.capacity, NULL);
  if (w.b.failed) {
    cb_strbuf_free(&w.b);
    return NULL;
  }
  return w.b.data; /* handed over */
}
