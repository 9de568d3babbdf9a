/* commandbus: the command bus, rcmd's schema and message contract (see
 * docs/architecture.md, "Data contract").
 *
 * Sending writes, in one transaction, the command row, its message on the
 * domain queue `<domain>__commands` and the SENT audit row, and notifies the
 * queue's listeners. Many commands go in one statement per chunk and one
 * transaction for the whole call. A command id already present in the
 * domain is reported as a duplicate and nothing is written for it. The
 * domain queue, and each reply queue named by a command, is created on first
 * use (once per runtime). */
#ifndef COMMANDBUS_BUS_H
#define COMMANDBUS_BUS_H

#include <stddef.h>
#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/queue.h"
#include "commandbus/runtime.h"
#include "commandbus/uuid.h"

#ifdef __cplusplus
extern "C" {
#endif

/* "<domain>__commands" fits a queue name. */
#define CB_DOMAIN_MAX (CB_QUEUE_NAME_MAX - 10)
#define CB_DEFAULT_MAX_ATTEMPTS 3

typedef struct cb_command_spec {
  const char *command_id;     /* NULL: a new UUIDv7 */
  const char *command_type;   /* required, non-empty */
  const char *data_json;      /* a JSON object's text; NULL means {} */
  const char *correlation_id; /* NULL: a new UUIDv7 (always present, as rcmd) */
  const char *reply_to;       /* NULL or "": no reply; else a queue name */
  int max_attempts;           /* <= 0: CB_DEFAULT_MAX_ATTEMPTS */
  const char *batch_id;       /* NULL: none */
  int priority;               /* CB_PRIORITY_MIN..MAX; higher is fetched first; 0 is the default */
  const char *dedup_key;      /* NULL: none; else refused while another command holds the key */
  double dedup_for;           /* seconds the key stays held (> 0 with a dedup_key) */
} cb_command_spec;

#define CB_PRIORITY_MIN (-32768)
#define CB_PRIORITY_MAX 32767
#define CB_DEDUP_KEY_MAX 512

typedef struct cb_send_result {
  char command_id[CB_UUID_LEN + 1];
  int64_t msg_id;                     /* 0 for a duplicate */
  int duplicate;                      /* the id existed, or the dedup key was held: nothing was written for it */
  char duplicate_of[CB_UUID_LEN + 1]; /* a duplicate's first command: the same id, or the key's holder */
} cb_send_result;

/* ^[a-z_][a-z0-9_]*$, at most CB_DOMAIN_MAX bytes. */
int cb_domain_valid(const char *domain, cb_err *err);
/* The domain's command queue name (out holds CB_QUEUE_NAME_MAX + 1). */
void cb_command_queue_name(const char *domain, char *out);

/* Creates queue once per runtime (idempotent in the database as well). */
int cb_bus_ensure_queue(cb_runtime *rt, const char *queue, cb_err *err);
/* The domain's command queue, with its priority index: once per runtime,
 * or every time with `again` (a worker starting checks, since without the
 * index its fetch would scan the queue). */
int cb_bus_ensure_command_queue(cb_runtime *rt, const char *domain, int again, cb_err *err);

/* Validates every spec (before any SQL), then sends all n in one transaction.
 * results[i] tells each command's id and msg_id, or that it was a duplicate.
 * With n == 1 a duplicate returns CB_EDUPLICATE. delay: seconds before the
 * messages become visible. */
int cb_bus_send(cb_runtime *rt, const char *domain, const cb_command_spec *specs, size_t n, double delay,
                cb_send_result *results, cb_err *err);

/* cb_bus_send of n fresh commands (no id, no dedup key, no delay) that the
 * caller is still making: the transaction starts before the commands are
 * all there, so that the server writes the first ones while the caller
 * makes the rest. specs and results have room for n; the stream reads
 * specs[i] once the caller has handed it over, and the caller writes
 * neither array meanwhile but where it has not handed over yet.
 *
 *   cb_bus_stream_start: NULL when a stream cannot be had (too few
 *     commands for the COPY path, a delay, a bad domain, a pool of one
 *     connection, which the stream would hold, ...): the caller
 *     sends by cb_bus_send, which answers as it always does.
 *   cb_bus_stream_add: specs [0, upto) are filled. 0 when the stream
 *     could not take one of them (a command the COPY path does not take,
 *     bad input, a reply queue not made yet): it has been abandoned, and
 *     freed; nothing was written; the caller sends by cb_bus_send.
 *   cb_bus_stream_ids: once every command was added, waits until results'
 *     ids are in (1: results may be read, while the server still writes
 *     them; 0: the send failed, see cb_bus_stream_finish).
 *   cb_bus_stream_finish: waits for the transaction; frees the stream.
 *   cb_bus_stream_abandon: the caller gives up (its own error): the
 *     transaction rolls back; waits for that; frees the stream. */
typedef struct cb_send_stream cb_send_stream;
cb_send_stream *cb_bus_stream_start(cb_runtime *rt, const char *domain, const cb_command_spec *specs,
                                    cb_send_result *results, size_t n, double delay);
int cb_bus_stream_add(cb_send_stream *s, size_t upto);
int cb_bus_stream_ids(cb_send_stream *s);
int cb_bus_stream_finish(cb_send_stream *s, cb_err *err);
void cb_bus_stream_abandon(cb_send_stream *s);

typedef struct cb_send_options {
  const char *batch_id;  /* NULL: each spec's own; else every command joins this batch */
  int refuse_duplicates; /* an id that exists fails the whole unit (see cb_bus_is_duplicate)
                            instead of being reported as a duplicate */
} cb_send_options;

/* The send of cb_bus_send, appended to a unit the caller runs, so that other
 * writes share its transaction (a process's row with its first command, a
 * batch row with its commands). Validates every spec, makes sure the domain
 * queue and each reply queue exist, then appends one statement per 1000
 * commands followed by the queue's notify (one command without a dedup key:
 * one statement, which raises the notify itself, so the caller's statements
 * begin at the send's first index + 1); u is not run. results[i] gets each
 * command's id now; options may be NULL. On an error u may hold part of the
 * statements: discard it. */
int cb_bus_add_send(cb_runtime *rt, cb_unit *u, const char *domain, const cb_command_spec *specs, size_t n,
                    double delay, cb_send_result *results, const cb_send_options *options, cb_err *err);
/* Runs u, whose first statements are a send cb_bus_add_send appended (n
 * commands), as cb_bus_send runs its own: in a transaction it may share with
 * concurrent sends, filling results. The statements the caller added after
 * the send's commit or roll back with it. */
int cb_bus_send_unit(cb_runtime *rt, cb_unit *u, size_t n, cb_send_result *results, cb_err *err);
/* Whether a failed unit's error is a unique violation on the command table's
 * key, (domain, command_id): a command id that exists. Any other error,
 * unique violations elsewhere included, is not a duplicate. */
int cb_bus_is_duplicate(const cb_err *err);
/* Appends a send of the commands a caller's SQL produces (schedules): the
 * rows (v jsonb, ord bigint) of `source`, JSON objects {id, corr, type, data,
 * max, prio, ...} as cb_bus_add_send builds them, defined by the CTEs of
 * `prefix` (each followed by a comma). Parameters: $1 is the caller's, $2
 * the domain, $3 the delay in seconds, $4 on the caller's; the statement
 * gives one row per command (id, msg_id: 0 when it existed). No notify:
 * the caller knows after the commit whether anything was sent (a notify
 * for nothing would wake every worker of the domain). Returns the
 * statement's index or a negative cb_code. */
int cb_bus_add_send_from(cb_unit *u, const char *domain, const char *prefix, const char *source, int nparams,
                         const char *const *params);
/* After u ran: fills results[i].msg_id and .duplicate from the send statements,
 * which start at statement `first` (cb_unit_count(u) before cb_bus_add_send). */
void cb_bus_read_send(const cb_unit *u, int first, size_t n, cb_send_result *results);

/* ---- queries: each returns a completed unit (caller frees) whose last
 * statement holds the rows; columns are named as the record fields. -------- */

/* Runs a query unit: on success hands it to *rows, else frees it. A value
 * PostgreSQL cannot read (SQLSTATE 22P02) is the caller's INVALID_ARGUMENT. */
int cb_bus_run_query(cb_runtime *rt, cb_unit *u, cb_unit **rows, cb_err *err);

/* The same for a query of one statement. */
int cb_bus_query(cb_runtime *rt, const char *sql, int nparams, const char *const *params, cb_unit **rows, cb_err *err);

typedef struct cb_command_filter {
  const char *domain;         /* required */
  const char *status;         /* NULL: any */
  const char *command_type;   /* NULL: any */
  const char *correlation_id; /* NULL: any */
  const char *batch_id;       /* NULL: any */
  int limit;                  /* <= 0: 100 */
  int offset;
} cb_command_filter;

/* CB_ENOTFOUND when there is no such command. */
int cb_bus_get_command(cb_runtime *rt, const char *domain, const char *command_id, cb_unit **rows, cb_err *err);
int cb_bus_list_commands(cb_runtime *rt, const cb_command_filter *filter, cb_unit **rows, cb_err *err);
/* Audit events of one command, oldest first (CB_ENOTFOUND for an unknown id). */
int cb_bus_audit(cb_runtime *rt, const char *domain, const char *command_id, cb_unit **rows, cb_err *err);

/* ---- batches ------------------------------------------------------------------
 * A batch's counts are computed from its commands whenever they are read, so
 * no batch row is touched on the worker's completion path. Its status
 * follows one rule, rcmd's: complete once every member is COMPLETED, FAILED,
 * CANCELED or in the TSQ (COMPLETED_WITH_FAILURES when any is not
 * COMPLETED), else IN_PROGRESS once a member was received, else PENDING. A
 * refresh applies it after members change (in a transaction of its own, after
 * theirs committed) and on every read; a TSQ retry that reopens a complete
 * batch makes it IN_PROGRESS again. BATCH_STARTED is recorded once, and
 * BATCH_COMPLETED once, when the batch is complete with nothing in the TSQ. */

/* Appends the refresh of one batch to u (a statement of its own). */
int cb_bus_add_batch_refresh(cb_unit *u, const char *domain, const char *batch_id);

/* Creates the batch row and sends its commands (each gets batch_id) in one
 * transaction. batch_id (37 bytes) receives the new batch's id. */
int cb_bus_create_batch(cb_runtime *rt, const char *domain, const char *name, const char *custom_data_json,
                        cb_command_spec *specs, size_t n, cb_send_result *results, char *batch_id, cb_err *err);
/* One row with exact counts; CB_ENOTFOUND for an unknown batch. */
int cb_bus_get_batch(cb_runtime *rt, const char *domain, const char *batch_id, cb_unit **rows, cb_err *err);
int cb_bus_list_batches(cb_runtime *rt, const char *domain, const char *status, int limit, int offset, cb_unit **rows,
                        cb_err *err);

#ifdef __cplusplus
}
#endif
#endif
