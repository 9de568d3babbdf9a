/* commandbus: units of work and their results.
 *
 * A unit is a list of statements that run as one transaction. Every writer
 * and reader of the core fills units; the runtime (runtime.h) runs them on
 * its loop thread and hands them back with one result per statement.
 * Statements are prepared once per connection (keyed by their SQL text)
 * unless added with CB_STMT_ONESHOT.
 *
 * A unit remembers the first statement it could not take (out of memory, no
 * SQL text, too many parameters), as cb_strbuf remembers a failed write: from
 * then on cb_unit_add takes nothing more and returns that failure again, and
 * running the unit runs none of its statements and ends with that failure.
 * So a caller may add its statements without checking each, and check the
 * run's status once: a dropped statement can never shift the results of the
 * ones after it. cb_unit_reset forgets the failure.
 *
 * Threads: a unit belongs to one thread at a time; while the runtime has it
 * (from exec or submit until its completion) nobody else touches it. */
#ifndef COMMANDBUS_UNIT_H
#define COMMANDBUS_UNIT_H

#include <stddef.h>
#include <stdint.h>

#include "commandbus/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cb_unit cb_unit;
typedef struct pg_result cb_result; /* libpq's PGresult, read through cb_result_* */

/* CB_STMT_ONESHOT: do not prepare (DDL, rare statements).
 * CB_STMT_COPY: the SQL text is a simple query (one or more statements, run
 * as one transaction) whose COPY ... FROM STDIN statements take the
 * parameters in turn as their data, in COPY's text format; such a statement
 * is the only one of its unit, and its result is the first result of its
 * statements that returned rows (NULL when none did). COPY cannot run in libpq's pipeline mode, so
 * the unit waits for a connection with nothing in flight and takes it out
 * of pipeline mode while it runs. */
enum { CB_STMT_ONESHOT = 1, CB_STMT_COPY = 2 };

/* The most parameters one statement may take. */
#define CB_UNIT_MAX_PARAMS 256

cb_unit *cb_unit_new(void);
void cb_unit_free(cb_unit *u);
/* Forgets statements, results and a remembered failure, so the unit can be
 * filled again. */
void cb_unit_reset(cb_unit *u);

/* Appends a statement; sql and params are copied, a NULL param is SQL NULL.
 * Returns the statement's index, or a negative cb_code: CB_ENOMEM, or
 * CB_EINVAL for no SQL text, a negative count, more than CB_UNIT_MAX_PARAMS
 * parameters or no params array for them. Once an add failed, every later
 * add returns the same code and the unit fails when it runs (see above). */
int cb_unit_add(cb_unit *u, const char *sql, int nparams, const char *const *params);
int cb_unit_add_flags(cb_unit *u, const char *sql, int nparams, const char *const *params, int flags);
int cb_unit_count(const cb_unit *u);
/* Appends copies of src's statements (SQL, parameters, flags) to dst, as
 * cb_unit_add does; returns CB_OK or the failing add's code. A src that
 * failed while it was filled passes its failure on. */
int cb_unit_append(cb_unit *dst, const cb_unit *src);

/* CB_OK, or the first failure: of an add (as soon as it happened), else of
 * the run once the unit completed (the transaction rolled back). */
int cb_unit_status(const cb_unit *u);
const cb_err *cb_unit_error(const cb_unit *u);
/* Statement i's result; NULL when the unit failed before reaching it. */
const cb_result *cb_unit_result(const cb_unit *u, int i);

typedef void (*cb_unit_done)(cb_unit *u, void *arg);
/* A callback run on the loop thread when the unit completes (async use). */
void cb_unit_on_done(cb_unit *u, cb_unit_done done, void *arg);

int cb_result_rows(const cb_result *r);
int cb_result_columns(const cb_result *r);
const char *cb_result_value(const cb_result *r, int row, int col); /* "" for NULL */
int cb_result_is_null(const cb_result *r, int row, int col);
int64_t cb_result_int(const cb_result *r, int row, int col);
/* One allocation holding a record of `size` bytes (zeroed) followed by
 * copies of the row's columns cols[0..n): the const char * member at byte
 * offsets[i] of the record points at the copy of cols[i] (NULL for SQL
 * NULL). free() releases it all. NULL when out of memory. */
void *cb_result_pack(const cb_result *r, int row, size_t size, const int *cols, const size_t *offsets, int n);
/* Rows affected by an INSERT/UPDATE/DELETE. */
int64_t cb_result_affected(const cb_result *r);

/* Kinds of column, from PostgreSQL's type: how a binding should present a
 * value (JSON is handed over as text, for the binding to decode). */
enum { CB_COL_TEXT, CB_COL_INT, CB_COL_FLOAT, CB_COL_BOOL, CB_COL_JSON };
const char *cb_result_column_name(const cb_result *r, int col);
int cb_result_column_kind(const cb_result *r, int col);

#ifdef __cplusplus
}
#endif
#endif
