/* commandbus core (internal): the plan settings of keyed transactions. */
#ifndef COMMANDBUS_KEYED_H
#define COMMANDBUS_KEYED_H

#include <stdio.h>

#include "commandbus/runtime.h"

/* Adds the first statement of a worker's or reply router's transaction:
 * SET LOCAL of the statement timeout (it ends with the transaction and never
 * leaks into the pooled session), of enable_seqscan and of jit. Every row
 * these transactions touch is found by key, a batch at a time, so a
 * sequential scan is never the right plan; left free, a plan made while a
 * table was small (prepared statements keep it until the next ANALYZE) may
 * scan the grown table once per batch or per row. (Turning hash and merge
 * joins off as well was measured: 25% slower.) JIT never pays for
 * statements this small, and when a sequential scan is unavoidable (an
 * index that is missing) enable_seqscan's penalty lifts the plan's cost over
 * the JIT thresholds: compiling the receive statement was measured at
 * 0.8 s, on every execution. Returns the statement's index. */
#define CB__KEYED_SETTINGS \
  "SELECT set_config('statement_timeout', $1, true), set_config('enable_seqscan', 'off', true), set_config('jit', 'off', true)"
static inline int cb__keyed_begin(cb_unit *u, double statement_timeout, int generic) {
  char ms[32];
  snprintf(ms, sizeof ms, "%d", (int)(statement_timeout * 1000));
  const char *p[] = {ms};
  return cb_unit_add(
      u,
      generic ? CB__KEYED_SETTINGS ", set_config('plan_cache_mode', 'force_generic_plan', true)" : CB__KEYED_SETTINGS,
      1, p);
}

static inline int cb_add_keyed_begin(cb_unit *u, double statement_timeout) {
  return cb__keyed_begin(u, statement_timeout, 0);
}

/* The same, and the transaction's statements use their generic plans
 * (plan_cache_mode). A statement whose generic plan PostgreSQL costs above
 * its custom ones, as it does the worker's acknowledgement (the domain,
 * unknown to a generic plan, is estimated to match many rows), is
 * otherwise planned again at every execution: measured some 12% of a
 * worker backend's CPU over one request at a time (perf: pg_plan_query).
 * Only for statements whose generic plan is the same key lookups. */
static inline int cb_add_keyed_begin_generic(cb_unit *u, double statement_timeout) {
  return cb__keyed_begin(u, statement_timeout, 1);
}

/* A row's status, tested without an index. These statements find their rows
 * by key; were the status test indexable, a plan made while the table was
 * small would walk every row in that status instead (measured 2x slower on a
 * fresh database). */
#define CB_STATUS_OF(alias) "(" alias ".status || '')"

#endif
