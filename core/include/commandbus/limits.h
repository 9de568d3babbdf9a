/* commandbus: rate and concurrency limits per command type, shared by every
 * worker process of a domain (the rows of commandbus.type_limit).
 *
 * A limited type is received at most `per_second` times per second (by the
 * start time of the receiving transaction, the time its RECEIVED audit rows
 * carry) and has at most `max_in_flight` commands IN_PROGRESS under a live
 * lease at once. A command over its limit is not received: it stays in the
 * queue, is not counted as an attempt and writes no audit row, and is taken
 * when its type has room again. Workers take the domain's limit rows' locks
 * in the transaction that receives, so that two processes never count the
 * same room twice. */
#ifndef COMMANDBUS_LIMITS_H
#define COMMANDBUS_LIMITS_H

#include "commandbus/error.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Sets the limits of a command type in a domain; 0 means no limit of that
 * kind, and with both 0 the type is no longer limited. Takes effect at the
 * workers' next fetch. */
int cb_limits_set(cb_runtime *rt, const char *domain, const char *command_type, int per_second, int max_in_flight,
                  cb_err *err);
/* The domain's limits: a completed unit (caller frees) whose last statement
 * has rows of command_type, per_second, max_in_flight (NULL: none) and
 * in_flight (commands of the type under a live lease now). */
int cb_limits_list(cb_runtime *rt, const char *domain, cb_unit **rows, cb_err *err);

/* For the worker: appends the statement that locks the domain's limit rows,
 * in one order for every process; its one row's second column lists their
 * types (`{}`: the domain has no limits). It goes right before the receive,
 * in the same transaction, and sets that transaction's plan_cache_mode to
 * force_generic_plan for it (see worker_fetch.c): one statement rather than
 * two on the way of every command. Returns its index or a negative
 * cb_code. */
int cb_limits_add_lock(cb_unit *u, const char *domain);

#ifdef __cplusplus
}
#endif
#endif
