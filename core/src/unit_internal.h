/* commandbus: the inside of a unit, shared by unit.c and the runtime that
 * runs units (runtime.c, pg.c). Not installed.
 *
 * The unit's own fields are filled by unit.c; those marked [runtime] belong
 * to the runtime while the unit is queued or in flight. */
#ifndef COMMANDBUS_UNIT_INTERNAL_H
#define COMMANDBUS_UNIT_INTERNAL_H

#include <libpq-fe.h>
#include <stddef.h>

#include "commandbus/unit.h"

/* One statement of a unit: offsets into the unit's arena, so that the arena
 * may grow while the unit is being filled. */
typedef struct unit_stmt {
  size_t sql;    /* offset of the NUL-terminated SQL text */
  size_t params; /* index of the first entry in param_offsets */
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
  cb_unit *next;       /* [runtime] */
  int group_end;       /* [runtime] last unit of a group that must share one connection */
  int to_listener;     /* [runtime] run on the listener connection */
  int reconnect_tried; /* [runtime] it waited for a fresh connection once (pg.c) */
};

/* Completion of a unit (on the runtime's loop thread): keeps the first
 * failure (status, err; err NULL: the code's name), then calls on_done. */
void cb__unit_complete(cb_unit *u, int status, const cb_err *err);

#endif
