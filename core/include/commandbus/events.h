/* commandbus: collecting the process events a transaction appended, and the
 * event sink that hands them to the host. (The log itself, the per-process
 * events in commandbus.process_event, is read and appended to through
 * process.h.)
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
 * (cb_process_events, process.h) is always complete. */
#ifndef COMMANDBUS_EVENTS_H
#define COMMANDBUS_EVENTS_H

#include <stddef.h>
#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/event_feed.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

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

void cb_events_stats_get(cb_runtime *rt, cb_events_stats *stats);

#ifdef __cplusplus
}
#endif
#endif
