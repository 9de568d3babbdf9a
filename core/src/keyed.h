/* commandbus core (internal): the plan settings of keyed transactions. */
#ifndef COMMANDBUS_KEYED_H
#define COMMANDBUS_KEYED_H

/* The first statement of the worker's and reply router's transactions: SET
 * LOCAL of the statement timeout ($1, in ms: it ends with the transaction
 * and never leaks into the pooled session) and of enable_seqscan. Every row
 * these transactions touch is found by key, a batch at a time, so a
 * sequential scan is never the right plan; left free, a plan made while a
 * table was small (prepared statements keep it until the next ANALYZE) may
 * scan the grown table once per batch or per row. (Turning hash and merge
 * joins off as well was measured: 25% slower.) */
#define CB_KEYED_TRANSACTION_SQL \
  "SELECT set_config('statement_timeout', $1, true), set_config('enable_seqscan', 'off', true)"

#endif
