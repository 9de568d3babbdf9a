/* commandbus: troubleshooting queue actions (see tsq.h). */
#include "commandbus/tsq.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commandbus/events.h"
#include "commandbus/log.h"
#include "commandbus/bus.h"
#include "commandbus/queue.h"
#include "queue_layout.h"
#include "strbuf.h"

int cb_tsq_list(cb_runtime *rt, const char *domain, const char *command_type, int limit, int offset, cb_unit **rows,
                int64_t *total, cb_err *err) {
  *rows = NULL;
  *total = 0;
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (offset < 0) return cb_err_set(err, CB_EINVAL, "offset must not be negative");
  char queue[CB_QUEUE_NAME_MAX + 1], l[16], o[16];
  cb_command_queue_name(domain, queue);
  rc = cb_bus_ensure_queue(rt, queue, err); /* the archive table must exist */
  if (rc != CB_OK) return rc;
  snprintf(l, sizeof l, "%d", limit > 0 ? limit : 100);
  snprintf(o, sizeof o, "%d", offset);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {domain, command_type, l, o};
  cb_unit_add(u,
              "SELECT count(*) FROM commandbus.command WHERE domain = $1 AND status = 'IN_TROUBLESHOOTING_QUEUE'"
              " AND ($2::text IS NULL OR command_type = $2)",
              2, params);
  cb_strbuf sql = {0};
  cb_strbuf_puts(&sql,
                 "SELECT c.domain, c.command_id::text AS command_id, c.command_type AS type, c.status, c.attempts,"
                 " c.max_attempts, c.msg_id, c.last_error_type, c.last_error_code, c.last_error_msg,"
                 " c.correlation_id::text AS correlation_id, nullif(c.reply_queue, '') AS reply_to,"
                 " c.batch_id::text AS batch_id, c.created_at::text AS created_at, c.updated_at::text AS updated_at,"
                 " a.message AS payload, a.message->'data' AS data FROM commandbus.command c LEFT JOIN ");
  cb_queue_sql_archive_table(&sql, queue);
  cb_strbuf_puts(&sql,
                 " a ON a.msg_id = c.msg_id WHERE c.domain = $1 AND c.status = 'IN_TROUBLESHOOTING_QUEUE'"
                 " AND ($2::text IS NULL OR c.command_type = $2) ORDER BY c.updated_at, c.command_id"
                 " LIMIT $3::int OFFSET $4::int");
  if (sql.failed || cb_unit_add(u, sql.data, 4, params) < 0) {
    cb_strbuf_free(&sql);
    cb_unit_free(u);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  cb_strbuf_free(&sql);
  rc = cb_runtime_exec(rt, u, err);
  if (rc != CB_OK) {
    cb_unit_free(u);
    return rc;
  }
  *total = cb_result_int(cb_unit_result(u, 0), 0, 0);
  *rows = u;
  return CB_OK;
}

/* Finds the command and checks that it is in the TSQ; fills its reply queue
 * ("" for none) and batch id ("" for none). */
static int precheck(cb_runtime *rt, const char *domain, const char *command_id, char *id, char *reply, char *batch,
                    cb_err *err) {
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (!cb_uuid_parse(command_id, id))
    return cb_err_set(err, CB_EINVAL, "command id `%.60s` is not a UUID", command_id ? command_id : "");
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {domain, id};
  cb_unit_add(u,
              "SELECT status, reply_queue, coalesce(batch_id::text, '') FROM commandbus.command"
              " WHERE domain = $1 AND command_id = $2::uuid",
              2, params);
  rc = cb_runtime_exec(rt, u, err);
  const cb_result *r = rc == CB_OK ? cb_unit_result(u, 0) : NULL;
  if (rc == CB_OK && cb_result_rows(r) == 0) {
    rc = cb_err_set(err, CB_ENOTFOUND, "unknown command `%s` in domain %s", id, domain);
  } else if (rc == CB_OK && strcmp(cb_result_value(r, 0, 0), "IN_TROUBLESHOOTING_QUEUE") != 0) {
    rc = cb_err_set(err, CB_ESTATE, "command %s is %s, not in the troubleshooting queue", id, cb_result_value(r, 0, 0));
  } else if (rc == CB_OK) {
    /* The reply queue becomes a name in SQL: checked whole, like a caller's,
     * before it is copied (a peer may have written anything there). */
    const char *stored = cb_result_value(r, 0, 1);
    reply[0] = '\0';
    if (stored[0] && cb_queue_name_valid(stored, NULL) == CB_OK) snprintf(reply, CB_QUEUE_NAME_MAX + 1, "%s", stored);
    else if (stored[0])
      cb_log(CB_LOG_ERROR, "tsq: command %s has an invalid reply queue `%.80s`; no reply sent", id, stored);
    snprintf(batch, CB_UUID_LEN + 1, "%s", cb_result_value(r, 0, 2));
  }
  cb_unit_free(u);
  return rc;
}

/* Refreshes a batch in a transaction of its own, after the action committed:
 * inside it, the refresh could not see a worker finishing the batch's last
 * other command at the same moment, and neither side would complete it. */
static void refresh_batch_after(cb_runtime *rt, const char *domain, const char *batch) {
  if (!batch[0]) return;
  cb_unit *u = cb_unit_new();
  if (u == NULL) return;
  cb_bus_add_batch_refresh(u, domain, batch);
  cb_err ignored; /* best effort: reading the batch refreshes it too */
  cb_runtime_exec(rt, u, &ignored);
  cb_unit_free(u);
}

/* Runs u; 0 rows from its main statement means someone else acted first. */
static int finish(cb_runtime *rt, cb_unit *u, int main_stmt, const char *id, cb_err *err) {
  int rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_OK && cb_result_rows(cb_unit_result(u, main_stmt)) == 0)
    rc = cb_err_set(err, CB_ESTATE, "command %s left the troubleshooting queue meanwhile", id);
  return rc;
}

/* The audit details' `reason`, when the operator gave one (parameter $n). */
#define WITH_REASON(n) \
  " || CASE WHEN $" #n "::text IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('reason', $" #n "::text) END"

int cb_tsq_retry(cb_runtime *rt, const char *domain, const char *command_id, const char *operator_name,
                 const char *reason, int64_t *new_msg_id, cb_err *err) {
  char id[CB_UUID_LEN + 1], reply[CB_QUEUE_NAME_MAX + 1], batch[CB_UUID_LEN + 1];
  int rc = precheck(rt, domain, command_id, id, reply, batch, err);
  if (rc != CB_OK) return rc;
  char queue[CB_QUEUE_NAME_MAX + 1];
  cb_command_queue_name(domain, queue);
  cb_strbuf sql = {0};
  cb_strbuf_puts(&sql,
                 "WITH c AS (SELECT k.msg_id FROM commandbus.command k WHERE k.domain = $1 AND k.command_id = $2::uuid"
                 " AND k.status = 'IN_TROUBLESHOOTING_QUEUE' FOR UPDATE), p AS (SELECT a.message FROM ");
  cb_queue_sql_archive_table(&sql, queue);
  cb_strbuf_puts(&sql, " a JOIN c ON a.msg_id = c.msg_id), m AS (");
  cb_queue_sql_insert(&sql, queue);
  cb_strbuf_puts(&sql,
                 " SELECT clock_timestamp(), p.message FROM p RETURNING msg_id),"
                 " u AS (UPDATE commandbus.command k SET status = 'PENDING', attempts = 0, msg_id = m.msg_id,"
                 " updated_at = now(), lease_expires_at = NULL FROM m WHERE k.domain = $1 AND k.command_id = $2::uuid),"
                 " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
                 " SELECT $1, $2::uuid, 'OPERATOR_RETRY', jsonb_build_object('operator', $3::text,"
                 " 'new_msg_id', m.msg_id)" WITH_REASON(4) " FROM m)"
                 " SELECT msg_id FROM m");
  /* A retried command is no longer in the TSQ; its awaiters keep waiting
   * (only this process's are told: others re-read when it finishes). */
  cb_unit *u = sql.failed ? NULL : cb_unit_new();
  if (u == NULL) {
    cb_strbuf_free(&sql);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  const char *params[] = {domain, id, operator_name ? operator_name : "operator", reason};
  cb_unit_add(u, sql.data, 4, params);
  cb_strbuf_free(&sql);
  cb_queue_add_notify(u, queue);
  /* The command's process (if it is a process step) waits for it again. */
  cb_events_add_begin(u);
  cb_unit_add(u,
              "UPDATE commandbus.process p SET status = 'WAITING', updated_at = now() FROM commandbus.command k"
              " WHERE k.domain = $1 AND k.command_id = $2::uuid AND p.domain = $1 AND p.process_id = k.correlation_id"
              " AND p.status = 'WAITING_FOR_TSQ'",
              2, params);
  int events = cb_events_add_read(u);
  rc = finish(rt, u, 0, id, err);
  if (rc == CB_OK) {
    cb_hub_changed(cb_runtime_hub(rt), domain, id); /* PENDING again */
    cb_events_published(rt, u, events);
  }
  if (rc == CB_ESTATE) rc = cb_err_set(err, CB_ESTATE, "command %s has no archived message to send again", id);
  if (rc == CB_OK && new_msg_id) *new_msg_id = cb_result_int(cb_unit_result(u, 0), 0, 0);
  cb_unit_free(u);
  if (rc == CB_OK) refresh_batch_after(rt, domain, batch);
  return rc;
}

/* Cancel and complete differ in status, audit event and reply. text is the
 * cancel's reason or the completion's result; reason is the completion's. */
static int close_command(cb_runtime *rt, const char *domain, const char *command_id, int complete, const char *text,
                         const char *operator_name, const char *reason, cb_err *err) {
  char id[CB_UUID_LEN + 1], reply[CB_QUEUE_NAME_MAX + 1], batch[CB_UUID_LEN + 1];
  int rc = precheck(rt, domain, command_id, id, reply, batch, err);
  if (rc != CB_OK) return rc;
  if (reply[0] && (rc = cb_bus_ensure_queue(rt, reply, err)) != CB_OK) return rc;
  cb_strbuf sql = {0};
  cb_strbuf_printf(&sql,
                   "WITH c AS (UPDATE commandbus.command SET status = '%s', updated_at = now(), lease_expires_at = NULL"
                   " WHERE domain = $1 AND command_id = $2::uuid AND status = 'IN_TROUBLESHOOTING_QUEUE'"
                   " RETURNING command_id, correlation_id, reply_queue),"
                   " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
                   " SELECT $1, command_id, '%s', jsonb_build_object('operator', $3::text, %s, 'reply_to',"
                   " nullif(reply_queue, ''))%s FROM c)",
                   complete ? "COMPLETED" : "CANCELED", complete ? "OPERATOR_COMPLETE" : "OPERATOR_CANCEL",
                   complete ? "'has_result_data', $4::jsonb IS NOT NULL" : "'reason', $4::text",
                   complete ? WITH_REASON(5) : "");
  if (reply[0]) {
    cb_strbuf_puts(&sql, ", r AS (");
    cb_queue_sql_insert(&sql, reply);
    cb_strbuf_printf(
        &sql,
        " SELECT clock_timestamp(), jsonb_build_object('command_id', command_id, 'correlation_id',"
        " correlation_id, %s) FROM c)",
        complete ? "'outcome', 'SUCCESS', 'result', $4::jsonb" : "'outcome', 'CANCELED', 'reason', $4::text");
  }
  cb_strbuf_puts(&sql, " SELECT command_id FROM c"); /* the table's trigger notifies awaiters elsewhere */
  cb_unit *u = cb_unit_new();
  if (u == NULL || sql.failed) {
    cb_strbuf_free(&sql);
    cb_unit_free(u);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  const char *params[] = {domain, id, operator_name ? operator_name : "operator", text, reason};
  cb_unit_add(u, sql.data, complete ? 5 : 4, params);
  cb_strbuf_free(&sql);
  if (reply[0]) cb_queue_add_notify(u, reply);
  rc = finish(rt, u, 0, id, err);
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22P02") == 0)
    rc = cb_err_set(err, CB_EINVAL, "the result is not valid JSON: %s", err->message);
  if (rc == CB_OK) cb_hub_changed(cb_runtime_hub(rt), domain, id);
  if (rc == CB_OK) refresh_batch_after(rt, domain, batch);
  cb_unit_free(u);
  return rc;
}

int cb_tsq_cancel(cb_runtime *rt, const char *domain, const char *command_id, const char *reason,
                  const char *operator_name, cb_err *err) {
  return close_command(rt, domain, command_id, 0, reason ? reason : "", operator_name, NULL, err);
}

int cb_tsq_complete(cb_runtime *rt, const char *domain, const char *command_id, const char *result_json,
                    const char *operator_name, const char *reason, cb_err *err) {
  return close_command(rt, domain, command_id, 1, result_json, operator_name, reason, err);
}
