/* commandbus: the process reply router.
 *
 * Reads a domain's process reply queue in batches, looks each reply's
 * process up by correlation id, and hands it to a lane chosen by process id
 * (one process is never handled on two lanes at once). A lane (the Lua
 * binding: process managers' hooks) decides what the reply means and applies
 * it: the reply recorded in process_audit, the process's state and status,
 * the next step's command, and the reply removed from the queue, all in one
 * transaction. A reply already applied (its command's process_audit row has
 * an outcome) changes nothing. A lane takes its replies in batches and
 * applies a batch in one transaction (cb_reply_router_apply_many): one
 * commit for many replies, each reply's effects still all or nothing.
 *
 * Replies that cannot be applied are archived with a log line: no or a
 * malformed correlation id, an unknown process, a process already finished.
 * A hook that raises leaves the reply for redelivery after the visibility
 * timeout.
 *
 * Threads: it fetches on the runtime's loop thread, as the worker does;
 * lanes are the caller's threads (take / apply / release, blocking). */
#ifndef COMMANDBUS_REPLY_ROUTER_H
#define COMMANDBUS_REPLY_ROUTER_H

#include <stdint.h>

#include "commandbus/bus.h"
#include "commandbus/error.h"
#include "commandbus/engine.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cb_reply_router cb_reply_router;

typedef struct cb_reply_router_options {
  const char *domain;
  const char *reply_queue;   /* NULL: <domain>__process_replies */
  int lanes;                 /* <= 0: cb_default_threads() */
  double visibility_timeout; /* default 30 */
  double statement_timeout;  /* default 25; must be < visibility_timeout */
  double poll_interval;      /* default 1 */
} cb_reply_router_options;

/* One reply handed to a lane; read-only for the lane. */
typedef struct cb_reply {
  int64_t msg_id;
  const char *message_json; /* the reply as sent */
  const char *outcome;      /* SUCCESS, FAILED, CANCELED */
  const char *command_id;   /* the step command it answers */
  const char *process_id;
  const char *process_type;
  const char *status; /* the process's status */
  const char *current_step;
  const char *step_name; /* the step of the command it answers */
  const char *state_json;
  const char *completed_steps_json; /* steps answered SUCCESS so far, in order */
  struct cb_reply *next;
} cb_reply;

/* What a lane decided: the process's new status, step and state, and the
 * next command to send (next_type NULL: none). */
typedef struct cb_reply_decision {
  const char *status;
  const char *step;
  const char *state_json;
  const char *error_code;    /* may be NULL */
  const char *error_message; /* may be NULL */
  const char *next_type;
  const char *next_data_json;
} cb_reply_decision;

typedef struct cb_reply_router_health {
  const char *state;
  uint64_t applied, failures, rejected;
  int in_flight;
} cb_reply_router_health;

void cb_reply_router_options_init(cb_reply_router_options *o);
int cb_reply_router_new(cb_runtime *rt, const cb_reply_router_options *o, cb_reply_router **out, cb_err *err);
void cb_reply_router_free(cb_reply_router *r);
const char *cb_reply_router_queue(const cb_reply_router *r);

/* Running it: cb_engine_start, cb_engine_stop, cb_engine_wait and the
 * rest of commandbus/engine.h on cb_reply_router_engine(r). Stopping asks
 * for no more fetching; lanes finish what they hold (the drain), then end. */
cb_engine *cb_reply_router_engine(cb_reply_router *r);

/* Most replies a lane takes at once, and one transaction applies. */
#define CB_REPLY_ROUTER_BATCH_MAX 64

/* Lanes: one reply at a time (NULL on timeout); *ended set when the lane is
 * finished. Every reply taken goes back through apply, reject or release. */
cb_reply *cb_reply_router_take(cb_reply_router *r, int lane, int timeout_ms, int *ended);
/* Takes up to max (at most CB_REPLY_ROUTER_BATCH_MAX) replies of the lane,
 * oldest first, into replies[]; waits up to timeout_ms for the first one.
 * Returns the count (0 on timeout; 0 with *ended set once the lane is
 * finished). One lane holds every reply of a process, in order. */
int cb_reply_router_take_many(cb_reply_router *r, int lane, cb_reply **replies, int max, int timeout_ms, int *ended);
/* Applies a decision (one transaction); the reply is consumed. CB_ESTATE
 * when it was applied before or the process moved on (the reply is archived). */
int cb_reply_router_apply(cb_reply_router *r, cb_reply *reply, const cb_reply_decision *d, cb_err *err);
/* Applies decisions[i] to replies[i] for n replies, every reply consumed.
 * The replies go in as few transactions as order allows (one, unless a
 * process has two replies: its later one goes in a later transaction, so a
 * process's replies apply in the order given). When a batch's transaction
 * fails (a reply applied before, a process that moved on, any error), its
 * replies are applied again one by one with cb_reply_router_apply, so one
 * stale reply never holds the others back. Returns CB_OK when every reply
 * was applied; else the error of the first that was not (err filled), which
 * was archived (CB_ESTATE) or left for redelivery as cb_reply_router_apply
 * does. The decisions' strings must live until the call returns. Lane
 * threads; blocking. */
int cb_reply_router_apply_many(cb_reply_router *r, cb_reply **replies, const cb_reply_decision *decisions, int n,
                               cb_err *err);
/* Archives the reply with a reason in the log (no manager for its type...). */
void cb_reply_router_reject(cb_reply_router *r, cb_reply *reply, const char *why);
/* Leaves the reply for redelivery after the visibility timeout (a hook
 * failed); counts a failure. */
void cb_reply_router_release(cb_reply_router *r, cb_reply *reply);

void cb_reply_router_health_get(cb_reply_router *r, cb_reply_router_health *h);

#ifdef __cplusplus
}
#endif
#endif
