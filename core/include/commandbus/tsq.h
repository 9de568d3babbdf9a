/* commandbus: the troubleshooting queue (TSQ), where commands wait for an
 * operator after a permanent failure or exhausted retries.
 *
 * Each action is one transaction guarded by the command's status, so it
 * applies only to a command that is in the TSQ (CB_ESTATE otherwise,
 * CB_ENOTFOUND for an unknown command), writes its audit event, sends the
 * reply the command asked for (CANCELED or SUCCESS) and refreshes the
 * command's batch. */
#ifndef COMMANDBUS_TSQ_H
#define COMMANDBUS_TSQ_H

#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Items (with their archived payload and data) in the last statement of
 * *rows, the total number in the TSQ for the filter in *total. */
int cb_tsq_list(cb_runtime *rt, const char *domain, const char *command_type, int limit, int offset, cb_unit **rows,
                int64_t *total, cb_err *err);
/* operator_name (NULL: "operator") and reason (NULL: none) go into the
 * action's audit event. */

/* Sends the archived message again: status PENDING, attempts 0. */
int cb_tsq_retry(cb_runtime *rt, const char *domain, const char *command_id, const char *operator_name,
                 const char *reason, int64_t *new_msg_id, cb_err *err);
/* The reason also goes into the CANCELED reply. */
int cb_tsq_cancel(cb_runtime *rt, const char *domain, const char *command_id, const char *reason,
                  const char *operator_name, cb_err *err);
/* result_json: the reply's result (NULL for none). */
int cb_tsq_complete(cb_runtime *rt, const char *domain, const char *command_id, const char *result_json,
                    const char *operator_name, const char *reason, cb_err *err);

#ifdef __cplusplus
}
#endif
#endif
