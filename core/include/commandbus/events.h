/* commandbus: process events (the per-process log in commandbus.process_event)
 * and the event sink.
 *
 * Every change of a process's status or step appends an event (a trigger
 * does it, whoever the writer is); hosts may append their own. Sequences are
 * 1, 2, 3, ... per process, in commit order.
 *
 * How the core learns what it appended: a unit that may change processes
 * starts with cb_events_add_begin (the transaction asks the trigger to
 * collect what it appends) and ends with cb_events_add_read (one row per
 * appended event). After the unit committed, cb_events_published wakes local
 * awaiters of each process and, when a sink is on, queues each non-terminal
 * event for the host. So the host sees an event only once it is durable,
 * the sink can never fail or roll back a write, and a slow sink costs
 * writers nothing: the queue is bounded and an event that does not fit is
 * dropped and counted. Events reach the queue in the order each writer
 * committed them; two writers racing on one process (a host's append and
 * the reply router) may interleave, and `sequence` orders them. The log
 * (cb_process_events) is always complete. */
#ifndef COMMANDBUS_EVENTS_H
#define COMMANDBUS_EVENTS_H

#include <stddef.h>
#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cb_process_event {
  int64_t sequence;
  const char *domain;
  const char *process_id;
  const char *event_type;
  const char *step;       /* NULL when the process has no step */
  const char *status;     /* the process's status when the event was appended */
  const char *data_json;  /* a JSON object */
  const char *created_at; /* PostgreSQL's text form */
} cb_process_event;       /* one allocation: free() releases it */

/* 1 for the events that end a process (COMPLETED, COMPENSATED, FAILED,
 * CANCELED): these are never pushed to the sink. */
int cb_event_is_terminal(const char *event_type);

/* ---- for writers in the core ------------------------------------------------ */

/* Adds the statement that makes this transaction collect appended events. */
int cb_events_add_begin(cb_unit *u);
/* Adds the statement reading them back; returns its index (or < 0). */
int cb_events_add_read(cb_unit *u);
/* After the unit committed: local awaiters of each process are woken, and
 * the sink (if on) gets each non-terminal event. `index` is what
 * cb_events_add_read returned. */
void cb_events_published(cb_runtime *rt, const cb_unit *u, int index);

/* ---- the sink --------------------------------------------------------------- */

/* Turns the sink on with room for `capacity` events (<= 0: 1024), or
 * changes its capacity (events already queued stay, as many as fit).
 * CB_ENOMEM when the queue cannot be made (the capacity stays as it was). */
int cb_events_sink_on(cb_runtime *rt, int capacity);
void cb_events_sink_off(cb_runtime *rt); /* drops what is queued */
int cb_events_sink_is_on(cb_runtime *rt);
/* Moves up to max queued events to out (oldest first; caller frees each);
 * returns how many. Never blocks. */
int cb_events_take(cb_runtime *rt, cb_process_event **out, int max);

typedef struct cb_events_stats {
  uint64_t pushed;  /* queued for the host */
  uint64_t dropped; /* did not fit */
  size_t queued;    /* waiting now */
  size_t capacity;
} cb_events_stats;
void cb_events_stats_get(cb_runtime *rt, cb_events_stats *stats);

/* ---- the log -------------------------------------------------------------------- */

/* Appends a host event of event_type (1 to 100 bytes, not one of the names
 * the trigger uses) with data (a JSON object's text, NULL: {}) to a running
 * process; *sequence receives its number. CB_ENOTFOUND for no such process,
 * CB_ESTATE when it has finished. */
int cb_process_append_event(cb_runtime *rt, const char *domain, const char *process_id, const char *event_type,
                            const char *data_json, int64_t *sequence, cb_err *err);

/* The process's events after after_sequence, oldest first, as a completed
 * unit whose last statement holds the rows (caller frees); columns: domain,
 * process_id, sequence, event_type, step, status, data, created_at.
 * CB_ENOTFOUND for no such process. */
int cb_process_events(cb_runtime *rt, const char *domain, const char *process_id, int64_t after_sequence,
                      cb_unit **rows, cb_err *err);

/* Deletes finished processes (COMPLETED, COMPENSATED, FAILED, CANCELED)
 * whose completed_at is older than older_than seconds, with their events and
 * process_audit rows; *count receives how many. Wakes nobody: awaiters only
 * care about changes. */
int cb_process_purge(cb_runtime *rt, const char *domain, double older_than, int64_t *count, cb_err *err);
/* The statement of such a purge, appended to u: older_than in seconds as
 * text (NULL: the domain's retention policy), at most limit processes (text;
 * NULL: all). Its one row counts the processes removed. Returns its index. */
int cb_process_add_purge(cb_unit *u, const char *domain, const char *older_than, const char *limit);

#ifdef __cplusplus
}
#endif
#endif
