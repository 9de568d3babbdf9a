/* commandbus: running workers and reply routers ("runners"), seen from
 * outside: their health and heartbeats.
 *
 * A runner registers with its runtime while it runs. Its health can then be
 * read in this process (cb_runner_each: what metrics report live) and from
 * any process: every CB_RUNNER_HEARTBEAT_S seconds the runtime's loop thread
 * writes one row per registered runner into commandbus.runner (one
 * statement for them all), and a runner's row is written again when it stops
 * and when it is removed. A row whose heartbeat is older than three
 * intervals belongs to a runner that died without saying so: cb_runner_list
 * calls it "lost". Rows older than a day are deleted by the heartbeats.
 * Heartbeats never hold a runner back: a failed write is logged once and
 * tried again at the next beat.
 *
 * A runner may also ask to be stopped by SIGINT and SIGTERM while it runs
 * (what `commandbus worker` in a shell, a systemd unit or a container
 * needs). */
#ifndef COMMANDBUS_RUNNER_H
#define COMMANDBUS_RUNNER_H

#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/message_router.h"
#include "commandbus/queue.h"
#include "commandbus/runtime.h"
#include "commandbus/uuid.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CB_RUNNER_HEARTBEAT_S 5.0
#define CB_RUNNER_REMOVED_KINDS 7
/* A heartbeat older than this many intervals: the runner is "lost". */
#define CB_RUNNER_LOST_AFTER 3

/* What a runner reports. Counters a kind does not have stay 0. */
typedef struct cb_runner_stat {
  char kind[16]; /* "worker", "reply_router" */
  char domain[CB_QUEUE_NAME_MAX + 1];
  char runner_id[CB_UUID_LEN + 1]; /* one per run (UUIDv7) */
  char host[64];
  int pid;
  char state[16];                  /* starting, running, stopping, stopped (cb_runner_list: or lost) */
  double started_at, heartbeat_at; /* Unix seconds; a live snapshot's heartbeat_at is now */
  int lanes, in_flight;
  uint64_t successes, failures, retries, consecutive_failures, stuck, poison; /* worker (failures: both) */
  uint64_t applied, rejected;                                                 /* reply router */
  double last_success_at;                                                     /* Unix seconds, 0 = never */
  /* worker: what its retention passes removed since it started, by kind, in
   * the order of cb_retention_kinds (retention.h): commands, audit, archive,
   * batches, processes, dedup_keys, schedule_runs */
  int64_t removed[CB_RUNNER_REMOVED_KINDS];
  uint64_t scheduled; /* worker: commands it sent for due schedules */
  int nlane_depths;
  uint32_t lane_depths[CB_MESSAGE_ROUTER_MAX_LANES]; /* items waiting in each lane */
} cb_runner_stat;

typedef struct cb_runner {
  /* Set by the owner before cb_runner_start, read-only afterwards. */
  const char *kind;
  const char *domain;
  int lanes;
  /* Fills the state and counters (the rest is the registry's).
   * Called from any thread, under the registry's lock: it must not start or
   * remove runners, nor block on the runtime. */
  void (*report)(void *self, cb_runner_stat *stat);
  void (*stop)(void *self); /* asked by a signal when stop_on_signals */
  void *self;
  int stop_on_signals;
  cb_message_router *router; /* its lanes: their depths are reported */
  /* The registry's. */
  cb_runtime *rt;
  char id[CB_UUID_LEN + 1];
  double started_at;
  int registered, signal_watch;
  struct cb_runner *next;
} cb_runner;

/* Registers the runner (and watches signals if it asked), and writes its
 * first heartbeat without waiting for it. */
int cb_runner_start(cb_runtime *rt, cb_runner *r, cb_err *err);
/* The runner has stopped: signals no longer stop it (they end the process
 * again), and its row says so soon. Stays registered until removed. Any
 * thread, the loop's included; the owner calls it before it lets anyone see
 * it stopped (who may then remove and free it). */
void cb_runner_stopped(cb_runner *r);
/* Unregisters it and writes its last row (blocking, unless called on the
 * loop thread). Idempotent; a runner never started is fine. */
void cb_runner_remove(cb_runner *r);

/* Calls visit with a live snapshot of each runner registered with rt, under
 * the registry's lock. */
void cb_runner_each(cb_runtime *rt, void (*visit)(const cb_runner_stat *stat, void *arg), void *arg);

/* The rows of commandbus.runner (runners of every process, as their last
 * heartbeat left them), for one domain or all (domain NULL), ordered by
 * kind, domain and start. *out is malloc'd (caller frees). */
int cb_runner_list(cb_runtime *rt, const char *domain, cb_runner_stat **out, size_t *count, cb_err *err);

#ifdef __cplusplus
}
#endif
#endif
