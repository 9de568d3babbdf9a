/* commandbus: awaiting an outcome without polling storms (seed 004).
 *
 * A waiter subscribes to the id's hub key *before* it reads, so a change
 * between the read and the wait is never lost. Changes made by this process
 * bump the key directly; changes made by other processes arrive as
 * NOTIFY commandbus_await '<domain>:<id>', which writers send only for ids
 * listed in commandbus.awaiter (the waiter registers itself there for the
 * length of its wait), so nobody pays for notifications nobody reads. Where
 * no notification can arrive, the waiter re-reads on the backoff schedule
 * below. */
#ifndef COMMANDBUS_AWAITER_H
#define COMMANDBUS_AWAITER_H

#include "commandbus/error.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CB_AWAIT_CHANNEL "commandbus_await"

/* The poll delay before re-read number `attempt` (0-based): 25 ms, doubling,
 * capped at 1 s: 25, 50, 100, 200, 400, 800, 1000, 1000, ... */
int cb_await_backoff_ms(int attempt);

/* The hub key of an id: "commandbus_await:<domain>:<id>" (out: 128 bytes). */
void cb_await_key(const char *domain, const char *id, char *out);

/* Bumps the id's key in this process (for writers in this process). */
void cb_await_touch(cb_runtime *rt, const char *domain, const char *id);

/* Blocks the calling thread until the command is COMPLETED, FAILED, CANCELED
 * or in the troubleshooting queue, then returns its record in the last
 * statement of *rows (caller frees). CB_ETIMEOUT after timeout seconds;
 * CB_ENOTFOUND ("unknown command `<id>`") when there is no such command. */
int cb_await_command(cb_runtime *rt, const char *domain, const char *command_id, double timeout, cb_unit **rows,
                     cb_err *err);

#ifdef __cplusplus
}
#endif
#endif
