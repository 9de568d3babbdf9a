/* commandbus: awaiting an outcome without polling storms.
 *
 * A waiter subscribes to the id's hub key *before* it reads, so a change
 * between the read and the wait is never lost. Changes made by this process
 * bump the key directly; changes made by other processes arrive as
 * NOTIFY commandbus_await '<domain>:<id>', which triggers on the command and
 * process tables send, whoever the writer is, but only for ids listed in
 * commandbus.awaiter (the waiter registers itself there for the length of
 * its wait), so nobody pays for notifications nobody reads. Polling is then
 * only a safety net (cb_await_safety_backoff_ms); where no notification can
 * arrive (CB_AWAIT_NO_LISTEN), the waiter re-reads on a bounded backoff,
 * cb_await_backoff_ms. */
#ifndef COMMANDBUS_AWAITER_H
#define COMMANDBUS_AWAITER_H

#include <stdint.h>

#include "commandbus/bus.h"
#include "commandbus/error.h"
#include "commandbus/hub.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CB_AWAIT_CHANNEL CB_HUB_CHANGE_CHANNEL

/* The poll delay before re-read number `attempt` (0-based): 25 ms, doubling,
 * capped at 1 s: 25, 50, 100, 200, 400, 800, 1000, 1000, ... */
int cb_await_backoff_ms(int attempt);

/* The safety-net poll when notifications can arrive: the same doubling from
 * 25 ms, capped at CB_AWAIT_SAFETY_CAP_MS. A notification lost while the listener
 * was away is covered too: on reconnecting it bumps every key. */
#define CB_AWAIT_SAFETY_CAP_MS 30000
int cb_await_safety_backoff_ms(int attempt);

/* Flags of the await functions. */
enum {
  /* No notifications from PostgreSQL (no LISTEN, no registration): changes
   * made by this process still wake the waiter at once; others are seen by
   * re-reading on cb_await_backoff_ms's schedule. For where LISTEN cannot
   * work, e.g. behind a transaction-pooling proxy. */
  CB_AWAIT_NO_LISTEN = 1
};

/* Each await blocks only the calling thread until its condition holds, then
 * returns the record in the last statement of *rows (caller frees).
 * CB_ETIMEOUT after timeout seconds; CB_ENOTFOUND ("unknown command `<id>`",
 * "unknown process `<id>`") when there is no such record; CB_ECLOSED when
 * the runtime closes meanwhile. */

/* Until the command is COMPLETED, FAILED, CANCELED or in the troubleshooting
 * queue. Columns as cb_bus_get_command's. */
int cb_await_command(cb_runtime *rt, const char *domain, const char *command_id, double timeout, int flags,
                     cb_unit **rows, cb_err *err);

/* Sends one command (as cb_bus_send with n 1) and awaits it as
 * cb_await_command, the waiter registered by the send's own transaction:
 * one transaction before the outcome instead of two. result tells the
 * command's id (and msg_id once sent). A send refused writes and registers
 * nothing: CB_EDUPLICATE for an id that exists or a held dedup key
 * (result->duplicate_of: the command there), CB_EINVAL for bad input. Once
 * sent, CB_ETIMEOUT and CB_ECLOSED leave the command sent (result->msg_id
 * is not 0) and its waiter unregistered. */
int cb_await_send(cb_runtime *rt, const char *domain, const cb_command_spec *spec, double delay, double timeout,
                  int flags, cb_send_result *result, cb_unit **rows, cb_err *err);

/* Until the process is COMPLETED, COMPENSATED, FAILED or CANCELED. Columns as
 * cb_process_get's. */
int cb_await_process(cb_runtime *rt, const char *domain, const char *process_id, double timeout, int flags,
                     cb_unit **rows, cb_err *err);

/* Until the process has an event of event_type with a sequence above
 * after_sequence; returns the first such (at once when it exists already).
 * Columns as cb_process_events's. */
int cb_await_event(cb_runtime *rt, const char *domain, const char *process_id, const char *event_type,
                   int64_t after_sequence, double timeout, int flags, cb_unit **rows, cb_err *err);

#ifdef __cplusplus
}
#endif
#endif
