/* commandbus: the worker's SQL (see worker_internal.h): the receive
 * statement, setting poison messages aside, and one acknowledgement
 * statement per kind of outcome. The queue's own tables are named through
 * queue_layout.h. */
#include "keyed.h"
#include "worker_internal.h"

/* A message is received only when it is its command's current message
 * (command.msg_id): a redelivery after a crash is, a stray second message for
 * the same command is not, and is set aside as DUPLICATE_MESSAGE.
 *
 * Every lookup names its keys with `= ANY(ARRAY(...))`: joins against a CTE
 * are planned from statistics, and a queue workload keeps them stale (a
 * domain seen as one row led to a nested loop over all its commands for each
 * message). Key conditions make the plan primary-key lookups whatever the
 * statistics say. The pairing of a command with its current message is
 * tested against the set of received (msg_id, command_id) pairs, hashed once
 * per statement: written as a join, the planner (which expects few received
 * rows) filters every command against every row, 10,000 comparisons for a
 * fetch of 100, a third of the statement's time. Wrapped in coalesce(), the
 * IN cannot be turned into that join and stays a hashed subplan, a probe per
 * command; it replaced a JSON object (msg_id -> command_id) built from the
 * received rows and looked up per command, which cost some 2-3 us a command
 * more (building the object, then a text key and a uuid cast per command;
 * EXPLAIN ANALYZE of a fetch of 100).
 *
 * Messages are taken by priority: first those above 0 from the queue's
 * partial priority index (which holds only messages with a priority), then
 * those at 0 in msg_id order, then those below 0. Each source is read only as
 * far as the fetch needs (a LIMIT over the three reads lazily). The read at
 * priority 0 tests `NOT (message ? 'priority')` first: the planner has no
 * statistics on priority_of(message) and would guess that few messages are
 * at 0, then read the whole queue and sort it on every fetch instead of
 * walking msg_id order; messages without the key are what it expects almost
 * all messages to be, as they are. The read at
 * priority 0 starts at msg_id $4 (see scan_from): under a transaction that
 * holds back vacuum, the dead entries of every message completed since it
 * began lie below that mark, and the index scan would otherwise step over
 * them all on every fetch.
 *
 * Limits per command type (commandbus.type_limit; the previous statement of
 * the transaction locked the domain's rows, so that every worker counts the
 * same numbers): types with no room left are not read, and of the others no
 * more than their room is received; the rest stay in the queue untouched
 * (not received, no attempt, no audit). Each received type's window count
 * goes up in the same statement. With no limits this costs a probe of an
 * empty table: with no full types each message's type is not looked up
 * (the comparison of the statement's one list with '{}' comes first and
 * settles the OR), and with no limits at all the fetch's messages are not
 * numbered by type (that branch's EXISTS is a one-time filter, so neither
 * its sort nor its window runs).
 *
 * That still sets up every node of the limits at each execution: a generic
 * plan's executor start initialises the whole tree (64 nodes), which for a
 * fetch of one message was a good part of the statement. So there are two
 * statements: with `limits` 0 the lean one leaves out room, full_types,
 * the numbering (kept) and the window's count (wnd), 42 nodes, and the
 * worker uses it while its domain had no limits at the last fetch (see
 * cb__worker_add_fetch). It reads the limits itself, in its own snapshot
 * as the full statement does: when the domain has any, a one-time filter
 * stops all three reads (nothing is locked, received or audited) and the
 * statement returns one row of its own, all nulls, which sends the worker's
 * next fetch through the full statement at once. The two return the same
 * rows otherwise (test_worker runs both on the same queue).
 *
 * The receive never waits for a command row. It locks messages first and
 * their commands second, while an acknowledgement (ours, and rcmd's
 * sp_finish_command) locks the command row first and then deletes,
 * archives or delays the message. A message read again (read_ct > 0: its
 * visibility timeout ran out, or its backoff ended) may belong to a
 * delivery whose acknowledgement is under way right now; had the receive
 * waited for that command row while holding the message, the
 * acknowledgement would wait for the message in turn: a deadlock, and until
 * PostgreSQL broke it every other message of the fetch was held up with it
 * (bench-throughput stalled that way behind a slow checkpoint). So the
 * commands of messages read again are locked first with SKIP LOCKED (taken),
 * and a message whose command is locked by someone else (busy) is left in
 * the queue as it is: not received, no attempt, no audit; a later fetch
 * finds it if the acknowledgement did not remove it. A message read for the
 * first time names a command no acknowledgement can hold (none has had a
 * delivery of it), so its command is only updated, at no extra cost. A
 * command that does not exist is neither taken nor busy, and its message is
 * set aside as before. */
void cb__worker_sql_receive(cb_strbuf *sql, const char *queue, int limits) {
/* Limits: types with no room left are not read (full_types). */
#define NOT_FULL                            \
  " AND ((SELECT t FROM full_types) = '{}'" \
  " OR NOT coalesce(message->>'command_type' = ANY((SELECT t FROM full_types)::text[]), false))"
#define AGAIN " CASE WHEN read_ct > 0 THEN commandbus.message_command_id(message) END AS again, ctid AS at"
/* Whether the domain has limits, as this statement sees the table. */
#define HAS_LIMITS "EXISTS (SELECT FROM commandbus.type_limit WHERE domain = $3)"
  const char *not_full = limits ? NOT_FULL : "";
  const char *type = limits ? " message->>'command_type' AS type," : "";
  /* What the reads keep for the rest: `kept` (the limits applied) or `pick`. */
  const char *kept = limits ? "kept" : "pick";
  cb_strbuf_puts(sql, "WITH ");
  if (limits)
    cb_strbuf_puts(sql,
                   "room AS (SELECT command_type, room FROM commandbus.type_room($3)),"
                   " full_types AS (SELECT coalesce(array_agg(command_type) FILTER (WHERE room <= 0), '{}') AS t"
                   " FROM room), ");
  cb_strbuf_printf(sql, "hi AS (SELECT msg_id,%s commandbus.priority_of(message) AS prio," AGAIN " FROM ", type);
  cb_queue_sql_table(sql, queue);
  cb_strbuf_printf(sql,
                   " WHERE commandbus.priority_of(message) > 0 AND " CB_QUEUE_SQL_VISIBLE
                   "%s ORDER BY commandbus.priority_of(message) DESC, msg_id LIMIT $1::int FOR UPDATE SKIP LOCKED),"
                   " mid AS (SELECT msg_id,%s 0 AS prio," AGAIN " FROM ",
                   not_full, type);
  cb_queue_sql_table(sql, queue);
  cb_strbuf_printf(sql,
                   " WHERE msg_id >= $4::bigint AND " CB_QUEUE_SQL_VISIBLE
                   " AND (NOT (message ? 'priority') OR coalesce(commandbus.priority_of(message), 0) = 0)%s"
                   " ORDER BY msg_id LIMIT $1::int FOR UPDATE SKIP LOCKED),"
                   " lo AS (SELECT msg_id,%s commandbus.priority_of(message) AS prio," AGAIN " FROM ",
                   not_full, type);
  cb_queue_sql_table(sql, queue);
  cb_strbuf_printf(
      sql,
      " WHERE commandbus.priority_of(message) < 0 AND " CB_QUEUE_SQL_VISIBLE
      "%s ORDER BY commandbus.priority_of(message) DESC, msg_id LIMIT $1::int FOR UPDATE SKIP LOCKED),"
      " pick AS (SELECT * FROM (SELECT * FROM hi UNION ALL SELECT * FROM mid UNION ALL SELECT * FROM lo) x",
      not_full);
  if (limits)
    cb_strbuf_puts(sql,
                   " LIMIT $1::int),"
                   " kept AS (SELECT msg_id, again, at FROM pick WHERE NOT EXISTS (SELECT FROM room)"
                   " UNION ALL SELECT p.msg_id, p.again, p.at FROM (SELECT msg_id, type, again, at, row_number() OVER"
                   " (PARTITION BY type ORDER BY prio DESC, msg_id) AS nth FROM pick WHERE EXISTS (SELECT FROM room)) p"
                   " LEFT JOIN room r ON r.command_type = p.type WHERE r.room IS NULL OR p.nth <= r.room),");
  else /* a one-time filter: with limits, no read runs */
    cb_strbuf_puts(sql, " WHERE NOT " HAS_LIMITS " LIMIT $1::int),");
  cb_strbuf_printf(sql,
                   " taken AS (SELECT k.command_id FROM commandbus.command k WHERE k.domain = $3"
                   " AND k.command_id = ANY(ARRAY(SELECT again FROM %s WHERE again IS NOT NULL))"
                   " FOR NO KEY UPDATE OF k SKIP LOCKED),"
                   " busy AS (SELECT k.command_id FROM commandbus.command k WHERE k.domain = $3"
                   " AND k.command_id = ANY(ARRAY(SELECT again FROM %s WHERE again IS NOT NULL))"
                   " AND k.command_id <> ALL(ARRAY(SELECT command_id FROM taken))),"
                   " m AS (",
                   kept, kept);
  char ctids[160];
  snprintf(ctids, sizeof ctids,
           "ARRAY(SELECT at FROM %s WHERE again IS NULL OR again <> ALL(ARRAY(SELECT command_id FROM busy)))", kept);
  cb_queue_sql_receive_locked(sql, queue, ctids, "$2::float8");
  cb_strbuf_puts(sql,
                 " RETURNING q.msg_id, q.read_ct, q.message, commandbus.priority_of(q.message) AS priority,"
                 " commandbus.message_command_id(q.message) AS command_id),"
                 " c AS (UPDATE commandbus.command k SET attempts = k.attempts + 1, status = 'IN_PROGRESS',"
                 " updated_at = now(), lease_expires_at = clock_timestamp() + make_interval(secs => $2::float8)"
                 " WHERE k.domain = $3 AND k.command_id = ANY(ARRAY(SELECT command_id FROM m WHERE command_id IS NOT NULL))"
                 " AND coalesce((k.msg_id, k.command_id) IN (SELECT msg_id, command_id FROM m), false)"
                 " AND " CB_STATUS_OF("k") " IN ('PENDING', 'IN_PROGRESS')"
                 " RETURNING k.command_id, k.command_type, k.attempts, k.max_attempts, k.correlation_id,"
                 " k.reply_queue, k.batch_id, k.msg_id),"
                 " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
                 " SELECT $3, command_id, 'RECEIVED', jsonb_build_object('msg_id', msg_id, 'attempt', attempts,"
                 " 'max_attempts', max_attempts) FROM c)");
  if (limits)
    cb_strbuf_puts(sql,
                   ", wnd AS (UPDATE commandbus.type_limit t SET window_start = date_trunc('second', now()),"
                   " window_taken = CASE WHEN t.window_start = date_trunc('second', now()) THEN t.window_taken"
                   " ELSE 0 END + x.n"
                   " FROM (SELECT command_type, count(*) AS n FROM c GROUP BY command_type) x"
                   " WHERE t.domain = $3 AND t.command_type = x.command_type AND t.per_second IS NOT NULL)");
  cb_strbuf_puts(sql,
                 " SELECT m.msg_id, m.read_ct, c.command_id::text, c.command_type, (m.message->'data')::text,"
                 " c.attempts, c.max_attempts, c.correlation_id::text, nullif(c.reply_queue, ''), c.batch_id::text,"
                 " jsonb_typeof(m.message), m.command_id::text,"
                 " CASE WHEN c.command_id IS NULL THEN (SELECT k2.status FROM commandbus.command k2"
                 " WHERE k2.domain = $3 AND k2.command_id = m.command_id) END, coalesce(m.priority, 0)"
                 " FROM m LEFT JOIN c ON c.msg_id = m.msg_id");
  if (limits) cb_strbuf_puts(sql, " ORDER BY coalesce(m.priority, 0) DESC, m.msg_id");
  else /* the sign that limits appeared: a row of its own, msg_id null */
    cb_strbuf_puts(sql,
                   " UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
                   " NULL, NULL WHERE " HAS_LIMITS " ORDER BY 14 DESC, 1");
#undef HAS_LIMITS
#undef AGAIN
#undef NOT_FULL
}

/* Archives poison messages with an audit row each (reason in the details). */
void cb__worker_sql_set_aside(cb_strbuf *sql, const char *queue) {
  cb_strbuf_puts(sql,
                 "WITH i AS (SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(msg bigint, id uuid, reason text)), ");
  cb_queue_sql_archive(sql, queue, "ARRAY(SELECT msg FROM i)");
  cb_strbuf_puts(sql,
                 ", a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
                 " SELECT $1, coalesce(i.id, '00000000-0000-0000-0000-000000000000'), 'MESSAGE_REJECTED',"
                 " jsonb_build_object('msg_id', i.msg, 'reason', i.reason, 'queue', $3::text) FROM i)"
                 " SELECT count(*) FROM x");
}

/* The reply CTEs for the listed reply queues (names are validated queue names:
 * they were checked when the command was sent, and again before a round). */
static void reply_ctes(cb_strbuf *sql, char reply[][CB_QUEUE_NAME_MAX + 1], int nreply, const char *message) {
  for (int i = 0; i < nreply; i++) {
    cb_strbuf_printf(sql, ", r%d AS (", i);
    cb_queue_sql_insert(sql, reply[i]);
    cb_strbuf_printf(sql, " SELECT clock_timestamp(), %s FROM c WHERE reply_queue = '%s')", message, reply[i]);
  }
}

/* What each kind's statement does to its commands: the input's columns
 * (besides id, msg and attempt), the columns it sets (besides updated_at
 * and lease_expires_at), what the moved rows return (besides command_id and
 * batch_id), and their audit row's event type and details. */
static const struct {
  const char *input, *set, *returning, *audit;
} ACK_SQL[ACK_KINDS] = {
    [ACK_SUCCESS] = {"result jsonb, has bool", "status = 'COMPLETED'",
                     "k.correlation_id, k.reply_queue, i.msg, i.result, i.has",
                     "'COMPLETED', jsonb_build_object('msg_id', msg, 'reply_to', nullif(reply_queue, ''),"
                     " 'has_result', has)"},
    [ACK_RETRY] = {"code text, message text, delay float8",
                   "last_error_type = 'TRANSIENT', last_error_code = i.code, last_error_msg = i.message",
                   "k.attempts, k.max_attempts, i.msg, i.code, i.message, i.delay",
                   "'FAILED', jsonb_build_object('msg_id', msg, 'attempt', attempts, 'max_attempts', max_attempts,"
                   " 'error_type', 'TRANSIENT', 'error_code', code, 'error_msg', message)"},
    /* One MOVED_TO_TSQ event, with rcmd's details: an exhausted command's
     * last error, or a permanent failure's code, message and details. */
    [ACK_TSQ] = {"code text, message text, etype text, exhausted bool, details jsonb",
                 "status = 'IN_TROUBLESHOOTING_QUEUE', last_error_type = i.etype, last_error_code = i.code,"
                 " last_error_msg = i.message",
                 "k.attempts, k.max_attempts, k.correlation_id, i.msg, i.code, i.message, i.etype, i.exhausted,"
                 " i.details",
                 "'MOVED_TO_TSQ', CASE WHEN exhausted THEN jsonb_build_object('msg_id', msg, 'attempt', attempts,"
                 " 'max_attempts', max_attempts, 'reason', 'EXHAUSTED', 'error_type', etype, 'error_code', code,"
                 " 'error_msg', message) ELSE jsonb_build_object('msg_id', msg, 'attempt', attempts,"
                 " 'error_code', code, 'error_msg', message, 'error_details', details) END"},
    [ACK_FAILED] = {"code text, message text, details jsonb",
                    "status = 'FAILED', last_error_type = 'BUSINESS_RULE', last_error_code = i.code,"
                    " last_error_msg = i.message",
                    "k.correlation_id, k.reply_queue, k.attempts, i.msg, i.code, i.message, i.details",
                    "'BUSINESS_RULE_FAILED', jsonb_build_object('msg_id', msg, 'attempt', attempts,"
                    " 'error_code', code, 'error_msg', message, 'error_details', details)"},
};

/* The moved commands (c) and their audit rows (a), as CTEs, ready for the
 * next. A command moves only when it is still IN_PROGRESS *at the attempt
 * this outcome belongs to* (a delivery that outlived its visibility timeout
 * may have been received again elsewhere: its late outcome must not touch
 * the newer delivery). */
static void ack_move(cb_strbuf *sql, int kind) {
  cb_strbuf_printf(sql,
                   "WITH i AS (SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(id uuid, msg bigint, attempt int, %s)),"
                   " c AS (UPDATE commandbus.command k SET %s, updated_at = now(), lease_expires_at = NULL"
                   " FROM i WHERE k.domain = $1 AND k.command_id = i.id AND k.command_id = ANY(ARRAY(SELECT id FROM i))"
                   " AND k.attempts = i.attempt AND " CB_STATUS_OF("k") " = 'IN_PROGRESS'"
                   " RETURNING k.command_id, k.batch_id, %s),"
                   " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
                   " SELECT $1, command_id, %s FROM c), ",
                   ACK_SQL[kind].input, ACK_SQL[kind].set, ACK_SQL[kind].returning, ACK_SQL[kind].audit);
}

/* What each kind does to the queue's messages, after ack_move. */
static void ack_queue(cb_strbuf *sql, const char *queue, int kind) {
  switch (kind) {
    case ACK_SUCCESS:
      cb_strbuf_puts(sql, "d AS (");
      cb_queue_sql_delete(sql, queue, "ARRAY(SELECT msg FROM c)");
      cb_strbuf_putc(sql, ')');
      break;
    case ACK_RETRY:
      cb_strbuf_puts(sql, "v AS (");
      cb_queue_sql_set_vt(sql, queue, "c.delay");
      cb_strbuf_puts(sql, " FROM c WHERE q.msg_id = c.msg)");
      break;
    case ACK_TSQ:
      cb_queue_sql_archive(sql, queue, "ARRAY(SELECT msg FROM c)");
      /* A process step that lands in the TSQ pauses its process until the
       * operator acts (a probe by key; commands of no process change
       * nothing). */
      cb_strbuf_puts(
          sql,
          ", pw AS (UPDATE commandbus.process pr SET status = 'WAITING_FOR_TSQ', updated_at = now() FROM c"
          " WHERE pr.domain = $1 AND pr.process_id = c.correlation_id AND " CB_STATUS_OF("pr") " = 'WAITING')");
      break;
    case ACK_FAILED: cb_queue_sql_archive(sql, queue, "ARRAY(SELECT msg FROM c)"); break;
  }
}

/* Each statement touches the queue only for the commands it moved. */
void cb__worker_sql_ack(cb_strbuf *sql, const char *queue, int kind, char reply[][CB_QUEUE_NAME_MAX + 1], int nreply) {
  cb_strbuf_reset(sql);
  ack_move(sql, kind);
  ack_queue(sql, queue, kind);
  switch (kind) {
    case ACK_SUCCESS:
      reply_ctes(sql, reply, nreply,
                 "jsonb_build_object('command_id', command_id, 'correlation_id', correlation_id,"
                 " 'outcome', 'SUCCESS', 'result', result)");
      break;
    case ACK_FAILED:
      reply_ctes(sql, reply, nreply,
                 "jsonb_build_object('command_id', command_id, 'correlation_id', correlation_id,"
                 " 'outcome', 'FAILED', 'result', jsonb_build_object('error_code', code, 'error_message', message,"
                 " 'error_details', details), 'error_code', code, 'error_message', message)");
      break;
  }
  /* Other processes hear of the change from the command table's trigger
   * (core/sql/004_command_notify.sql), only when someone awaits it. */
  cb_strbuf_puts(sql, " SELECT command_id::text AS command_id, batch_id::text AS batch_id FROM c");
}
