/* commandbus: retention, removing what a domain has finished with once it is
 * old enough: finished commands (COMPLETED, FAILED, CANCELED) with their
 * audit rows, archived messages of the domain's queues (pgmq.a_*), finished
 * batches with their commands, finished processes with their events and
 * steps, expired deduplication keys and old records of sent schedule times.
 *
 * Never removed: a command still in flight (PENDING, IN_PROGRESS), in the
 * troubleshooting queue (nor its archived message, which a retry resends),
 * in a batch that has not finished, or of a process that has not finished.
 *
 * The policy is per domain (commandbus.retention; defaults: seven days for
 * each kind). Workers apply it in the background (see upkeep.h); a purge
 * applies a given age once. Both work in small batches, one short
 * transaction each, taking rows with FOR UPDATE SKIP LOCKED: nothing a send
 * or a worker needs is locked but rows about to go, and two processes
 * removing at once take different rows, so each row is removed (and
 * counted) once. */
#ifndef COMMANDBUS_RETENTION_H
#define COMMANDBUS_RETENTION_H

#include <stddef.h>
#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What was removed. */
typedef struct cb_retention_counts {
  int64_t commands, audit, archive, batches, processes, dedup_keys, schedule_runs;
} cb_retention_counts;

void cb_retention_counts_add(cb_retention_counts *sum, const cb_retention_counts *more);
int64_t cb_retention_counts_total(const cb_retention_counts *c);

/* The kinds of cb_retention_counts in their order, by the names the Lua API,
 * the heartbeat rows and the metrics give them: "commands", "audit",
 * "archive", "batches", "processes", "dedup_keys", "schedule_runs". */
#define CB_RETENTION_KINDS 7
extern const char *const cb_retention_kinds[CB_RETENTION_KINDS];
/* The counts in that order. */
void cb_retention_counts_values(const cb_retention_counts *c, int64_t out[CB_RETENTION_KINDS]);

/* One age of a policy: set = 0 leaves it as it is; seconds < 0 keeps forever. */
typedef struct cb_retention_age {
  int set;
  double seconds;
} cb_retention_age;

typedef struct cb_retention_policy {
  cb_retention_age commands, archive, batches, processes;
} cb_retention_policy;

/* Changes the ages a domain's policy sets; the others keep their value. */
int cb_retention_set(cb_runtime *rt, const char *domain, const cb_retention_policy *policy, cb_err *err);
/* The domain's policy (a completed unit, caller frees): one row of domain,
 * commands, archive, batches, processes in seconds (NULL: forever). */
int cb_retention_get(cb_runtime *rt, const char *domain, cb_unit **rows, cb_err *err);

typedef struct cb_purge_spec {
  const char *domain;
  double older_than;           /* seconds, >= 0 */
  const char *const *statuses; /* NULL: every kind the policy covers; else only commands in these
                                  statuses (of COMPLETED, FAILED, CANCELED) with their audit rows */
  size_t nstatuses;
} cb_purge_spec;

/* Removes, once, what retention would with older_than as every age; blocks
 * until nothing is left (in batches of CB_RETENTION_BATCH). */
int cb_retention_purge(cb_runtime *rt, const cb_purge_spec *spec, cb_retention_counts *removed, cb_err *err);

#define CB_RETENTION_BATCH 500

/* ---- the steps of a pass, for the background job ------------------------------ */

enum {
  CB_RETAIN_COMMANDS,
  CB_RETAIN_BATCHES,
  CB_RETAIN_ARCHIVE, /* one queue at a time */
  CB_RETAIN_PROCESSES,
  CB_RETAIN_DEDUP,
  CB_RETAIN_SCHEDULE_RUNS,
  CB_RETAIN_STEPS
};

/* Appends the statement listing the domain's queues that exist (rows of
 * queue_name: the command queue, <domain>__replies and
 * <domain>__process_replies). Returns its index. */
int cb_retention_add_queues(cb_unit *u, const char *domain);
/* Appends one batch of a step (at most `limit` rows of its kind); queue for
 * CB_RETAIN_ARCHIVE; older_than in seconds as text (NULL: the policy);
 * statuses a PostgreSQL text array literal (NULL: every finished status).
 * Returns its index or a negative cb_code. */
int cb_retention_add_step(cb_unit *u, int step, const char *domain, const char *queue, const char *older_than,
                          const char *statuses, int limit);
/* After the unit ran: adds the step's counts to *c; returns how many rows of
 * its kind it removed (a full batch means there may be more). */
int64_t cb_retention_read_step(const cb_unit *u, int index, int step, cb_retention_counts *c);

#ifdef __cplusplus
}
#endif
#endif
