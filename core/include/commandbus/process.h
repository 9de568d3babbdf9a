/* commandbus: long-running processes (sagas), rcmd's `process` and
 * `process_audit` tables (see docs/architecture.md, "Data contract"). Statements
 * work on rcmd's own tables too, where `domain` is varchar(255) and
 * `process_audit.sent_at` has no default.
 *
 * A process is a row holding its type, status, current step and state (a JSON
 * object); each step sends one command whose correlation_id is the process id
 * and whose reply_to is the process's reply queue, and records it in
 * process_audit. What the steps are is decided by the binding's process
 * definition; the core only writes and reads the rows. */
#ifndef COMMANDBUS_PROCESS_H
#define COMMANDBUS_PROCESS_H

#include <stdint.h>

#include "commandbus/bus.h"
#include "commandbus/error.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cb_process_start_spec {
  const char *domain;       /* required: the process's and its commands' domain */
  const char *process_type; /* required, non-empty */
  const char *state_json;   /* a JSON object's text; NULL means {} */
  const char *step_name;    /* required, non-empty: the first step */
  const char *batch_id;     /* NULL: none; else a UUID */
} cb_process_start_spec;

/* Starts a process in one transaction: the process row (status WAITING,
 * current_step = step_name, state), the first step's command sent as
 * cb_bus_send would (row, queue message, SENT audit, notify) and its
 * process_audit row. The command's correlation_id is the new process id
 * (whatever first_command says); its reply_to (required) is the process's
 * reply queue, created here when missing. process_id (37 bytes) receives the
 * new process's UUIDv7, result the command's id and msg_id. A command id that
 * already exists in the domain fails with CB_EDUPLICATE and writes nothing. */
int cb_process_start(cb_runtime *rt, const cb_process_start_spec *spec, const cb_command_spec *first_command,
                     char *process_id, cb_send_result *result, cb_err *err);

/* ---- queries: each returns a completed unit (caller frees) whose last
 * statement holds the rows; columns are named as the record fields:
 * domain, process_id, type, status, current_step, state, error_code,
 * error_message, created_at, updated_at, completed_at, batch_id. ---------- */

typedef struct cb_process_filter {
  const char *domain;       /* required */
  const char *process_type; /* NULL: any */
  const char *status;       /* NULL: any */
  int limit;                /* <= 0: 100 */
  int offset;
} cb_process_filter;

/* CB_ENOTFOUND when there is no such process. */
int cb_process_get(cb_runtime *rt, const char *domain, const char *process_id, cb_unit **rows, cb_err *err);
/* Newest first. */
int cb_process_list(cb_runtime *rt, const cb_process_filter *filter, cb_unit **rows, cb_err *err);
/* The process's steps, oldest first: id, step_name, command_id, command_type,
 * command_data, sent_at, reply_outcome, reply_data, received_at.
 * CB_ENOTFOUND when there is no such process. */
int cb_process_audit(cb_runtime *rt, const char *domain, const char *process_id, cb_unit **rows, cb_err *err);

/* ---- the process-event log (commandbus.process_event; events.h says how
 * the core collects what its own writes appended) ------------------------- */

/* Appends a host event of event_type (1 to 100 bytes, not one of the names
 * the trigger uses) with data (a JSON object's text, NULL: {}) to a running
 * process; *sequence receives its number. CB_ENOTFOUND for no such process,
 * CB_ESTATE when it has finished. */
int cb_process_append_event(cb_runtime *rt, const char *domain, const char *process_id, const char *event_type,
                            const char *data_json, int64_t *sequence, cb_err *err);

/* The process's events after after_sequence, oldest first, as a completed
 * unit whose last statement holds the rows (caller frees); columns: domain,
 * process_id, sequence, event_type, step, status, data, created_at.
 * CB_ENOTFOUND for no such process. */
int cb_process_events(cb_runtime *rt, const char *domain, const char *process_id, int64_t after_sequence,
                      cb_unit **rows, cb_err *err);

/* Deletes finished processes (COMPLETED, COMPENSATED, FAILED, CANCELED)
 * whose completed_at is older than older_than seconds, with their events and
 * process_audit rows; *count receives how many. Wakes nobody: awaiters only
 * care about changes. */
int cb_process_purge(cb_runtime *rt, const char *domain, double older_than, int64_t *count, cb_err *err);

#ifdef __cplusplus
}
#endif
#endif
