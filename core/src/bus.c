/* commandbus: sending commands and reading them back (see bus.h). */
#include "commandbus/bus.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h" /* cb__kick_copies */
#include "queue_layout.h"
#include "strbuf.h"
#include "unit_internal.h"

#define SEND_CHUNK 1000 /* commands per statement: bounded parameter size */
#define SEND_DEDUP 1    /* a command of the send has a dedup key */
#define SEND_GIVEN_ID 2 /* a command of the send has an id its caller gave */

int cb_domain_valid(const char *domain, cb_err *err) {
  if (domain == NULL) return cb_err_set(err, CB_EINVAL, "domain expected, got nothing");
  if (strlen(domain) > CB_DOMAIN_MAX)
    return cb_err_set(err, CB_EINVAL, "domain `%.60s` is longer than %d bytes", domain, CB_DOMAIN_MAX);
  if (cb_queue_name_valid(domain, NULL) != CB_OK)
    return cb_err_set(err, CB_EINVAL,
                      "invalid domain `%.60s`: use lower-case letters, digits and _, not starting with a digit",
                      domain);
  return CB_OK;
}

void cb_command_queue_name(const char *domain, char *out) {
  cb_str_join(out, CB_QUEUE_NAME_MAX + 1, domain, "__commands");
}

int cb_bus_ensure_queue(cb_runtime *rt, const char *queue, cb_err *err) {
  char key[80];
  cb_str_join(key, sizeof key, "queue:", queue);
  if (cb_runtime_remembers(rt, key)) return CB_OK;
  int rc = cb_queue_create(rt, queue, err);
  if (rc == CB_OK) cb_runtime_remember(rt, key);
  return rc;
}

int cb_bus_ensure_command_queue(cb_runtime *rt, const char *domain, int again, cb_err *err) {
  char queue[CB_QUEUE_NAME_MAX + 1], key[80];
  cb_command_queue_name(domain, queue);
  cb_str_join(key, sizeof key, "command queue:", queue);
  if (!again && cb_runtime_remembers(rt, key)) return CB_OK;
  int rc = again ? cb_queue_create(rt, queue, err) : cb_bus_ensure_queue(rt, queue, err);
  /* Only messages with a priority other than 0 are in this index, so that
   * commands sent without one pay nothing for it but the test of the
   * predicate; the worker reads it first (see the worker's receive). */
  if (rc == CB_OK)
    rc = cb_queue_ensure_index(
        rt, queue, "priority_idx",
        "(commandbus.priority_of(message) DESC, msg_id) WHERE commandbus.priority_of(message) <> 0", err);
  /* Room for a message's next version beside it: reading it (hidden for
   * the visibility timeout) writes one (see core/sql/008). */
  if (rc == CB_OK) rc = cb_queue_ensure_fillfactor(rt, queue, 50, err);
  if (rc == CB_OK) cb_runtime_remember(rt, key);
  return rc;
}

/* ---- send -------------------------------------------------------------------- */

/* A delay as the send statements bind it, "%.6f"; 0, nearly every send's,
 * without formatting a double. */
static void delay_param(char out[32], double delay) {
  if (delay == 0) memcpy(out, "0.000000", sizeof "0.000000");
  else snprintf(out, 32, "%.6f", delay);
}

static int check_spec(const cb_command_spec *s, size_t i, char *id, char *corr, char *batch, cb_err *err) {
  if (s->command_type == NULL || s->command_type[0] == '\0')
    return cb_err_set(err, CB_EINVAL, "command #%zu: type is required", i + 1);
  if (s->command_id) {
    if (!cb_uuid_parse(s->command_id, id))
      return cb_err_set(err, CB_EINVAL, "command #%zu: id `%.60s` is not a UUID", i + 1, s->command_id);
  } else {
    cb_uuid_v7(id);
  }
  if (s->correlation_id) {
    if (!cb_uuid_parse(s->correlation_id, corr))
      return cb_err_set(err, CB_EINVAL, "command #%zu: correlation_id `%.60s` is not a UUID", i + 1, s->correlation_id);
  } else {
    cb_uuid_v7(corr);
  }
  batch[0] = '\0';
  if (s->batch_id && !cb_uuid_parse(s->batch_id, batch))
    return cb_err_set(err, CB_EINVAL, "command #%zu: batch_id `%.60s` is not a UUID", i + 1, s->batch_id);
  if (s->reply_to && s->reply_to[0]) {
    cb_err why;
    if (cb_queue_name_valid(s->reply_to, &why) != CB_OK)
      return cb_err_set(err, CB_EINVAL, "command #%zu: reply_to: %s", i + 1, why.message);
  }
  if (s->max_attempts > 1000)
    return cb_err_set(err, CB_EINVAL, "command #%zu: max_attempts %d is more than 1000", i + 1, s->max_attempts);
  if (s->priority < CB_PRIORITY_MIN || s->priority > CB_PRIORITY_MAX)
    return cb_err_set(err, CB_EINVAL, "command #%zu: priority %d is outside %d..%d", i + 1, s->priority,
                      CB_PRIORITY_MIN, CB_PRIORITY_MAX);
  if (s->dedup_key && (s->dedup_key[0] == '\0' || strlen(s->dedup_key) > CB_DEDUP_KEY_MAX))
    return cb_err_set(err, CB_EINVAL, "command #%zu: dedup_key must be 1 to %d bytes", i + 1, CB_DEDUP_KEY_MAX);
  if (s->dedup_key && !(s->dedup_for > 0))
    return cb_err_set(err, CB_EINVAL, "command #%zu: dedup_key needs dedup_for, a positive number of seconds", i + 1);
  if (!s->dedup_key && s->dedup_for != 0)
    return cb_err_set(err, CB_EINVAL, "command #%zu: dedup_for needs a dedup_key", i + 1);
  return CB_OK;
}

/* The statement that sends commands: commands first (ON CONFLICT DO NOTHING
 * tells duplicates apart without an error; without it, refusing duplicates,
 * an existing id fails the statement on the command's key), then messages
 * and SENT audit rows for the fresh ones only. The message id is drawn from
 * the queue's identity sequence up front so that the command row carries it
 * from the start.
 *
 * The commands come from `source`, rows (v jsonb, ord bigint) of JSON
 * objects {id, corr, type, data, reply, max, batch, prio, dedup, dedup_for},
 * which may be defined by CTEs in `prefix` (each followed by a comma); the
 * plain send's source is its JSON array $1. $2 is the domain, $3 the delay.
 * With `dedup`, commands carrying a dedup key claim it first
 * (SEND_DEDUP_CTES) and a command whose key another holds is not sent; the
 * result then has a third column, the id of the command holding the key.
 * Priority rides in the message only when it is not 0, so that messages
 * without one are what they always were. */
#define SEND_DEDUP_CTES                                                                                 \
  " claims AS (INSERT INTO commandbus.dedup AS d (domain, dedup_key, command_id, expires_at)"           \
  " SELECT DISTINCT ON (dedup_key) $2, dedup_key, command_id, now() + make_interval(secs => dedup_for)" \
  " FROM firsts WHERE dedup_key IS NOT NULL ORDER BY dedup_key, ord"                                    \
  " ON CONFLICT (domain, dedup_key) DO UPDATE SET"                                                      \
  " command_id = CASE WHEN d.expires_at <= now() THEN excluded.command_id ELSE d.command_id END,"       \
  " expires_at = CASE WHEN d.expires_at <= now() THEN excluded.expires_at ELSE d.expires_at END"        \
  " RETURNING d.dedup_key, d.command_id),"
static int send_sql(char *sql, size_t len, const char *queue, const char *prefix, const char *source, int dedup,
                    int refuse_duplicates) {
  int n = snprintf(
      sql, len,
      "WITH %s input AS ("
      " SELECT e.ord, (e.v->>'id')::uuid AS command_id, e.v->>'type' AS command_type,"
      " coalesce(e.v->'data', '{}'::jsonb) AS data, (e.v->>'corr')::uuid AS correlation_id,"
      " coalesce(e.v->>'reply', '') AS reply_to, (e.v->>'max')::int AS max_attempts,"
      " (e.v->>'batch')::uuid AS batch_id, coalesce((e.v->>'prio')::int, 0) AS priority,"
      " e.v->>'dedup' AS dedup_key, (e.v->>'dedup_for')::float8 AS dedup_for"
      " FROM %s AS e(v, ord)),"
      /* The first of several commands with one id in the same call is
       * sent; the later ones are duplicates like any existing id. */
      " firsts AS (SELECT DISTINCT ON (command_id) * FROM input ORDER BY command_id, ord),%s"
      " fresh AS (INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id, command_type,"
      " status, attempts, max_attempts, reply_queue, correlation_id, batch_id)"
      " SELECT $2, '%s', nextval('pgmq.q_%s_msg_id_seq'), command_id, command_type, 'PENDING', 0,"
      " max_attempts, reply_to, correlation_id, batch_id FROM firsts f%s ORDER BY ord"
      "%s RETURNING command_id, msg_id),"
      " msgs AS (INSERT INTO pgmq.q_%s (msg_id, vt, message) OVERRIDING SYSTEM VALUE"
      " SELECT f.msg_id, clock_timestamp() + make_interval(secs => $3::float8),"
      " jsonb_build_object('domain', $2::text, 'command_type', i.command_type, 'command_id', i.command_id,"
      " 'correlation_id', i.correlation_id, 'data', i.data)"
      " || CASE WHEN i.reply_to <> '' THEN jsonb_build_object('reply_to', i.reply_to) ELSE '{}'::jsonb END"
      " || CASE WHEN i.priority <> 0 THEN jsonb_build_object('priority', i.priority) ELSE '{}'::jsonb END"
      " FROM fresh f JOIN firsts i USING (command_id) ORDER BY f.msg_id),"
      " audit AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
      " SELECT $2, i.command_id, 'SENT', jsonb_build_object('command_type', i.command_type,"
      " 'correlation_id', i.correlation_id, 'reply_to', nullif(i.reply_to, ''), 'msg_id', f.msg_id,"
      " 'batch_id', i.batch_id) FROM fresh f JOIN firsts i USING (command_id))"
      " SELECT i.command_id::text, CASE WHEN i.ord = fi.ord THEN coalesce(f.msg_id, 0) ELSE 0 END%s"
      " FROM input i LEFT JOIN fresh f USING (command_id) LEFT JOIN firsts fi USING (command_id)%s"
      " ORDER BY i.ord",
      prefix, source, dedup ? SEND_DEDUP_CTES : "", queue, queue,
      dedup ? " WHERE f.dedup_key IS NULL OR EXISTS (SELECT 1 FROM claims c WHERE c.dedup_key = f.dedup_key"
              " AND c.command_id = f.command_id)"
            : "",
      refuse_duplicates ? "" : " ON CONFLICT (domain, command_id) DO NOTHING", queue,
      dedup ? ", cl.command_id::text" : "", dedup ? " LEFT JOIN claims cl ON cl.dedup_key = i.dedup_key" : "");
  return n > 0 && (size_t)n < len ? CB_OK : CB_EINTERNAL;
}

/* The statement that sends one command without a dedup key: the same rows
 * as send_sql's, from parameters rather than a JSON array, without the
 * array's unpacking, ordering and joins (it executes in about 60% of the
 * time: a single send's cost is mostly this statement and its commit).
 * $1 domain, $2 delay, $3 id, $4 type, $5 max_attempts, $6 reply queue (''
 * for none), $7 correlation id, $8 batch id (NULL for none), $9 priority,
 * $10 data (JSON text, NULL for {}). One row: id, msg_id (0: a duplicate).
 * With `notify`, the statement also raises the queue's notification (as
 * cb_queue_add_notify's statement would, in the same transaction): one
 * statement rather than two costs the server a Bind and an Execute less
 * (and a portal, a snapshot) and the client a result less, on every
 * single send. */
static int send_one_sql(char *sql, size_t len, const char *queue, int refuse_duplicates, int notify) {
  char channel[CB_QUEUE_CHANNEL_MAX];
  cb_queue_channel(queue, channel);
  /* refuse_duplicates: an existing id fails the statement (as in send_sql);
   * also given when the id is new by construction (made by this call), so
   * that the insert needs no speculative insertion. */
  int n = snprintf(
      sql, len,
      "WITH fresh AS (INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id, command_type,"
      " status, attempts, max_attempts, reply_queue, correlation_id, batch_id)"
      " VALUES ($1, '%s', nextval('pgmq.q_%s_msg_id_seq'), $3::uuid, $4, 'PENDING', 0, $5::int, $6, $7::uuid,"
      " $8::uuid)%s RETURNING msg_id),"
      " msgs AS (INSERT INTO pgmq.q_%s (msg_id, vt, message) OVERRIDING SYSTEM VALUE"
      " SELECT msg_id, clock_timestamp() + make_interval(secs => $2::float8),"
      " jsonb_build_object('domain', $1::text, 'command_type', $4::text, 'command_id', $3::uuid,"
      " 'correlation_id', $7::uuid, 'data', coalesce($10::jsonb, '{}'::jsonb))"
      " || CASE WHEN $6 <> '' THEN jsonb_build_object('reply_to', $6::text) ELSE '{}'::jsonb END"
      " || CASE WHEN $9::int <> 0 THEN jsonb_build_object('priority', $9::int) ELSE '{}'::jsonb END FROM fresh),"
      " audit AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
      " SELECT $1, $3::uuid, 'SENT', jsonb_build_object('command_type', $4::text, 'correlation_id', $7::uuid,"
      " 'reply_to', nullif($6::text, ''), 'msg_id', msg_id, 'batch_id', $8::uuid) FROM fresh)"
      " SELECT $3::uuid::text, coalesce((SELECT msg_id FROM fresh), 0)%s%s%s",
      queue, queue, refuse_duplicates ? "" : " ON CONFLICT (domain, command_id) DO NOTHING", queue,
      /* a channel name needs no quoting: the queue's name is checked */
      notify ? " FROM pg_notify('" : "", notify ? channel : "", notify ? "', '') AS n" : "");
  return n > 0 && (size_t)n < len ? CB_OK : CB_EINTERNAL;
}

/* send_one_sql's text, as this thread made it last, and its cb__sql_hash:
 * a caller sending to one domain again and again makes and hashes it once
 * rather than format and hash its 1.7 kB on every send. NULL when it does
 * not fit. The text changes when this thread next asks for another
 * queue's: a unit that kept it (cb__unit_add_kept) must be done by then. */
static const char *one_sql(const char *queue, int refuse_duplicates, int notify, uint64_t *hash) {
  static __thread struct {
    char queue[CB_QUEUE_NAME_MAX + 1];
    int refuse_duplicates, notify;
    uint64_t hash;
    char sql[4096]; /* "" until made */
  } last;
  if (!(last.sql[0] && last.refuse_duplicates == refuse_duplicates && last.notify == notify &&
        strcmp(last.queue, queue) == 0)) {
    if (send_one_sql(last.sql, sizeof last.sql, queue, refuse_duplicates, notify) != CB_OK) {
      last.sql[0] = '\0';
      return NULL;
    }
    cb_str_join(last.queue, sizeof last.queue, queue, "");
    last.refuse_duplicates = refuse_duplicates;
    last.notify = notify;
    last.hash = cb__sql_hash(last.sql);
  }
  *hash = last.hash;
  return last.sql;
}

/* The statement that sends commands whose ids this call made (none given,
 * no dedup key): no two of them, and none of them and a command there, can
 * share an id, so the rows go in as they are, without send_sql's search
 * for duplicates (the speculative insertion of ON CONFLICT, the sort that
 * keeps the first of an id, the joins that tell the caller which were
 * sent). The array $1 (send_sql's objects, each also carrying its queue
 * message as "msg": put_element) is read once into typed columns, each
 * command drawing its message id there, and the three inserts read that.
 * The message is the object the caller made rather than one built here by
 * jsonb_build_object and two concatenations (built from "data" and "prio"
 * only for an element without "msg"); its text is parsed with the rest of
 * the array, and stored as jsonb it is the same value whatever the order
 * of its keys. The inserts and the result read `input` in the order of
 * the array, the order in which a CTE scan reads the rows its CTE made, so
 * neither sorts (a sort of a few rows costs more to set up than to run:
 * with the message, about 8% of the statement's work for a group of 6).
 * The same rows as send_sql's; the result has the same two columns (the
 * second the message id), in the order of the array. $2 the domain, $3
 * the delay. */
static int send_fresh_sql(char *sql, size_t len, const char *queue) {
  int n = snprintf(
      sql, len,
      "WITH input AS (SELECT e.ord, e.id, e.type, e.msg, e.data, e.corr, coalesce(e.reply, '') AS reply, e.max,"
      " e.batch, coalesce(e.prio, 0) AS prio, nextval('pgmq.q_%s_msg_id_seq') AS msg_id"
      " FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (id uuid, corr uuid, type text, msg jsonb, data jsonb,"
      " reply text, max int, batch uuid, prio int))"
      " WITH ORDINALITY AS e(id, corr, type, msg, data, reply, max, batch, prio, ord)),"
      " fresh AS (INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id, command_type,"
      " status, attempts, max_attempts, reply_queue, correlation_id, batch_id)"
      " SELECT $2, '%s', msg_id, id, type, 'PENDING', 0, max, reply, corr, batch FROM input),"
      " msgs AS (INSERT INTO pgmq.q_%s (msg_id, vt, message) OVERRIDING SYSTEM VALUE"
      " SELECT msg_id, clock_timestamp() + make_interval(secs => $3::float8),"
      " coalesce(msg, jsonb_build_object('domain', $2::text, 'command_type', type, 'command_id', id,"
      " 'correlation_id', corr, 'data', coalesce(data, '{}'::jsonb))"
      " || CASE WHEN reply <> '' THEN jsonb_build_object('reply_to', reply) ELSE '{}'::jsonb END"
      " || CASE WHEN prio <> 0 THEN jsonb_build_object('priority', prio) ELSE '{}'::jsonb END)"
      " FROM input),"
      " audit AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
      " SELECT $2, id, 'SENT', jsonb_build_object('command_type', type, 'correlation_id', corr,"
      " 'reply_to', nullif(reply, ''), 'msg_id', msg_id, 'batch_id', batch) FROM input)"
      " SELECT ord, msg_id FROM input",
      queue, queue, queue);
  return n > 0 && (size_t)n < len ? CB_OK : CB_EINTERNAL;
}

int cb_bus_is_duplicate(const cb_err *err) {
  /* Both unique indexes a command table may have (commandbus's key, rcmd's
   * uq_command_domain_cmdid) are on (domain, command_id). */
  return err->code == CB_EDATABASE && strcmp(err->sqlstate, "23505") == 0 &&
         strcmp(err->table, "commandbus.command") == 0;
}

int cb_bus_add_send_from(cb_unit *u, const char *domain, const char *prefix, const char *source, int nparams,
                         const char *const *params) {
  char queue[CB_QUEUE_NAME_MAX + 1], sql[6144];
  cb_command_queue_name(domain, queue);
  if (send_sql(sql, sizeof sql, queue, prefix, source, 0, 0) != CB_OK) return CB_EINTERNAL;
  return cb_unit_add(u, sql, nparams, params);
}

/* The command queue and the reply queues a send writes into: they exist
 * before the transaction that writes into them. */
static int ensure_send_queues(cb_runtime *rt, const char *domain, const cb_command_spec *specs, size_t n, cb_err *err) {
  int rc = cb_bus_ensure_command_queue(rt, domain, 0, err);
  for (size_t i = 0; i < n && rc == CB_OK; i++)
    if (specs[i].reply_to && specs[i].reply_to[0]) rc = cb_bus_ensure_queue(rt, specs[i].reply_to, err);
  return rc;
}

/* A single send's command as a group may merge it (build_group): what its
 * JSON object (an element of send_sql's array) is made of, made only when
 * the send does share a statement; a caller alone never needs it. The
 * strings are the caller's (the spec, results[0].command_id) or here. */
typedef struct send_one {
  const cb_command_spec *spec;
  const char *id;
  char corr[CB_UUID_LEN + 1], batch[CB_UUID_LEN + 1]; /* batch "" for none */
  int flags;                                          /* SEND_DEDUP, SEND_GIVEN_ID */
} send_one;

static int one_json_value(const char *s);

/* Appends a command's queue message as JSON text: the keys and values
 * send_sql's statement builds it of (reply_to and priority only when
 * set). The domain, ids and queue names need no escaping: checked. */
static void put_message(cb_strbuf *json, const char *domain, const cb_command_spec *s, const char *id,
                        const char *corr) {
  cb_strbuf_puts(json, "{\"domain\":\"");
  cb_strbuf_puts(json, domain);
  cb_strbuf_puts(json, "\",\"command_type\":");
  cb_strbuf_json_string(json, s->command_type);
  cb_strbuf_puts(json, ",\"command_id\":\"");
  cb_strbuf_puts(json, id);
  cb_strbuf_puts(json, "\",\"correlation_id\":\"");
  cb_strbuf_puts(json, corr);
  cb_strbuf_puts(json, "\",\"data\":");
  cb_strbuf_puts(json, s->data_json ? s->data_json : "{}");
  if (s->reply_to && s->reply_to[0]) {
    cb_strbuf_puts(json, ",\"reply_to\":\"");
    cb_strbuf_puts(json, s->reply_to);
    cb_strbuf_putc(json, '"');
  }
  if (s->priority) {
    cb_strbuf_puts(json, ",\"priority\":");
    cb_strbuf_put_int(json, s->priority);
  }
  cb_strbuf_putc(json, '}');
}

/* Appends a command's JSON object (an element of send_sql's array). Ids
 * and queue names need no escaping: checked. With `domain` (for
 * send_fresh_sql's statement), the object carries the command's queue
 * message, made here, as "msg" in place of "data" and "prio": unless its
 * data is more than one JSON value as far as its commas go (data such as
 * `1,"priority":5` would give the message keys its command lacks), when
 * the statement builds the message from the element, as send_sql's does. */
static void put_element(cb_strbuf *json, const cb_command_spec *s, const char *id, const char *corr, const char *batch,
                        const char *domain) {
  int msg = domain && (!s->data_json || one_json_value(s->data_json));
  cb_strbuf_puts(json, "{\"id\":\"");
  cb_strbuf_puts(json, id);
  cb_strbuf_puts(json, "\",\"corr\":\"");
  cb_strbuf_puts(json, corr);
  cb_strbuf_puts(json, "\",\"type\":");
  cb_strbuf_json_string(json, s->command_type);
  cb_strbuf_puts(json, ",\"max\":");
  cb_strbuf_put_int(json, s->max_attempts > 0 ? s->max_attempts : CB_DEFAULT_MAX_ATTEMPTS);
  if (s->reply_to && s->reply_to[0]) {
    cb_strbuf_puts(json, ",\"reply\":\"");
    cb_strbuf_puts(json, s->reply_to);
    cb_strbuf_putc(json, '"');
  }
  if (batch[0]) {
    cb_strbuf_puts(json, ",\"batch\":\"");
    cb_strbuf_puts(json, batch);
    cb_strbuf_putc(json, '"');
  }
  if (s->dedup_key) {
    cb_strbuf_puts(json, ",\"dedup\":");
    cb_strbuf_json_string(json, s->dedup_key);
    cb_strbuf_printf(json, ",\"dedup_for\":%.6f", s->dedup_for);
  }
  if (msg) {
    cb_strbuf_puts(json, ",\"msg\":");
    put_message(json, domain, s, id, corr);
  } else {
    if (s->priority) {
      cb_strbuf_puts(json, ",\"prio\":");
      cb_strbuf_put_int(json, s->priority);
    }
    if (s->data_json) {
      cb_strbuf_puts(json, ",\"data\":");
      cb_strbuf_puts(json, s->data_json);
    }
  }
  cb_strbuf_putc(json, '}');
}

/* As cb_bus_add_send: validates specs, makes sure the queues exist, then
 * appends the send statements (one per chunk) and the queue's notify to u
 * (a single send's statement raises the notify itself: send_one_sql),
 * without running it; on an error u may hold part of them (the caller
 * discards the unit). When `one` is given and n is 1, it gets what the
 * command's JSON object is made of (see send_one). With `keep`, a single
 * send's statement text is this thread's (one_sql), kept rather than
 * copied: the caller frees u before this thread sends again. */
static int add_send(cb_runtime *rt, cb_unit *u, const char *domain, const cb_command_spec *specs, size_t n,
                    double delay, cb_send_result *results, const cb_send_options *options, send_one *one, int no_notify,
                    int keep, cb_err *err) {
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (delay < 0) return cb_err_set(err, CB_EINVAL, "delay must not be negative");
  char queue[CB_QUEUE_NAME_MAX + 1];
  cb_command_queue_name(domain, queue);

  /* Validate everything first: bad input writes nothing. */
  cb_strbuf json = {0};
  char id[CB_UUID_LEN + 1], corr[CB_UUID_LEN + 1], batch[CB_UUID_LEN + 1];
  char sql[6144];
  const char *forced_batch = options ? options->batch_id : NULL;
  int notified = 0; /* the single send's statement raised the notification */
  char delay_text[32];
  delay_param(delay_text, delay);
  int single = n == 1 && !specs[0].dedup_key; /* send_one_sql's statement, of parameters: no array */
  for (size_t start = 0; start < n && rc == CB_OK; start += SEND_CHUNK) {
    size_t end = start + SEND_CHUNK < n ? start + SEND_CHUNK : n;
    cb_strbuf_reset(&json);
    if (!single) cb_strbuf_putc(&json, '[');
    int dedup = 0, given_ids = 0;
    for (size_t i = start; i < end; i++) { /* which statement: send_fresh_sql's elements carry their messages */
      dedup |= specs[i].dedup_key != NULL;
      given_ids |= specs[i].command_id != NULL;
    }
    const char *fresh_domain = !dedup && !given_ids ? domain : NULL;
    for (size_t i = start; i < end && rc == CB_OK; i++) {
      const cb_command_spec *s = &specs[i];
      rc = check_spec(s, i, id, corr, batch, err);
      if (rc != CB_OK) break;
      if (forced_batch) snprintf(batch, sizeof batch, "%s", forced_batch);
      memcpy(results[i].command_id, id, sizeof id);
      results[i].msg_id = 0;
      results[i].duplicate = 0;
      results[i].duplicate_of[0] = '\0';
      if (n == 1 && one) { /* its element, should a group merge it */
        one->spec = s;
        one->id = results[0].command_id;
        memcpy(one->corr, corr, sizeof corr);
        memcpy(one->batch, batch, sizeof batch);
        one->flags = (s->dedup_key ? SEND_DEDUP : 0) | (s->command_id ? SEND_GIVEN_ID : 0);
      }
      if (single) break;
      if (i > start) cb_strbuf_putc(&json, ',');
      put_element(&json, s, id, corr, batch, fresh_domain);
    }
    if (!single) cb_strbuf_putc(&json, ']');
    if (rc == CB_OK && json.failed) rc = cb_err_set(err, CB_ENOMEM, "out of memory");
    if (rc == CB_OK && single) { /* the common single send */
      const cb_command_spec *s = &specs[0];
      char max[12], prio[12];
      cb_str_int(max, s->max_attempts > 0 ? s->max_attempts : CB_DEFAULT_MAX_ATTEMPTS);
      cb_str_int(prio, s->priority);
      const char *params[] = {
          domain, delay_text,  id, s->command_type, max, s->reply_to ? s->reply_to : "", corr, batch[0] ? batch : NULL,
          prio,   s->data_json};
      /* An id made here cannot be there already: no need to look. */
      uint64_t hash;
      const char *text = one_sql(queue, (options && options->refuse_duplicates) || !given_ids, !no_notify, &hash);
      if (text == NULL) rc = cb_err_set(err, CB_EINTERNAL, "the send statement does not fit its buffer");
      else if ((keep ? cb__unit_add_kept(u, text, hash, 10, params) : cb_unit_add(u, text, 10, params)) < 0)
        rc = cb_err_set(err, CB_ENOMEM, "out of memory");
      notified = 1; /* inside it */
      break;
    }
    if (rc == CB_OK &&
        (!dedup && !given_ids ? send_fresh_sql(sql, sizeof sql, queue)
                              : send_sql(sql, sizeof sql, queue, "", "jsonb_array_elements($1::jsonb) WITH ORDINALITY",
                                         dedup, options && options->refuse_duplicates)) != CB_OK)
      rc = cb_err_set(err, CB_EINTERNAL, "the send statement does not fit its buffer");
    if (rc == CB_OK) {
      const char *params[] = {json.data, domain, delay_text};
      if (cb_unit_add(u, sql, 3, params) < 0) rc = cb_err_set(err, CB_ENOMEM, "out of memory");
    }
  }
  cb_strbuf_free(&json);
  if (rc == CB_OK) rc = ensure_send_queues(rt, domain, specs, n, err);
  if (rc == CB_OK && !no_notify && !notified && cb_queue_add_notify(u, queue) < 0)
    rc = cb_err_set(err, CB_ENOMEM, "out of memory");
  return rc;
}

int cb_bus_add_send(cb_runtime *rt, cb_unit *u, const char *domain, const cb_command_spec *specs, size_t n,
                    double delay, cb_send_result *results, const cb_send_options *options, cb_err *err) {
  return add_send(rt, u, domain, specs, n, delay, results, options, NULL, 0, 0, err);
}

/* Reads the row of a send statement's result for the command at `row` of
 * the statement's commands (from 0) into *res. send_fresh_sql's result,
 * read from its CTE unsorted, names each row's place (ord, from 1): the row
 * is found by it (in practice the row at that place). */
static void read_send_row(const cb_result *r, int row, cb_send_result *res) {
  if (cb_result_columns(r) == 2 && strcmp(cb_result_column_name(r, 0), "ord") == 0 &&
      cb_result_int(r, row, 0) != row + 1) {
    for (int i = 0; i < cb_result_rows(r); i++)
      if (cb_result_int(r, i, 0) == row + 1) {
        row = i;
        break;
      }
  }
  int holders = cb_result_columns(r) > 2; /* a send with dedup keys */
  res->msg_id = cb_result_int(r, row, 1);
  res->duplicate = res->msg_id == 0;
  if (!res->duplicate) return;
  const char *first = holders && !cb_result_is_null(r, row, 2) ? cb_result_value(r, row, 2) : res->command_id;
  snprintf(res->duplicate_of, sizeof res->duplicate_of, "%s", first);
}

void cb_bus_read_send(const cb_unit *u, int first, size_t n, cb_send_result *results) {
  /* One statement per chunk, one row per command in it, in order. */
  size_t k = 0;
  int chunks = (int)((n + SEND_CHUNK - 1) / SEND_CHUNK);
  for (int st = first; st < first + chunks; st++) {
    const cb_result *r = cb_unit_result(u, st);
    if (r == NULL) break;
    for (int row = 0; row < cb_result_rows(r) && k < n; row++, k++) read_send_row(r, row, &results[k]);
  }
}

/* Runs a unit holding a send; bad JSON in a command's data (22P02) is the
 * caller's mistake, not the database's. */
static int send_error(int rc, const cb_err *from, cb_err *err) {
  if (rc == CB_OK) return rc;
  if (err != from) *err = *from;
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22P02") == 0) {
    char why[sizeof err->message]; /* not formatted into itself */
    memcpy(why, err->message, sizeof why);
    rc = cb_err_set(err, CB_EINVAL, "invalid command data: %s", why);
  }
  return rc;
}

static int exec_send(cb_runtime *rt, cb_unit *u, cb_err *err) {
  return send_error(cb_runtime_exec(rt, u, err), err, err);
}

/* ---- large sends by COPY ------------------------------------------------------
 *
 * A send_batch of many fresh commands (ids made by the call, no dedup key,
 * no delay) writes its rows with COPY rather than with send_fresh_sql's
 * statement: the same rows, for about three quarters of the server's CPU
 * (bench/send_batch.c): COPY puts a page of rows in at a time, where an
 * INSERT puts one row at a time, and the message and SENT details are
 * JSON text made here rather than built by jsonb_build_object.
 *
 * One simple query, one transaction: a SELECT draws the message ids, then
 * three COPY ... FROM STDIN (command rows, queue messages, SENT audit rows),
 * then the queue's notify. The rows need the message ids, so they are made
 * once the draw is back, on the loop thread, a piece at a time as the
 * connection sends them (copy_source, pg.c's pump_copy): the server reads
 * one piece while the next is made. The draw answers with runs of
 * consecutive ids (one run unless another session drew from the sequence
 * meanwhile) rather than a row per id. An id drawn by a send that then
 * fails is skipped, as an insert rolled back skips it. The audit ids are
 * the column's default: COPY evaluates a nextval default row by row and
 * still writes a page at a time (PostgreSQL exempts nextval from its
 * volatile-default check). The vt is the transaction's start, now() as
 * the draw read it, as enqueued_at's default reads it: COPY takes no
 * expression, hence no delay. */
#define COPY_MIN 2000  /* fewer commands go by statement: COPY's fixed costs are more than it saves */
#define COPY_PIECE 256 /* commands' rows per piece of COPY data (about 40 KB) */

/* Whether a command's data text is one JSON value at most, as far as its
 * commas and brackets go (strings skipped): the server checks the rest
 * when it reads the message. Data such as `1,"reply_to":"x"` would
 * otherwise add keys to the message text that the command row lacks; such
 * a send goes by statement, which reads the data from the same parsed
 * element as the rest of the command. */
static int one_json_value(const char *s) {
  int depth = 0, in_string = 0;
  for (; *s; s++) {
    if (in_string) {
      if (*s == '\\' && s[1]) s++;
      else if (*s == '"') in_string = 0;
    } else if (*s == '"') {
      in_string = 1;
    } else if (*s == '{' || *s == '[') {
      depth++;
    } else if (*s == '}' || *s == ']') {
      if (--depth < 0) return 0;
    } else if (depth == 0 && (*s == ',' || *s == ':')) {
      return 0;
    }
  }
  return depth == 0 && !in_string;
}

static int copy_eligible(const cb_command_spec *specs, size_t n, double delay) {
  if (n < COPY_MIN || delay != 0) return 0;
  for (size_t i = 0; i < n; i++)
    if (specs[i].command_id || specs[i].dedup_key || (specs[i].data_json && !one_json_value(specs[i].data_json)))
      return 0;
  return 1;
}

/* COPY's binary format (PostgreSQL's "COPY" page): a signature and two
 * zero words, then each row as a count of fields and each field as its
 * length (-1: NULL) and its bytes in the type's binary form, then -1. The
 * server then takes each value as it is: no line to split, no escapes, no
 * text to parse into a number, a UUID or a time (about 6% of its CPU in
 * a large send); JSON is still text, behind jsonb's version byte. */
static const char copy_signature[] = "PGCOPY\n\377\r\n\0\0\0\0\0\0\0\0\0"; /* signature, flags, extension */
#define COPY_SIGNATURE_LEN 19

static void put_be(cb_strbuf *b, uint64_t v, int bytes) {
  char out[8];
  for (int i = bytes - 1; i >= 0; i--, v >>= 8) out[i] = (char)(v & 0xff);
  cb_strbuf_putn(b, out, (size_t)bytes);
}

static void field_text(cb_strbuf *b, const char *s, size_t n) {
  put_be(b, n, 4);
  cb_strbuf_putn(b, s, n);
}

static void field_int8(cb_strbuf *b, int64_t v) {
  put_be(b, 8, 4);
  put_be(b, (uint64_t)v, 8);
}

static void field_int4(cb_strbuf *b, int32_t v) {
  put_be(b, 4, 4);
  put_be(b, (uint32_t)v, 4);
}

/* A UUID's 16 bytes, from its text: check_spec checked or made it, so it
 * is the canonical 36 characters, dashes at 8, 13, 18 and 23, and each
 * byte is two hex digits at a known place. A digit's value without a
 * branch: its low four bits, plus 9 for a letter (0x41 or 0x61 and up,
 * bit 6 set). Three UUIDs a command on the loop thread, while the server
 * reads the previous piece. */
static void field_uuid(cb_strbuf *b, const char *text) {
  static const unsigned char at[16] = {0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34};
  char out[16];
  for (int k = 0; k < 16; k++) {
    unsigned hi = (unsigned char)text[at[k]], lo = (unsigned char)text[at[k] + 1];
    out[k] = (char)((((hi & 0xf) + (hi >> 6) * 9) << 4) | ((lo & 0xf) + (lo >> 6) * 9));
  }
  put_be(b, 16, 4);
  cb_strbuf_putn(b, out, sizeof out);
}

static void field_jsonb(cb_strbuf *b, const cb_strbuf *json) {
  put_be(b, json->len + 1, 4);
  cb_strbuf_putc(b, 1); /* jsonb's binary form: version 1, then the text */
  cb_strbuf_putn(b, json->data, json->len);
}

/* A command row: domain, queue_name, msg_id, command_id, command_type,
 * status, attempts, max_attempts, reply_queue, correlation_id, batch_id. */
static void command_row(cb_strbuf *b, const char *domain, const char *queue, const cb_command_spec *s,
                        const cb_send_result *res, const char *corr, const char *batch) {
  const char *reply = s->reply_to ? s->reply_to : "";
  put_be(b, 11, 2);
  field_text(b, domain, strlen(domain));
  field_text(b, queue, strlen(queue));
  field_int8(b, res->msg_id);
  field_uuid(b, res->command_id);
  field_text(b, s->command_type, strlen(s->command_type));
  field_text(b, "PENDING", 7);
  field_int4(b, 0);
  field_int4(b, s->max_attempts > 0 ? s->max_attempts : CB_DEFAULT_MAX_ATTEMPTS);
  field_text(b, reply, strlen(reply));
  field_uuid(b, corr);
  if (batch[0]) field_uuid(b, batch);
  else put_be(b, UINT32_MAX, 4); /* NULL */
}

/* A queue message: msg_id, vt, message (the keys of send_fresh_sql's);
 * json is scratch space. */
static void message_row(cb_strbuf *b, cb_strbuf *json, const char *domain, const cb_command_spec *s,
                        const cb_send_result *res, const char *corr, int64_t vt) {
  cb_strbuf_reset(json);
  put_message(json, domain, s, res->command_id, corr);
  put_be(b, 3, 2);
  field_int8(b, res->msg_id);
  field_int8(b, vt);
  field_jsonb(b, json);
}

/* A SENT audit row: domain, command_id, event_type, details_json (the
 * audit_id is the column's default); json is scratch space. */
static void audit_row(cb_strbuf *b, cb_strbuf *json, const char *domain, const cb_command_spec *s,
                      const cb_send_result *res, const char *corr, const char *batch) {
  const char *reply = s->reply_to && s->reply_to[0] ? s->reply_to : NULL;
  cb_strbuf_reset(json);
  cb_strbuf_puts(json, "{\"command_type\":");
  cb_strbuf_json_string(json, s->command_type);
  cb_strbuf_puts(json, ",\"correlation_id\":\"");
  cb_strbuf_puts(json, corr);
  cb_strbuf_puts(json, "\",\"reply_to\":");
  if (reply) {
    cb_strbuf_putc(json, '"');
    cb_strbuf_puts(json, reply);
    cb_strbuf_putc(json, '"');
  } else {
    cb_strbuf_puts(json, "null");
  }
  cb_strbuf_puts(json, ",\"msg_id\":");
  cb_strbuf_put_int(json, res->msg_id);
  cb_strbuf_puts(json, ",\"batch_id\":");
  if (batch[0]) {
    cb_strbuf_putc(json, '"');
    cb_strbuf_puts(json, batch);
    cb_strbuf_putc(json, '"');
  } else {
    cb_strbuf_puts(json, "null");
  }
  cb_strbuf_putc(json, '}');
  put_be(b, 4, 2);
  field_text(b, domain, strlen(domain));
  field_uuid(b, res->command_id);
  field_text(b, "SENT", 4);
  field_jsonb(b, json);
}

/* What the rows of a COPY send are made from: the caller's commands, and
 * the pieces made so far. Filled by send_by_copy; then, while the unit
 * runs, read and written by copy_source on the loop thread only (the
 * caller waits for the unit). */
typedef struct copy_send {
  const char *domain, *queue;
  const cb_command_spec *specs;
  cb_send_result *results; /* msg_id set from the draw */
  char (*corrs)[CB_UUID_LEN + 1];
  char (*batches)[CB_UUID_LEN + 1]; /* "" for none */
  size_t n;
  int64_t vt;            /* the transaction's start, in COPY's binary form of a timestamptz */
  int ids_taken;         /* the draw's ids are in results */
  size_t next;           /* the command whose rows the next piece starts with */
  cb_strbuf piece, json; /* the piece handed to pg.c; scratch for JSON */
  int failed;            /* a cb_code: the source aborted the COPY (why in err) */
  cb_err err;
  /* A stream's (cb_send_stream; else ready is n from the start): */
  size_t ready;           /* atomic: the commands checked and handed over, [0, ready) */
  int waiting;            /* atomic: the source answered CB__COPY_LATER, and wants a kick when ready grows */
  int abandoned;          /* atomic: the caller gave up: the source aborts the COPY */
  cb_send_stream *stream; /* told when the ids are in; NULL: not a stream */
} copy_send;

static void stream_ids_in(cb_send_stream *s);

/* Whether the commands [0, end) have been handed over; when not, marks
 * the source waiting for them. Whoever comes second of the source's
 * mark and the caller's next hand-over sees the other: the caller then
 * kicks the loop (stream_publish). */
static int handed_over(copy_send *c, size_t end) {
  if (__atomic_load_n(&c->ready, __ATOMIC_ACQUIRE) >= end) return 1;
  __atomic_store_n(&c->waiting, 1, __ATOMIC_SEQ_CST);
  return __atomic_load_n(&c->ready, __ATOMIC_SEQ_CST) >= end;
}

/* Sets each command's msg_id from the draw's runs of ids (first, last),
 * in order, and the vt from its third column; 0, or -1 when they do not
 * add up to one id per command. */
static int take_ids(copy_send *c, const cb_result *runs) {
  size_t k = 0;
  for (int row = 0; runs && row < cb_result_rows(runs); row++) {
    int64_t first = cb_result_int(runs, row, 0), last = cb_result_int(runs, row, 1);
    for (int64_t id = first; id <= last && k < c->n; id++) c->results[k++].msg_id = id;
  }
  if (k == c->n && runs && cb_result_rows(runs) > 0 &&
      cb_result_int(runs, cb_result_rows(runs) - 1, 1) == c->results[c->n - 1].msg_id) {
    c->vt = cb_result_int(runs, 0, 2);
    return 0;
  }
  cb_err_set(&c->err, CB_EINTERNAL, "drew %zu message ids for %zu commands", k, c->n);
  return -1;
}

/* The cb__copy_source of a COPY send: COPY 0 takes the command rows, 1 the
 * messages, 2 the audit rows, COPY_PIECE commands a piece. */
static int copy_source(void *arg, int copy, const cb_result *runs, const char **data, size_t *len) {
  copy_send *c = arg;
  if (__atomic_load_n(&c->abandoned, __ATOMIC_SEQ_CST)) {
    c->failed = cb_err_set(&c->err, CB_EINTERNAL, "the send was abandoned");
    return -1;
  }
  if (!c->ids_taken) {
    if (take_ids(c, runs) < 0) {
      c->failed = CB_EINTERNAL;
      return -1;
    }
    c->ids_taken = 1;
    if (c->stream) stream_ids_in(c->stream);
  }
  size_t end = c->next + COPY_PIECE < c->n ? c->next + COPY_PIECE : c->n;
  if (copy == 0 && !handed_over(c, end)) return CB__COPY_LATER;
  cb_strbuf_reset(&c->piece);
  if (c->next == 0) cb_strbuf_putn(&c->piece, copy_signature, COPY_SIGNATURE_LEN);
  for (size_t i = c->next; i < end; i++) {
    const cb_command_spec *s = &c->specs[i];
    const cb_send_result *res = &c->results[i];
    if (copy == 0) command_row(&c->piece, c->domain, c->queue, s, res, c->corrs[i], c->batches[i]);
    else if (copy == 1) message_row(&c->piece, &c->json, c->domain, s, res, c->corrs[i], c->vt);
    else audit_row(&c->piece, &c->json, c->domain, s, res, c->corrs[i], c->batches[i]);
  }
  if (end == c->n) put_be(&c->piece, UINT16_MAX, 2); /* the end: -1 fields */
  if (c->piece.failed || c->json.failed) {
    c->failed = cb_err_set(&c->err, CB_ENOMEM, "out of memory");
    return -1;
  }
  *data = c->piece.data ? c->piece.data : "";
  *len = c->piece.len;
  c->next = end == c->n ? 0 : end;
  return end < c->n;
}

/* The unit of a COPY send of n commands into queue (its data from c): the
 * draw, the three COPYs and the notify as one simple query; NULL when out
 * of memory. */
static cb_unit *copy_unit(const char *queue, size_t n, copy_send *c) {
  char channel[CB_QUEUE_CHANNEL_MAX];
  cb_queue_channel(queue, channel);
  cb_strbuf sql = {0};
  /* The runs: ids minus their rank is constant along a run (the ids grow
   * in the order they are drawn). The vt: now() in microseconds from
   * 2000-01-01, a timestamptz's binary form. */
  cb_strbuf_printf(&sql,
                   "SELECT min(id), max(id), (extract(epoch FROM now()) * 1000000)::int8 - 946684800000000"
                   " FROM (SELECT id, id - row_number() OVER (ORDER BY id) AS run"
                   " FROM (SELECT nextval('pgmq.q_%s_msg_id_seq') AS id FROM generate_series(1, %zu)) drawn) ids"
                   " GROUP BY run ORDER BY 1;"
                   " COPY commandbus.command (domain, queue_name, msg_id, command_id, command_type, status, attempts,"
                   " max_attempts, reply_queue, correlation_id, batch_id) FROM STDIN (FORMAT binary);"
                   " COPY pgmq.q_%s (msg_id, vt, message) FROM STDIN (FORMAT binary);"
                   " COPY commandbus.audit (domain, command_id, event_type, details_json) FROM STDIN (FORMAT binary);"
                   " SELECT pg_notify('%s', '')",
                   queue, n, queue, channel);
  cb_unit *u = sql.failed ? NULL : cb_unit_new();
  if (u && (cb_unit_add_flags(u, sql.data, 0, NULL, CB_STMT_COPY) < 0 || u->broken)) {
    cb_unit_free(u);
    u = NULL;
  }
  if (u) cb__unit_copy_source(u, copy_source, c);
  cb_strbuf_free(&sql);
  return u;
}

/* cb_bus_send for copy_eligible commands: checks them all, makes the
 * queues, then runs the draw, the three COPYs and the notify as one
 * query. */
static int send_by_copy(cb_runtime *rt, const char *domain, const cb_command_spec *specs, size_t n,
                        cb_send_result *results, cb_err *err) {
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  char queue[CB_QUEUE_NAME_MAX + 1];
  cb_command_queue_name(domain, queue);
  char(*corrs)[CB_UUID_LEN + 1] = malloc(n * sizeof *corrs);
  char(*batches)[CB_UUID_LEN + 1] = malloc(n * sizeof *batches);
  if (corrs == NULL || batches == NULL) rc = cb_err_set(err, CB_ENOMEM, "out of memory");
  for (size_t i = 0; i < n && rc == CB_OK; i++) { /* bad input writes nothing */
    rc = check_spec(&specs[i], i, results[i].command_id, corrs[i], batches[i], err);
    results[i].msg_id = 0;
    results[i].duplicate = 0;
    results[i].duplicate_of[0] = '\0';
  }
  if (rc == CB_OK) rc = ensure_send_queues(rt, domain, specs, n, err);
  copy_send c = {.domain = domain,
                 .queue = queue,
                 .specs = specs,
                 .results = results,
                 .corrs = corrs,
                 .batches = batches,
                 .n = n,
                 .ready = n};
  cb_unit *u = rc == CB_OK ? copy_unit(queue, n, &c) : NULL;
  if (rc == CB_OK && u == NULL) rc = cb_err_set(err, CB_ENOMEM, "out of memory");
  if (rc == CB_OK) {
    rc = exec_send(rt, u, err);
    if (c.failed) rc = cb_err_set(err, c.failed, "%s", c.err.message); /* the database only saw the COPY fail */
  }
  for (size_t i = 0; rc != CB_OK && i < n; i++) results[i].msg_id = 0;
  cb_unit_free(u);
  cb_strbuf_free(&c.piece);
  cb_strbuf_free(&c.json);
  free(corrs);
  free(batches);
  return rc;
}

/* ---- a COPY send under way while its caller still reads its commands -----
 *
 * A caller that makes its commands one by one from something slower to
 * read (the Lua binding reads 50,000 tables in about 100 ms) would
 * otherwise keep the server idle meanwhile, then wait for the draw: a
 * stream sends the draw at once, hands each piece's commands over as they
 * are read, and the server writes the command rows of the first ones
 * while the rest are read. When the ids are in, the caller may make its
 * answers while the server writes (cb_bus_stream_ids). Anything a stream
 * cannot take as it is (a command the COPY path does not take, bad input,
 * a reply queue not made yet) abandons it: the COPY is aborted, its
 * transaction rolls back (the drawn ids are skipped, as an insert rolled
 * back skips them), and the caller sends by cb_bus_send once it has read
 * everything, which answers as it always does. */
struct cb_send_stream {
  cb_runtime *rt;
  copy_send c;
  cb_unit *u;
  char queue[CB_QUEUE_NAME_MAX + 1];
  size_t checked; /* [caller] */
  pthread_mutex_t lock;
  pthread_cond_t changed;
  int ids_in, done; /* [lock] */
};

static void stream_ids_in(cb_send_stream *s) {
  pthread_mutex_lock(&s->lock);
  s->ids_in = 1;
  pthread_cond_broadcast(&s->changed);
  pthread_mutex_unlock(&s->lock);
}

static void stream_done(cb_unit *u, void *arg) {
  (void)u;
  cb_send_stream *s = arg;
  pthread_mutex_lock(&s->lock);
  s->done = 1;
  pthread_cond_broadcast(&s->changed);
  pthread_mutex_unlock(&s->lock);
}

/* Waits until the ids are in (ids: 1) or the unit is done. */
static void stream_wait(cb_send_stream *s, int ids) {
  pthread_mutex_lock(&s->lock);
  while (!s->done && !(ids && s->ids_in)) pthread_cond_wait(&s->changed, &s->lock);
  pthread_mutex_unlock(&s->lock);
}

static void stream_free(cb_send_stream *s) {
  cb_unit_free(s->u);
  cb_strbuf_free(&s->c.piece);
  cb_strbuf_free(&s->c.json);
  free(s->c.corrs);
  free(s->c.batches);
  pthread_cond_destroy(&s->changed);
  pthread_mutex_destroy(&s->lock);
  free(s);
}

cb_send_stream *cb_bus_stream_start(cb_runtime *rt, const char *domain, const cb_command_spec *specs,
                                    cb_send_result *results, size_t n, double delay) {
  cb_err err;
  /* A stream holds its connection while the caller makes the commands; with
   * a pool of one, anything the caller sent meanwhile (a Lua __index that
   * calls the bus, say) would find no connection. */
  if (n < COPY_MIN || delay != 0 || cb_runtime_pool_size(rt) < 2 || cb_runtime_on_loop(rt) ||
      cb_domain_valid(domain, &err) != CB_OK || cb_bus_ensure_command_queue(rt, domain, 0, &err) != CB_OK)
    return NULL;
  cb_send_stream *s = calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  s->rt = rt;
  cb_command_queue_name(domain, s->queue);
  s->c = (copy_send){.domain = domain, .queue = s->queue, .specs = specs, .results = results, .n = n, .stream = s};
  s->c.corrs = malloc(n * sizeof *s->c.corrs);
  s->c.batches = malloc(n * sizeof *s->c.batches);
  pthread_mutex_init(&s->lock, NULL);
  pthread_cond_init(&s->changed, NULL);
  if (s->c.corrs && s->c.batches) s->u = copy_unit(s->queue, n, &s->c);
  if (s->u == NULL) {
    stream_free(s);
    return NULL;
  }
  cb_unit_on_done(s->u, stream_done, s);
  if (cb_runtime_submit(rt, &s->u, 1) != CB_OK) {
    cb_unit_on_done(s->u, NULL, NULL);
    stream_free(s);
    return NULL;
  }
  return s;
}

/* Whether command i can go by this stream's COPY; checks it as
 * send_by_copy does. */
static int stream_takes(cb_send_stream *s, size_t i) {
  const cb_command_spec *sp = &s->c.specs[i];
  cb_send_result *res = &s->c.results[i];
  cb_err err;
  char key[80];
  if (sp->command_id || sp->dedup_key || (sp->data_json && !one_json_value(sp->data_json))) return 0;
  if (sp->reply_to && sp->reply_to[0]) {
    /* Making it needs another connection, and the pool may have none free. */
    snprintf(key, sizeof key, "queue:%s", sp->reply_to);
    if (strlen(sp->reply_to) > CB_QUEUE_NAME_MAX || !cb_runtime_remembers(s->rt, key)) return 0;
  }
  if (check_spec(sp, i, res->command_id, s->c.corrs[i], s->c.batches[i], &err) != CB_OK) return 0;
  res->duplicate = 0; /* msg_id is the loop thread's: the draw's ids may be going in now */
  res->duplicate_of[0] = '\0';
  return 1;
}

int cb_bus_stream_add(cb_send_stream *s, size_t upto) {
  for (; s->checked < upto; s->checked++)
    if (!stream_takes(s, s->checked)) {
      cb_bus_stream_abandon(s);
      return 0;
    }
  __atomic_store_n(&s->c.ready, upto, __ATOMIC_SEQ_CST);
  if (__atomic_exchange_n(&s->c.waiting, 0, __ATOMIC_SEQ_CST)) cb__kick_copies(s->rt);
  return 1;
}

int cb_bus_stream_ids(cb_send_stream *s) {
  stream_wait(s, 1);
  pthread_mutex_lock(&s->lock);
  int in = s->ids_in;
  pthread_mutex_unlock(&s->lock);
  return in;
}

int cb_bus_stream_finish(cb_send_stream *s, cb_err *err) {
  stream_wait(s, 0);
  int rc = send_error(s->u->status, &s->u->err, err);
  if (s->c.failed) rc = cb_err_set(err, s->c.failed, "%s", s->c.err.message);
  stream_free(s);
  return rc;
}

void cb_bus_stream_abandon(cb_send_stream *s) {
  __atomic_store_n(&s->c.abandoned, 1, __ATOMIC_SEQ_CST);
  cb__kick_copies(s->rt);
  stream_wait(s, 0);
  stream_free(s);
}

/* ---- sends sharing transactions ----------------------------------------------
 *
 * A commit waits for the disk, and each commit costs the server more CPU
 * than a small send's rows (the WAL flush, the transaction's start and end).
 * So sends from concurrent callers share transactions: one group of sends
 * is on its way at a time; sends that arrive meanwhile gather and leave
 * together, as one transaction, when it comes back. A caller alone
 * sends at once, in a transaction of its own (one round trip, one commit);
 * under load the groups grow with it. One group at a time rather than one
 * per pooled connection: with two on their way each gathers only the
 * callers that came back while the other was out, and eight callers made
 * groups of about 3 rather than 5.5 to 7, at about 1.5 times the server's
 * CPU per command; nor do two of them commit side by side, as the queue's
 * NOTIFY makes commits take turns (docs/architecture.md). A send of more
 * than SHARE_MAX commands does not join: its own transaction spreads its
 * commit over enough rows, and it would hold back everyone else's.
 * Each caller still gets its own answer. When a shared transaction fails on
 * the database's side (a command whose data the server refuses, a deadlock
 * with another transaction), nothing of it was written, and each of its sends is
 * made again alone, so that one bad send never fails the others. When its
 * outcome is unknown (the connection broke) every sender gets that error,
 * as a send alone would. With the runtime's notify_after_commit, the
 * queues' notifies leave the group's transaction for one of their own right
 * behind it (after_notify, submit_then_notify). */

#define GROUP_MAX 128 /* sends per shared transaction, at most */
#define SHARE_MAX 16  /* commands of a send that joins a group, at most */
#define STALL_MS 50   /* a group out this long lets the next leave beside it */

typedef struct send_call {
  struct cb_send_groups *g;
  cb_unit *unit; /* its statements, built and checked by the caller */
  size_t n;      /* its commands */
  cb_send_result *results;
  /* A single command (n 1): what its JSON object is made of, so that the
   * single sends of a group to one domain go as one statement (send_sql's
   * array). */
  const char *domain;
  const char *delay;   /* as bound: "%.6f" */
  const send_one *one; /* NULL: not merged */
  int after;           /* its unit lacks its queue's notify, sent after the commit (notify_after_commit) */
  int first;           /* its first statement in the group's unit */
  int row;             /* merged: its row in that statement's result; -1: its own statements */
  int rc;
  cb_err err;
  /* Its caller waits on a lock and condition of its own rather than the
   * groups' lock: an answer or a lead then wakes that caller only, and the
   * woken caller does not queue behind the loop thread, which holds the
   * groups' lock no longer than its own changes take (with the one lock,
   * callers woken while the loop thread was still answering the rest of
   * their group slept again on it). Lock order: g->lock, then wait. */
  pthread_mutex_t wait;
  pthread_cond_t cond;
  int done;               /* [wait] */
  int lead;               /* [wait] woken to take the next group out */
  struct send_call *next; /* [g->lock] */
} send_call;

struct cb_send_groups {
  cb_runtime *rt;
  pthread_mutex_t lock;
  int out;                /* groups on their way: 1 at most, unless one stalls (STALL_MS) */
  int leading;            /* the first one waiting was woken to take the next group out */
  send_call *head, *tail; /* waiting for the next group */
};

typedef struct cb_send_groups cb_send_groups;

typedef struct send_group {
  cb_send_groups *g;
  send_call *calls;
  int count;
} send_group;

static void *send_groups_new(cb_runtime *rt) {
  cb_send_groups *g = calloc(1, sizeof *g);
  if (g == NULL) return NULL;
  g->rt = rt;
  pthread_mutex_init(&g->lock, NULL);
  return g;
}

static void send_groups_free(void *state) {
  cb_send_groups *g = state;
  if (g == NULL) return;
  pthread_mutex_destroy(&g->lock);
  free(g);
}

/* The runtime keeps each one's groups (made on first use). */
static const cb_runtime_part send_groups_part = {send_groups_new, send_groups_free};

/* The outcome of a unit holding sends, as exec_send reports it. */
static int send_outcome(const cb_unit *u, cb_err *err) {
  int rc = cb_unit_status(u);
  if (rc == CB_OK) return CB_OK;
  *err = *cb_unit_error(u);
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22P02") == 0)
    rc = cb_err_set(err, CB_EINVAL, "invalid command data: %s", cb_unit_error(u)->message);
  return rc;
}

static void answer(send_call *c, int rc, const cb_err *err) {
  c->rc = rc;
  if (rc != CB_OK && err) c->err = *err;
  pthread_mutex_lock(&c->wait);
  c->done = 1;
  pthread_cond_signal(&c->cond); /* under the lock: once it is released, c may be gone */
  pthread_mutex_unlock(&c->wait);
}

static void start_group(cb_send_groups *g, send_call *calls, int count);
static cb_unit *after_notify(send_call *calls, int one);
static int submit_then_notify(cb_runtime *rt, cb_unit *u, cb_unit_done done, void *arg, cb_unit *n);

/* Takes the sends waiting (up to GROUP_MAX) when a group may leave now:
 * none is on its way, or (stalled) the one on its way has been out for
 * STALL_MS and a connection is free for another; [g->lock] held. */
static send_call *take_waiting(cb_send_groups *g, int *count, int stalled) {
  *count = 0;
  if (g->head == NULL || g->leading) return NULL;
  if (g->out > 0 && !(stalled && g->out < cb_runtime_pool_size(g->rt))) return NULL;
  send_call *calls = g->head, *last = calls;
  *count = 1;
  while (last->next && *count < GROUP_MAX) last = last->next, (*count)++;
  g->head = last->next;
  if (g->head == NULL) g->tail = NULL;
  last->next = NULL;
  g->out++;
  return calls;
}

/* A group came back (its callers answered), or could not leave: the next
 * one leaves, not from here but from the thread of its first caller, woken
 * for it. While that thread wakes, the callers just answered have time to
 * send again and join (8 callers: 0.14-0.18 commits per command rather than
 * 0.17-0.23 when the loop thread took out whoever was waiting). */
static void group_finished(cb_send_groups *g) {
  pthread_mutex_lock(&g->lock);
  g->out--;
  if (g->head) {
    send_call *first = g->head; /* waits until taken out, which takes g->lock */
    g->leading = 1;
    pthread_mutex_lock(&first->wait);
    first->lead = 1;
    pthread_cond_signal(&first->cond);
    pthread_mutex_unlock(&first->wait);
  }
  pthread_mutex_unlock(&g->lock);
}

static void alone_done(cb_unit *u, void *arg) {
  send_call *c = arg;
  cb_err err;
  int rc = send_outcome(u, &err);
  if (rc == CB_OK) cb_bus_read_send(u, 0, c->n, c->results);
  answer(c, rc, &err);
}

static void group_done(cb_unit *u, void *arg) {
  send_group *grp = arg;
  cb_send_groups *g = grp->g;
  cb_err err;
  int rc = send_outcome(u, &err);
  int again = rc != CB_OK && grp->count > 1 && rc != CB_ECONNECTION && rc != CB_ECLOSED;
  for (send_call *c = grp->calls, *next; c; c = next) {
    next = c->next; /* c may be gone once answered */
    if (again) {    /* each alone: the server tells which one it refuses */
      if (submit_then_notify(g->rt, c->unit, alone_done, c, after_notify(c, 1)) != CB_OK) {
        cb_err closed;
        cb_err_set(&closed, CB_ECLOSED, "the runtime is closed");
        answer(c, CB_ECLOSED, &closed);
      }
      continue;
    }
    if (rc == CB_OK && c->row >= 0) read_send_row(cb_unit_result(u, c->first), c->row, &c->results[0]);
    else if (rc == CB_OK) cb_bus_read_send(u, c->first, c->n, c->results);
    answer(c, rc, &err);
  }
  if (grp->count > 1) cb_unit_free(u); /* a group of one ran the caller's own unit */
  free(grp);
  group_finished(g);
}

/* The group's statements: the single sends to one domain (and delay) as one
 * statement of send_sql over their JSON objects (send_fresh_sql's when none
 * has an id its caller gave or a dedup key), in the order they came (a
 * second command with an id or a dedup key another one of the statement
 * has is a duplicate, as if it came later), and one notify per domain; any
 * other send as its own statements. */
static int build_group(cb_unit *u, send_call *calls) {
  for (send_call *c = calls; c; c = c->next) c->row = -2; /* not placed yet */
  cb_strbuf json = {0};
  char sql[6144], queue[CB_QUEUE_NAME_MAX + 1];
  int rc = CB_OK;
  for (send_call *c = calls; rc == CB_OK && c; c = c->next) {
    if (c->row != -2) continue;
    int mates = 0, flags = c->one ? c->one->flags : 0;
    for (send_call *d = c->next; c->one && d; d = d->next)
      if (d->row == -2 && d->one && strcmp(d->domain, c->domain) == 0 && strcmp(d->delay, c->delay) == 0) {
        mates++;
        flags |= d->one->flags;
      }
    if (mates == 0) { /* alone: its own statements */
      c->row = -1;
      c->first = cb_unit_count(u);
      rc = cb_unit_append(u, c->unit);
      continue;
    }
    cb_strbuf_reset(&json);
    cb_strbuf_putc(&json, '[');
    int row = 0;
    for (send_call *d = c; d; d = d->next) {
      if (d->row != -2 || !d->one || strcmp(d->domain, c->domain) != 0 || strcmp(d->delay, c->delay) != 0) continue;
      if (row) cb_strbuf_putc(&json, ',');
      put_element(&json, d->one->spec, d->one->id, d->one->corr, d->one->batch, flags == 0 ? c->domain : NULL);
      d->first = cb_unit_count(u);
      d->row = row++;
    }
    cb_strbuf_putc(&json, ']');
    cb_command_queue_name(c->domain, queue);
    const char *params[] = {json.data, c->domain, c->delay};
    if (json.failed) rc = CB_ENOMEM;
    else if ((flags == 0 ? send_fresh_sql(sql, sizeof sql, queue)
                         : send_sql(sql, sizeof sql, queue, "", "jsonb_array_elements($1::jsonb) WITH ORDINALITY",
                                    flags & SEND_DEDUP, 0)) != CB_OK)
      rc = CB_EINTERNAL;
    else if (cb_unit_add(u, sql, 3, params) < 0 || (!c->after && cb_queue_add_notify(u, queue) < 0)) rc = CB_ENOMEM;
  }
  cb_strbuf_free(&json);
  return rc;
}

/* notify_after_commit: the notifies of the calls (of the first only, with
 * one) whose units lack theirs, one per queue, as a unit of their own to
 * run after the calls' (submit_then_notify), or NULL. A crash between the
 * two transactions loses the wake-up only: workers poll (poll_interval). */
static cb_unit *after_notify(send_call *calls, int one) {
  cb_unit *n = NULL;
  for (send_call *c = calls; c; c = one ? NULL : c->next) {
    if (!c->after) continue;
    int seen = 0;
    for (send_call *d = calls; d != c && !seen; d = d->next) seen = d->after && strcmp(d->domain, c->domain) == 0;
    if (seen) continue;
    char queue[CB_QUEUE_NAME_MAX + 1];
    cb_command_queue_name(c->domain, queue);
    if (n == NULL) n = cb_unit_new();
    if (n == NULL || cb_queue_add_notify(n, queue) < 0) break; /* the poll will find the rows */
  }
  return n;
}

typedef struct then_notify {
  cb_unit *rows;
  cb_unit_done done;
  void *arg;
} then_notify;

static void notified(cb_unit *n, void *arg) {
  then_notify t = *(then_notify *)arg;
  free(arg);
  cb_unit_free(n);
  t.done(t.rows, t.arg);
}

/* Submits u, whose completion calls done, and then the notify unit n (may
 * be NULL; taken over) on the same connection, in the same round trip (a
 * second pipeline segment: its transaction starts once u's has committed,
 * or failed). done is called once n is back too, so that a send returns
 * after its wake-up went out, as with the notify inside. */
static int submit_then_notify(cb_runtime *rt, cb_unit *u, cb_unit_done done, void *arg, cb_unit *n) {
  then_notify *t = n ? malloc(sizeof *t) : NULL;
  if (t == NULL) { /* none, or no memory: without the wake-up (the poll finds the rows) */
    cb_unit_free(n);
    cb_unit_on_done(u, done, arg);
    return cb_runtime_submit(rt, &u, 1);
  }
  *t = (then_notify){u, done, arg};
  cb_unit_on_done(u, NULL, NULL);
  cb_unit_on_done(n, notified, t);
  cb_unit *units[2] = {u, n};
  int rc = cb_runtime_submit(rt, units, 2);
  if (rc != CB_OK) {
    free(t);
    cb_unit_free(n);
    cb_unit_on_done(u, done, arg);
  }
  return rc;
}

/* Runs the group's unit u (and the notify after it, if any) on the
 * runtime's send connection from this thread (pg.c's cb__direct_exec), and
 * answers the group as group_done does; -1 when the connection is in use
 * or cannot be had: the group then goes through the loop. */
static int run_direct(cb_send_groups *g, cb_unit *u, send_group *grp) {
  cb_unit *n = after_notify(grp->calls, 0);
  cb_unit *units[2] = {u, n};
  cb_unit_on_done(u, NULL, NULL);
  if (n) cb_unit_on_done(n, NULL, NULL);
  int rc = cb__direct_exec(g->rt, units, n ? 2 : 1);
  cb_unit_free(n);
  if (rc != 0) return -1;
  group_done(u, grp);
  return 0;
}

/* Builds the group's transaction and runs it, on the send connection from
 * this caller's thread, or else through the loop. */
static void start_group(cb_send_groups *g, send_call *calls, int count) {
  send_group *grp = calloc(1, sizeof *grp);
  cb_unit *u = NULL;
  int rc = grp ? CB_OK : CB_ENOMEM;
  if (rc == CB_OK && count == 1) {
    u = calls->unit;
    calls->first = 0;
    calls->row = -1;
  } else if (rc == CB_OK) {
    u = cb_unit_new();
    rc = u ? CB_OK : CB_ENOMEM;
    if (rc == CB_OK) rc = build_group(u, calls);
  }
  if (rc == CB_OK) {
    grp->g = g;
    grp->calls = calls;
    grp->count = count;
    if (run_direct(g, u, grp) == 0) return;
    rc = submit_then_notify(g->rt, u, group_done, grp, after_notify(calls, 0));
  }
  if (rc == CB_OK) return;
  if (u && count > 1) cb_unit_free(u);
  else if (u) cb_unit_on_done(u, NULL, NULL);
  free(grp);
  cb_err err;
  cb_err_set(&err, rc,
             rc == CB_ENOMEM      ? "out of memory"
             : rc == CB_EINTERNAL ? "the send statement does not fit its buffer"
                                  : "the runtime is closed");
  for (send_call *c = calls, *next; c; c = next) {
    next = c->next;
    answer(c, rc, &err);
  }
  group_finished(g);
}

/* Runs u (the statements of one send) in a shared transaction. */
static int exec_send_shared(cb_runtime *rt, cb_unit *u, size_t n, cb_send_result *results, const char *domain,
                            const char *delay, const send_one *one, int after, cb_err *err) {
  /* Alone: a send too big to join, or no groups (the deadlock, the fork or
   * the lack of memory is reported by exec_send). */
  cb_send_groups *g = n > SHARE_MAX || cb_runtime_on_loop(rt) ? NULL : cb_runtime_part_of(rt, &send_groups_part);
  if (g == NULL && after) { /* no groups: the notify inside after all */
    char queue[CB_QUEUE_NAME_MAX + 1];
    cb_command_queue_name(domain, queue);
    if (cb_queue_add_notify(u, queue) < 0) return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  if (g == NULL) {
    int rc = exec_send(rt, u, err);
    if (rc == CB_OK) cb_bus_read_send(u, 0, n, results);
    return rc;
  }
  send_call c = {.g = g,
                 .unit = u,
                 .n = n,
                 .results = results,
                 .domain = domain,
                 .delay = delay,
                 .one = one,
                 .after = after,
                 .rc = CB_OK};
  pthread_condattr_t monotonic;
  pthread_condattr_init(&monotonic);
  pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC);
  pthread_cond_init(&c.cond, &monotonic);
  pthread_condattr_destroy(&monotonic);
  pthread_mutex_init(&c.wait, NULL);
  pthread_mutex_lock(&g->lock);
  if (g->tail) g->tail->next = &c;
  else g->head = &c;
  g->tail = &c;
  int count;
  send_call *calls = take_waiting(g, &count, 0);
  pthread_mutex_unlock(&g->lock);
  if (calls) start_group(g, calls, count);
  struct timespec until;
  pthread_mutex_lock(&c.wait);
  for (int waited = 0; !c.done;) {
    if (!waited) { /* a first wait, or one after the call took a group out */
      clock_gettime(CLOCK_MONOTONIC, &until);
      long ns = until.tv_nsec + STALL_MS * 1000000L;
      until.tv_sec += ns / 1000000000L;
      until.tv_nsec = ns % 1000000000L;
      waited = 1;
    }
    int lead = c.lead;
    if (!lead && pthread_cond_timedwait(&c.cond, &c.wait, &until) != ETIMEDOUT) continue;
    if (c.done) break;
    /* Woken by group_finished to lead (this call and those behind it
     * leave), or STALL_MS passed. In the latter case, when this call is
     * first in line, the group on its way left before it came and has
     * been out for STALL_MS (waiting for a lock, say on an id another
     * transaction is inserting, or a slow server): then the next group
     * leaves on another connection rather than wait behind it. */
    lead = c.lead;
    c.lead = 0;
    pthread_mutex_unlock(&c.wait);
    pthread_mutex_lock(&g->lock);
    calls = NULL;
    if (lead) g->leading = 0;
    if (lead || g->head == &c) calls = take_waiting(g, &count, 1); /* beside a stalled group, if one is still out */
    pthread_mutex_unlock(&g->lock);
    if (calls) start_group(g, calls, count);
    waited = 0;
    pthread_mutex_lock(&c.wait);
  }
  pthread_mutex_unlock(&c.wait);
  pthread_mutex_destroy(&c.wait);
  pthread_cond_destroy(&c.cond);
  cb_unit_on_done(u, NULL, NULL);
  if (c.rc != CB_OK) *err = c.err;
  return c.rc;
}

int cb_bus_send(cb_runtime *rt, const char *domain, const cb_command_spec *specs, size_t n, double delay,
                cb_send_result *results, cb_err *err) {
  if (n == 0) return cb_domain_valid(domain, err);
  if (copy_eligible(specs, n, delay)) return send_by_copy(rt, domain, specs, n, results, err);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  send_one one;
  char delay_text[32];
  delay_param(delay_text, delay);
  /* notify_after_commit: the unit without its notify, which follows it */
  int after = cb_runtime_notify_after_commit(rt) && n <= SHARE_MAX && !cb_runtime_on_loop(rt);
  int rc = add_send(rt, u, domain, specs, n, delay, results, NULL, &one, after, 1, err);
  if (rc == CB_OK) rc = exec_send_shared(rt, u, n, results, domain, delay_text, n == 1 ? &one : NULL, after, err);
  cb_unit_free(u);
  if (rc == CB_OK && n == 1 && results[0].duplicate) {
    if (strcmp(results[0].duplicate_of, results[0].command_id) != 0)
      return cb_err_set(err, CB_EDUPLICATE,
                        "dedup key `%.200s` is held by command %s in domain %s until its window ends",
                        specs[0].dedup_key, results[0].duplicate_of, domain);
    return cb_err_set(err, CB_EDUPLICATE, "command %s already exists in domain %s", results[0].command_id, domain);
  }
  return rc;
}

/* ---- a send with more statements -------------------------------------------------
 *
 * A unit that begins with cb_bus_add_send's statements and carries the
 * caller's after them (cb_await_send's registration of its waiter), run in
 * a shared transaction as cb_bus_send runs its own: never merged into
 * another send's statement, which would leave the caller's statements out. */
int cb_bus_send_unit(cb_runtime *rt, cb_unit *u, size_t n, cb_send_result *results, cb_err *err) {
  return exec_send_shared(rt, u, n, results, NULL, NULL, NULL, 0, err);
}

/* ---- queries ------------------------------------------------------------------- */

#define COMMAND_COLUMNS                                                                                            \
  "domain, command_id::text AS command_id, command_type AS type, status, attempts, max_attempts, msg_id, "         \
  "queue_name, nullif(reply_queue, '') AS reply_to, correlation_id::text AS correlation_id, "                      \
  "batch_id::text AS batch_id, last_error_type, last_error_code, last_error_msg, created_at::text AS created_at, " \
  "updated_at::text AS updated_at, lease_expires_at::text AS lease_expires_at"

int cb_bus_run_query(cb_runtime *rt, cb_unit *u, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  int rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22P02") == 0)
    rc = cb_err_set(err, CB_EINVAL, "invalid argument: %s", err->message);
  if (rc != CB_OK) {
    cb_unit_free(u);
    return rc;
  }
  *rows = u;
  return CB_OK;
}

int cb_bus_query(cb_runtime *rt, const char *sql, int nparams, const char *const *params, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  cb_unit_add(u, sql, nparams, params);
  return cb_bus_run_query(rt, u, rows, err);
}

static int check_id(const char *what, const char *id, char *out, cb_err *err) {
  if (!cb_uuid_parse(id, out)) return cb_err_set(err, CB_EINVAL, "%s `%.60s` is not a UUID", what, id ? id : "");
  return CB_OK;
}

int cb_bus_get_command(cb_runtime *rt, const char *domain, const char *command_id, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  char id[CB_UUID_LEN + 1];
  int rc = cb_domain_valid(domain, err);
  if (rc == CB_OK) rc = check_id("command id", command_id, id, err);
  if (rc != CB_OK) return rc;
  const char *params[] = {domain, id};
  rc = cb_bus_query(rt,
                    "SELECT " COMMAND_COLUMNS " FROM commandbus.command WHERE domain = $1 AND command_id = $2::uuid", 2,
                    params, rows, err);
  if (rc == CB_OK && cb_result_rows(cb_unit_result(*rows, 0)) == 0) {
    cb_unit_free(*rows);
    *rows = NULL;
    return cb_err_set(err, CB_ENOTFOUND, "unknown command `%s` in domain %s", id, domain);
  }
  return rc;
}

int cb_bus_list_commands(cb_runtime *rt, const cb_command_filter *f, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  int rc = cb_domain_valid(f->domain, err);
  if (rc != CB_OK) return rc;
  char corr[CB_UUID_LEN + 1], batch[CB_UUID_LEN + 1], limit[16], offset[16];
  if (f->correlation_id && (rc = check_id("correlation_id", f->correlation_id, corr, err)) != CB_OK) return rc;
  if (f->batch_id && (rc = check_id("batch_id", f->batch_id, batch, err)) != CB_OK) return rc;
  if (f->offset < 0) return cb_err_set(err, CB_EINVAL, "offset must not be negative");
  snprintf(limit, sizeof limit, "%d", f->limit > 0 ? f->limit : 100);
  snprintf(offset, sizeof offset, "%d", f->offset);
  const char *params[] = {
      f->domain, f->status, f->command_type, f->correlation_id ? corr : NULL, f->batch_id ? batch : NULL,
      limit,     offset};
  return cb_bus_query(rt,
                      "SELECT " COMMAND_COLUMNS
                      " FROM commandbus.command WHERE domain = $1"
                      " AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR command_type = $3)"
                      " AND ($4::uuid IS NULL OR correlation_id = $4) AND ($5::uuid IS NULL OR batch_id = $5)"
                      " ORDER BY created_at, command_id LIMIT $6::int OFFSET $7::int",
                      7, params, rows, err);
}

int cb_bus_audit(cb_runtime *rt, const char *domain, const char *command_id, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  char id[CB_UUID_LEN + 1];
  int rc = cb_domain_valid(domain, err);
  if (rc == CB_OK) rc = check_id("command id", command_id, id, err);
  if (rc != CB_OK) return rc;
  const char *params[] = {domain, id};
  return cb_bus_query(rt,
                      "SELECT audit_id, event_type, ts::text AS ts, details_json AS details FROM commandbus.audit"
                      " WHERE domain = $1 AND command_id = $2::uuid ORDER BY audit_id",
                      2, params, rows, err);
}

/* ---- batches ---------------------------------------------------------------------- */

#define BATCH_COUNTS                                                                                   \
  "SELECT count(*) AS total,"                                                                          \
  " count(*) FILTER (WHERE status IN ('PENDING', 'IN_PROGRESS', 'IN_TROUBLESHOOTING_QUEUE')) AS open," \
  " count(*) FILTER (WHERE status = 'PENDING') AS pending,"                                            \
  " count(*) FILTER (WHERE status = 'COMPLETED') AS completed,"                                        \
  " count(*) FILTER (WHERE status = 'CANCELED') AS canceled,"                                          \
  " count(*) FILTER (WHERE status = 'FAILED') AS failed,"                                              \
  " count(*) FILTER (WHERE status = 'IN_TROUBLESHOOTING_QUEUE') AS tsq"                                \
  " FROM commandbus.command WHERE domain = $1 AND batch_id = $2::uuid"

int cb_bus_add_batch_refresh(cb_unit *u, const char *domain, const char *batch_id) {
  const char *params[] = {domain, batch_id};
  /* The rule lives in the database (core/sql/005_shared_with_rcmd.sql), where
   * rcmd's batch procedures apply it too. */
  return cb_unit_add(u, "SELECT commandbus.batch_refresh($1, $2::uuid)", 2, params);
}

int cb_bus_create_batch(cb_runtime *rt, const char *domain, const char *name, const char *custom_data_json,
                        cb_command_spec *specs, size_t n, cb_send_result *results, char *batch_id, cb_err *err) {
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (n == 0) return cb_err_set(err, CB_EINVAL, "a batch needs at least one command");
  cb_uuid_v7(batch_id);
  char total[24];
  snprintf(total, sizeof total, "%zu", n);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {domain, batch_id, name, custom_data_json, total};
  cb_unit_add(u,
              "INSERT INTO commandbus.batch (domain, batch_id, name, custom_data, status, total_count, batch_type)"
              " VALUES ($1, $2::uuid, $3, $4::jsonb, 'PENDING', $5::int, 'COMMAND')",
              5, params);
  int first = cb_unit_count(u);
  const cb_send_options joined = {.batch_id = batch_id};
  rc = cb_bus_add_send(rt, u, domain, specs, n, 0, results, &joined, err);
  /* The total counts the commands that joined: an id that already existed
   * elsewhere is reported as a duplicate and is not part of the batch. */
  const char *count_params[] = {domain, batch_id};
  if (rc == CB_OK &&
      cb_unit_add(u,
                  "UPDATE commandbus.batch SET total_count = (SELECT count(*) FROM commandbus.command"
                  " WHERE domain = $1 AND batch_id = $2::uuid) WHERE domain = $1 AND batch_id = $2::uuid",
                  2, count_params) < 0)
    rc = cb_err_set(err, CB_ENOMEM, "out of memory");
  if (rc == CB_OK) rc = exec_send(rt, u, err);
  if (rc == CB_OK) cb_bus_read_send(u, first, n, results);
  cb_unit_free(u);
  return rc;
}

#define BATCH_COLUMNS                                                                      \
  "b.domain, b.batch_id::text AS batch_id, b.name, b.custom_data, b.status, b.batch_type," \
  " b.total_count, b.created_at::text AS created_at, b.started_at::text AS started_at,"    \
  " b.completed_at::text AS completed_at"

int cb_bus_get_batch(cb_runtime *rt, const char *domain, const char *batch_id, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  char id[CB_UUID_LEN + 1];
  int rc = cb_domain_valid(domain, err);
  if (rc == CB_OK) rc = check_id("batch id", batch_id, id, err);
  if (rc != CB_OK) return rc;
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  /* Refresh first: reading a batch is enough to observe its completion. */
  cb_bus_add_batch_refresh(u, domain, id);
  const char *params[] = {domain, id};
  cb_unit_add(u,
              "WITH s AS (" BATCH_COUNTS ") SELECT " BATCH_COLUMNS
              ", s.completed AS completed_count,"
              " s.canceled AS canceled_count, s.failed AS failed_count, s.tsq AS in_troubleshooting_count,"
              " s.pending AS pending_count, s.open - s.pending - s.tsq AS in_progress_count"
              " FROM commandbus.batch b, s WHERE b.domain = $1 AND b.batch_id = $2::uuid",
              2, params);
  rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_OK && cb_result_rows(cb_unit_result(u, 1)) == 0)
    rc = cb_err_set(err, CB_ENOTFOUND, "unknown batch `%s` in domain %s", id, domain);
  if (rc != CB_OK) {
    cb_unit_free(u);
    return rc;
  }
  *rows = u;
  return CB_OK;
}

int cb_bus_list_batches(cb_runtime *rt, const char *domain, const char *status, int limit, int offset, cb_unit **rows,
                        cb_err *err) {
  *rows = NULL;
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (offset < 0) return cb_err_set(err, CB_EINVAL, "offset must not be negative");
  char l[16], o[16];
  snprintf(l, sizeof l, "%d", limit > 0 ? limit : 100);
  snprintf(o, sizeof o, "%d", offset);
  const char *params[] = {domain, status, l, o};
  return cb_bus_query(rt,
                      "SELECT " BATCH_COLUMNS
                      ", c.completed AS completed_count, c.canceled AS canceled_count,"
                      " c.failed AS failed_count, c.tsq AS in_troubleshooting_count FROM commandbus.batch b"
                      " CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE status = 'COMPLETED') AS completed,"
                      " count(*) FILTER (WHERE status = 'CANCELED') AS canceled,"
                      " count(*) FILTER (WHERE status = 'FAILED') AS failed,"
                      " count(*) FILTER (WHERE status = 'IN_TROUBLESHOOTING_QUEUE') AS tsq"
                      " FROM commandbus.command k WHERE k.domain = b.domain AND k.batch_id = b.batch_id) c"
                      " WHERE b.domain = $1 AND ($2::text IS NULL OR b.status = $2)"
                      " ORDER BY b.created_at DESC LIMIT $3::int OFFSET $4::int",
                      4, params, rows, err);
}
