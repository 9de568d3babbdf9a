/* commandbus: a domain's background jobs, which every running worker of the
 * domain does alongside its commands: sending due schedules (see
 * schedule.h) and applying the retention policy (see retention.h).
 *
 * Many processes may run them at once without doing anything twice: a due
 * time is claimed through a unique key, and rows to remove are taken with
 * SKIP LOCKED. Each job is one short transaction on the runtime's pool at a
 * time: a schedule pass every second, and retention in batches of
 * CB_RETENTION_BATCH rows, a pass every retention_interval seconds (the
 * first at a random point of the first interval, so that processes started
 * together spread out), batch after batch until a pass finds no full batch.
 *
 * Threads: everything but cb_upkeep_stats runs on the runtime's loop
 * thread. */
#ifndef COMMANDBUS_UPKEEP_H
#define COMMANDBUS_UPKEEP_H

#include <stdint.h>

#include "commandbus/retention.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cb_upkeep cb_upkeep;

typedef struct cb_upkeep_options {
  int retention;             /* apply the domain's retention policy */
  double retention_interval; /* seconds between passes */
  int schedules;             /* send the domain's due schedules */
  double statement_timeout;  /* seconds, per transaction */
} cb_upkeep_options;

typedef struct cb_upkeep_stats {
  cb_retention_counts removed; /* by this process's passes, since it started */
  uint64_t retention_passes;   /* passes finished */
  double last_retention_at;    /* Unix seconds a pass last finished; 0: never */
  uint64_t scheduled;          /* commands sent for due schedules */
} cb_upkeep_stats;

/* Allocates (any thread); NULL when out of memory. domain is copied. */
cb_upkeep *cb_upkeep_new(cb_runtime *rt, const char *domain, const cb_upkeep_options *o);
/* Loop thread: starts the jobs. */
void cb_upkeep_start(cb_upkeep *k);
/* Loop thread: starts nothing new; calls stopped(arg) on the loop thread
 * once its timer is closed and its last transaction answered (at once when
 * it never started). Idempotent: later calls are ignored. */
void cb_upkeep_stop(cb_upkeep *k, void (*stopped)(void *arg), void *arg);
/* Any thread. */
void cb_upkeep_stats_get(cb_upkeep *k, cb_upkeep_stats *out);
/* Frees a stopped (or never started) upkeep. */
void cb_upkeep_free(cb_upkeep *k);

#ifdef __cplusplus
}
#endif
#endif
