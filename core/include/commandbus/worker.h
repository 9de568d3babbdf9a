/* commandbus: the worker, which reads a domain's command queue and hands each
 * command to a handler lane, then records the outcome (docs/architecture.md,
 * "What the worker writes").
 *
 * The engine runs on the runtime's loop thread: it fetches (one statement
 * reads the messages and marks their commands received), sets poison
 * messages aside, routes the rest to lanes through the message router (keyed
 * by correlation id, else command id, so related commands keep their order
 * on one lane), and acknowledges outcomes: everything that completed since
 * the last round goes to PostgreSQL in one round trip, each command's
 * effects in its own transaction. LISTEN/NOTIFY wakes an idle worker;
 * a poll timer finds redeliveries.
 *
 * Lanes are threads owned by the caller (the Lua binding gives each its own
 * lua_State). A lane loops: cb_worker_take, run the handler, set the outcome
 * with cb_work_* and hand it back with cb_worker_done. */
#ifndef COMMANDBUS_WORKER_H
#define COMMANDBUS_WORKER_H

#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/engine.h"
#include "commandbus/runtime.h"
#include "commandbus/upkeep.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CB_MAX_BACKOFF 16

typedef struct cb_worker_options {
  const char *domain;
  int lanes;                      /* handler concurrency; <= 0: cb_default_threads() */
  double visibility_timeout;      /* seconds a received message stays hidden; default 30 */
  double statement_timeout;       /* seconds, per transaction; default 25; must be < visibility */
  double poll_interval;           /* seconds between polls when idle; default 1 */
  double backoff[CB_MAX_BACKOFF]; /* retry delays by attempt; default 10, 60, 300 */
  int nbackoff;
  double drain_timeout;      /* seconds stop waits for running handlers; default 30 */
  int retention;             /* apply the domain's retention policy in the background; default 1 */
  double retention_interval; /* seconds between retention passes; default 60 */
  int schedules;             /* send the domain's due schedules; default 1 */
} cb_worker_options;

typedef struct cb_worker cb_worker;

enum { CB_OUTCOME_NONE, CB_OUTCOME_SUCCESS, CB_OUTCOME_TRANSIENT, CB_OUTCOME_PERMANENT, CB_OUTCOME_BUSINESS_RULE };

/* One command handed to a lane. Fields are read-only for the lane until it
 * sets the outcome; the worker owns and frees it after cb_worker_done. */
typedef struct cb_work {
  int64_t msg_id;
  const char *command_id;
  const char *command_type;
  const char *data_json;      /* the command's data object */
  const char *correlation_id; /* may be NULL */
  const char *reply_to;       /* NULL when no reply is wanted */
  const char *batch_id;       /* may be NULL */
  int attempt;
  int max_attempts;
  /* Outcome, set by the lane. */
  int outcome;
  char *result_json; /* SUCCESS: JSON text or NULL */
  char *error_code;
  char *error_message;
  char *error_details_json; /* JSON text or NULL */
  /* Worker-private. */
  struct cb_work *next;
  int lane;
  double started_at;         /* received, then the handler's start; the stuck clock (extend_visibility moves it) */
  double handler_started_at; /* the handler's start, for its measured time */
  int stuck_reported;
  int reply_dropped; /* acknowledged without its reply after a failure */
  int *held;         /* the worker's count of works alive, less one when this is freed */
} cb_work;

/* Outcomes (copy their strings; json may be NULL). */
void cb_work_succeed(cb_work *w, const char *result_json);
void cb_work_fail(cb_work *w, int outcome, const char *code, const char *message, const char *details_json);

typedef struct cb_worker_health {
  const char *state; /* "starting", "running", "stopping", "stopped" */
  uint64_t successes, failures, consecutive_failures, stuck, poison;
  uint64_t retries;       /* failures that will be tried again (transient, attempts left) */
  double last_success_at; /* Unix seconds, 0 = never */
  int in_flight;          /* commands whose handler runs now */
  int held;               /* commands received and not yet acknowledged (or let go) */
  cb_upkeep_stats upkeep; /* background jobs: retention counts, scheduled commands */
} cb_worker_health;

void cb_worker_options_init(cb_worker_options *o);
/* Validates the options (statement_timeout < visibility_timeout, ...),
 * makes sure the domain queue exists, and LISTENs for its sends. */
int cb_worker_new(cb_runtime *rt, const cb_worker_options *o, cb_worker **out, cb_err *err);
/* Frees a stopped worker (stops it first if needed). */
void cb_worker_free(cb_worker *w);

/* Running it: cb_engine_start, cb_engine_stop, cb_engine_wait and the
 * rest of commandbus/engine.h on cb_worker_engine(w). Stopping asks for no
 * more fetching; running handlers may finish (up to drain_timeout) and are
 * acknowledged; then the lanes get their end. */
cb_engine *cb_worker_engine(cb_worker *w);

/* For lane threads: up to max works, waiting up to timeout_ms. Returns the
 * count, 0 on timeout, -1 when the lane is finished (exit). */
int cb_worker_take(cb_worker *w, int lane, cb_work **works, int max, int timeout_ms);
/* Hands a work with its outcome back for acknowledgement. */
void cb_worker_done(cb_worker *w, cb_work *work);
/* Keeps the work's message hidden for `seconds` more (blocking; from a lane). */
int cb_worker_extend_visibility(cb_worker *w, cb_work *work, double seconds, cb_err *err);

void cb_worker_health_get(cb_worker *w, cb_worker_health *h);
int cb_worker_in_flight(cb_worker *w);

#ifdef __cplusplus
}
#endif
#endif
