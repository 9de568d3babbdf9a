/* commandbus: metrics of a bus, and their Prometheus text exposition.
 *
 * cb_metrics_collect takes a snapshot of
 * - the database: every queue's depth, oldest message and messages ever
 *   sent; commands and processes by domain and status (one scan of each
 *   table, so a scrape every few seconds of millions of rows costs);
 * - this process: its named message routers, the threads awaiting a command
 *   or process, the process-event sink;
 * - workers and reply routers: this runtime's own, live; or, with
 *   CB_METRICS_ALL_PROCESSES, those of every process as their last heartbeat
 *   recorded them (see runner.h), which is what any one process of many
 *   (nginx's workers, say) should answer a scrape with.
 *
 * cb_metrics_text formats a snapshot in the Prometheus text exposition format
 * 0.0.4: names start with commandbus_, counters end in _total, times are in
 * seconds, label values are escaped. The families, their labels and what
 * they mean are listed in metrics.c. */
#ifndef COMMANDBUS_METRICS_H
#define COMMANDBUS_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/events.h"
#include "commandbus/message_router.h"
#include "commandbus/queue.h"
#include "commandbus/runner.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { CB_METRICS_ALL_PROCESSES = 1 };

typedef struct cb_status_count {
  const char *domain;
  const char *status;
  int64_t count;
} cb_status_count;

typedef struct cb_router_metrics {
  char name[CB_MESSAGE_ROUTER_NAME_MAX + 1];
  int lanes;
  cb_message_router_stats stats;
  size_t ingress_depth;
  size_t *lane_depths; /* `lanes` entries */
} cb_router_metrics;

typedef struct cb_metrics {
  int all_processes;        /* runners come from heartbeats (every process) */
  cb_queue_metrics *queues; /* by name */
  size_t nqueues;
  cb_status_count *commands; /* by domain, then status (only counts > 0) */
  size_t ncommands;
  cb_status_count *processes;
  size_t nprocesses;
  cb_runner_stat *runners; /* by kind, domain; all_processes: stopped and lost ones too */
  size_t nrunners;
  cb_router_metrics *routers; /* the process's named message routers */
  size_t nrouters;
  size_t awaiting;        /* threads of this runtime awaiting a record now */
  cb_events_stats events; /* this runtime's process-event sink */
  cb_unit *owner;         /* holds the strings above */
} cb_metrics;

/* Fills *m (free it with cb_metrics_free, also after a failure). */
int cb_metrics_collect(cb_runtime *rt, int flags, cb_metrics *m, cb_err *err);
void cb_metrics_free(cb_metrics *m);

/* The exposition of m: malloc'd text (caller frees), NULL when out of
 * memory. */
char *cb_metrics_text(const cb_metrics *m);

#ifdef __cplusplus
}
#endif
#endif
