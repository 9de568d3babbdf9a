/* commandbus: the inside of a unit, shared by unit.c and the runtime that
 * runs units (runtime.c, pg.c). Not installed.
 *
 * The unit's own fields are filled by unit.c; those marked [runtime] belong
 * to the runtime while the unit is queued or in flight. */
#ifndef COMMANDBUS_UNIT_INTERNAL_H
#define COMMANDBUS_UNIT_INTERNAL_H

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>

#include "commandbus/unit.h"

/* The data of a CB_STMT_COPY unit's COPY statements, made piece by piece on
 * the loop thread while the server reads the pieces before (pg.c), instead
 * of made whole beforehand as parameters. Called when the server asks for
 * the data of COPY number `copy` (0 for the query's first COPY), and again
 * each time the connection has sent what it was given: sets *data and *len
 * to the next piece (the source's own memory, valid until its next call)
 * and returns 1 while more follows, 0 with the COPY's last piece (*len may
 * be 0), -1 to abort the COPY (the transaction rolls back; the source
 * keeps its reason), or CB__COPY_LATER when the piece's makings are not
 * there yet: the connection then waits, sending nothing, until
 * cb__kick_copies (internal.h) asks again. `rows` is the result of the query's first statement
 * that returned rows, or NULL: what the data depends on, drawn in the same
 * transaction. The unit's caller waits meanwhile, so the source may read
 * and write its memory; or, for a stream (bus.c), it goes on making what
 * the source has not been told is there yet, and touches nothing else. */
#define CB__COPY_LATER 2
typedef int (*cb__copy_source)(void *arg, int copy, const cb_result *rows, const char **data, size_t *len);

/* Makes u's CB_STMT_COPY statement take its data from source (see above). */
void cb__unit_copy_source(cb_unit *u, cb__copy_source source, void *arg);

/* One statement of a unit: offsets into the unit's arena, so that the arena
 * may grow while the unit is being filled. */
typedef struct unit_stmt {
  size_t sql;       /* offset of the NUL-terminated SQL text */
  const char *kept; /* or the text itself, not copied (cb__unit_add_kept); NULL: at sql */
  uint64_t hash;    /* cb__sql_hash of the text, 0: not known yet */
  size_t params;    /* index of the first entry in param_offsets */
  int nparams;
  int flags; /* CB_STMT_* */
} unit_stmt;

#define PARAM_NULL ((size_t)-1)

struct cb_unit {
  unit_stmt *stmts;
  int nstmts, stmts_cap;
  size_t *param_offsets; /* arena offsets, PARAM_NULL for SQL NULL */
  size_t nparam_offsets, param_offsets_cap;
  char *arena;
  size_t arena_len, arena_cap;
  PGresult **results; /* one per statement, NULL until it arrives */
  int results_cap;
  int broken; /* the cb_code of the first add that failed (its message in err), 0: none */
  int status;
  cb_err err;
  cb_unit_done done;
  void *done_arg;
  cb_unit *next;               /* [runtime] */
  int group_end;               /* [runtime] last unit of a group that must share one connection */
  int to_listener;             /* [runtime] run on the listener connection */
  int reconnect_tried;         /* [runtime] it waited for a fresh connection once (pg.c) */
  cb__copy_source copy_source; /* a CB_STMT_COPY unit's data, made as it is sent; NULL: its parameters */
  void *copy_arg;
};

/* The SQL text of statement s of u. */
static inline const char *cb__stmt_sql(const cb_unit *u, const unit_stmt *s) {
  return s->kept ? s->kept : u->arena + s->sql;
}

/* The hash of a statement's SQL text by which connections find it among
 * the statements they have prepared (pg.c); never 0. */
uint64_t cb__sql_hash(const char *sql);

/* As cb_unit_add, but sql is neither copied nor hashed: the caller keeps the
 * text, unchanged, for as long as the unit may run (until it is freed or
 * reset), and gives its cb__sql_hash. For a statement a caller sends again
 * and again, whose text is kilobytes (bus.c's single send), copying and
 * hashing it is a good part of what the call costs the client.
 * cb_unit_append copies the text into the destination. */
int cb__unit_add_kept(cb_unit *u, const char *sql, uint64_t hash, int nparams, const char *const *params);

/* Completion of a unit (on the runtime's loop thread): keeps the first
 * failure (status, err; err NULL: the code's name), then calls on_done. */
void cb__unit_complete(cb_unit *u, int status, const cb_err *err);

#endif
