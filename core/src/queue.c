/* commandbus: the queue client (see queue.h). */
#include "commandbus/queue.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "queue_layout.h"
#include "strbuf.h"

#define SQL_MAX 1024

/* Every queue DDL statement runs under this transaction-level advisory lock,
 * so that two processes creating queues at once never race on the schema. */
#define QUEUE_DDL_LOCK "SELECT pg_advisory_xact_lock(7236871042)"

int cb_queue_name_valid(const char *name, cb_err *err) {
  if (name == NULL) return cb_err_set(err, CB_EINVAL, "queue name expected, got nothing");
  size_t n = strlen(name);
  if (n == 0) return cb_err_set(err, CB_EINVAL, "queue name is empty");
  if (n > CB_QUEUE_NAME_MAX)
    return cb_err_set(err, CB_EINVAL, "queue name is %zu bytes long; at most %d allowed", n, CB_QUEUE_NAME_MAX);
  for (size_t i = 0; i < n; i++) {
    char c = name[i];
    if (!((c >= 'a' && c <= 'z') || c == '_' || (i > 0 && c >= '0' && c <= '9')))
      return cb_err_set(err, CB_EINVAL,
                        "invalid queue name `%.60s`: use lower-case letters, digits and _, not starting with a digit",
                        name);
  }
  return CB_OK;
}

static void fmt_double(char *buf, size_t len, double v) { snprintf(buf, len, "%.6f", v); }

static int add_sql(cb_unit *u, int flags, const char *params[], int nparams, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int add_sql(cb_unit *u, int flags, const char *params[], int nparams, const char *fmt, ...) {
  char sql[SQL_MAX];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(sql, sizeof sql, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof sql) return CB_EINTERNAL;
  return cb_unit_add_flags(u, sql, nparams, params, flags);
}

/* An id list as a PostgreSQL array literal: "{1,2,3}". malloc'd. */
static char *id_array(const int64_t *ids, size_t n) {
  char *s = malloc(n * 21 + 3);
  if (s == NULL) return NULL;
  char *p = s;
  *p++ = '{';
  for (size_t i = 0; i < n; i++) p += sprintf(p, i ? ",%" PRId64 : "%" PRId64, ids[i]);
  *p++ = '}';
  *p = '\0';
  return s;
}

/* ---- the layout (queue_layout.h) ------------------------------------------------ */

void cb_queue_channel(const char *queue, char out[CB_QUEUE_CHANNEL_MAX]) {
  cb_str_join(out, CB_QUEUE_CHANNEL_MAX, "pgmq_notify_", queue);
}

void cb_queue_sql_table(cb_strbuf *b, const char *queue) { cb_strbuf_printf(b, "pgmq.q_%s", queue); }

void cb_queue_sql_archive_table(cb_strbuf *b, const char *queue) { cb_strbuf_printf(b, "pgmq.a_%s", queue); }

void cb_queue_sql_visible(cb_strbuf *b, const char *queue, const char *limit) {
  cb_strbuf_printf(b,
                   "SELECT msg_id FROM pgmq.q_%s WHERE " CB_QUEUE_SQL_VISIBLE
                   " ORDER BY msg_id LIMIT %s"
                   " FOR UPDATE SKIP LOCKED",
                   queue, limit);
}

void cb_queue_sql_set_vt(cb_strbuf *b, const char *queue, const char *seconds) {
  cb_strbuf_printf(b, "UPDATE pgmq.q_%s q SET vt = clock_timestamp() + make_interval(secs => %s)", queue, seconds);
}

void cb_queue_sql_receive(cb_strbuf *b, const char *queue, const char *ids, const char *seconds) {
  cb_queue_sql_set_vt(b, queue, seconds);
  cb_strbuf_printf(b, ", read_ct = q.read_ct + 1 WHERE q.msg_id = ANY(%s)", ids);
}

void cb_queue_sql_receive_locked(cb_strbuf *b, const char *queue, const char *ctids, const char *seconds) {
  cb_queue_sql_set_vt(b, queue, seconds);
  cb_strbuf_printf(b, ", read_ct = q.read_ct + 1 WHERE q.ctid = ANY(%s)", ctids);
}

/* `msg_id = ANY(ARRAY(...))`, not a join: a join is planned as a hash over
 * a scan of the whole queue, slower as the queue and its dead rows grow;
 * this is primary-key lookups. */
void cb_queue_sql_read(cb_strbuf *b, const char *queue, const char *limit, const char *seconds) {
  cb_strbuf ids = {0};
  cb_strbuf_puts(&ids, "ARRAY(");
  cb_queue_sql_visible(&ids, queue, limit);
  cb_strbuf_putc(&ids, ')');
  if (ids.failed) b->failed = 1;
  else cb_queue_sql_receive(b, queue, ids.data, seconds);
  cb_strbuf_free(&ids);
}

void cb_queue_sql_delete(cb_strbuf *b, const char *queue, const char *ids) {
  cb_strbuf_printf(b, "DELETE FROM pgmq.q_%s q WHERE q.msg_id = ANY(%s)", queue, ids);
}

void cb_queue_sql_insert(cb_strbuf *b, const char *queue) {
  cb_strbuf_printf(b, "INSERT INTO pgmq.q_%s (vt, message)", queue);
}

/* Through jsonb, column by column by name: the same statement serves the
 * layouts before and after pgmq 1.5, and archived_at is stamped here (an
 * explicit NULL would not take the column's default). */
void cb_queue_sql_archive(cb_strbuf *b, const char *queue, const char *ids) {
  cb_strbuf_puts(b, "x AS (");
  cb_queue_sql_delete(b, queue, ids);
  cb_strbuf_printf(b,
                   " RETURNING q.*), ar AS (INSERT INTO pgmq.a_%s SELECT r.* FROM x,"
                   " jsonb_populate_record(NULL::pgmq.a_%s, to_jsonb(x) || jsonb_build_object('archived_at', now()))"
                   " r RETURNING msg_id)",
                   queue, queue);
}

/* ---- statement builders --------------------------------------------------------- */

/* Appends the statement in sql to u and frees sql: the statement's index,
 * or a negative cb_code. */
static int add_built(cb_unit *u, cb_strbuf *sql, int nparams, const char *const *params) {
  int i = sql->failed ? CB_ENOMEM : cb_unit_add(u, sql->data, nparams, params);
  cb_strbuf_free(sql);
  return i;
}

int cb_queue_add_notify(cb_unit *u, const char *queue) {
  char channel[CB_QUEUE_CHANNEL_MAX];
  cb_queue_channel(queue, channel);
  const char *params[] = {channel};
  return cb_unit_add(u, "SELECT pg_notify($1, '')", 1, params);
}

/* A send: the insert whose values the SELECT `from` gives, then the
 * notification. */
static int add_send(cb_unit *u, const char *queue, const char *json, double delay, const char *from) {
  char d[32];
  fmt_double(d, sizeof d, delay);
  const char *params[] = {json, d};
  cb_strbuf sql = {0};
  cb_queue_sql_insert(&sql, queue);
  cb_strbuf_printf(&sql, " %s RETURNING msg_id", from);
  int i = add_built(u, &sql, 2, params);
  if (i < 0) return i;
  int rc = cb_queue_add_notify(u, queue);
  return rc < 0 ? rc : i;
}

int cb_queue_add_send(cb_unit *u, const char *queue, const char *json, double delay) {
  return add_send(u, queue, json, delay, "VALUES (clock_timestamp() + make_interval(secs => $2::float8), $1::jsonb)");
}

int cb_queue_add_send_batch(cb_unit *u, const char *queue, const char *json_array, double delay) {
  return add_send(u, queue, json_array, delay,
                  "SELECT clock_timestamp() + make_interval(secs => $2::float8), m"
                  " FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(m, i) ORDER BY i");
}

#define RETURNING_MESSAGES " RETURNING q.msg_id, q.read_ct, q.enqueued_at, q.vt, q.message"

int cb_queue_add_read(cb_unit *u, const char *queue, double vt, int qty) {
  char v[32], q[16];
  fmt_double(v, sizeof v, vt);
  snprintf(q, sizeof q, "%d", qty);
  const char *params[] = {v, q};
  cb_strbuf sql = {0};
  cb_queue_sql_read(&sql, queue, "$2::int", "$1::float8");
  cb_strbuf_puts(&sql, RETURNING_MESSAGES);
  return add_built(u, &sql, 2, params);
}

int cb_queue_add_pop(cb_unit *u, const char *queue, int qty) {
  char q[16];
  snprintf(q, sizeof q, "%d", qty);
  const char *params[] = {q};
  cb_strbuf ids = {0}, sql = {0};
  cb_strbuf_puts(&ids, "ARRAY(");
  cb_queue_sql_visible(&ids, queue, "$1::int");
  cb_strbuf_putc(&ids, ')');
  if (ids.failed) sql.failed = 1;
  else cb_queue_sql_delete(&sql, queue, ids.data);
  cb_strbuf_free(&ids);
  cb_strbuf_puts(&sql, RETURNING_MESSAGES);
  return add_built(u, &sql, 1, params);
}

int cb_queue_add_delete(cb_unit *u, const char *queue, const int64_t *ids, size_t n) {
  char *arr = id_array(ids, n);
  if (arr == NULL) return CB_ENOMEM;
  const char *params[] = {arr};
  cb_strbuf sql = {0};
  cb_queue_sql_delete(&sql, queue, "$1::bigint[]");
  cb_strbuf_puts(&sql, " RETURNING q.msg_id");
  int i = add_built(u, &sql, 1, params);
  free(arr);
  return i;
}

int cb_queue_add_archive(cb_unit *u, const char *queue, const int64_t *ids, size_t n) {
  char *arr = id_array(ids, n);
  if (arr == NULL) return CB_ENOMEM;
  const char *params[] = {arr};
  cb_strbuf sql = {0};
  cb_strbuf_puts(&sql, "WITH ");
  cb_queue_sql_archive(&sql, queue, "$1::bigint[]");
  cb_strbuf_puts(&sql, " SELECT msg_id FROM ar");
  int i = add_built(u, &sql, 1, params);
  free(arr);
  return i;
}

int cb_queue_add_set_vt(cb_unit *u, const char *queue, int64_t id, double vt) {
  char v[32], idtext[24];
  fmt_double(v, sizeof v, vt);
  snprintf(idtext, sizeof idtext, "%" PRId64, id);
  const char *params[] = {idtext, v};
  cb_strbuf sql = {0};
  cb_queue_sql_set_vt(&sql, queue, "$2::float8");
  cb_strbuf_puts(&sql, " WHERE q.msg_id = $1::bigint" RETURNING_MESSAGES);
  return add_built(u, &sql, 2, params);
}

/* ---- results ---------------------------------------------------------------- */

void cb_messages_free(cb_messages *m) {
  if (m == NULL) return;
  free(m->items);
  cb_unit_free(m->owner);
  m->items = NULL;
  m->owner = NULL;
  m->count = 0;
}

int cb_messages_take(cb_messages *m, cb_unit *u, int index, cb_err *err) {
  const cb_result *r = cb_unit_result(u, index);
  int rows = cb_result_rows(r);
  m->count = 0;
  m->items = NULL;
  m->owner = u;
  if (rows == 0) return CB_OK;
  m->items = calloc((size_t)rows, sizeof *m->items);
  if (m->items == NULL) {
    cb_messages_free(m);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  for (int i = 0; i < rows; i++) {
    cb_message *msg = &m->items[i];
    msg->msg_id = cb_result_int(r, i, 0);
    msg->read_ct = (int32_t)cb_result_int(r, i, 1);
    msg->enqueued_at = cb_result_value(r, i, 2);
    msg->vt = cb_result_value(r, i, 3);
    msg->message = cb_result_is_null(r, i, 4) ? NULL : cb_result_value(r, i, 4);
  }
  /* The UPDATE ... RETURNING of a read comes back in no particular order;
   * callers expect queue order. */
  for (size_t i = 1; i < (size_t)rows; i++) {
    cb_message x = m->items[i];
    size_t j = i;
    while (j > 0 && m->items[j - 1].msg_id > x.msg_id) {
      m->items[j] = m->items[j - 1];
      j--;
    }
    m->items[j] = x;
  }
  m->count = (size_t)rows;
  return CB_OK;
}

static int64_t *ids_of(const cb_result *r, size_t *count) {
  int rows = cb_result_rows(r);
  *count = (size_t)rows;
  int64_t *ids = malloc(((size_t)rows + 1) * sizeof *ids);
  if (ids == NULL) return NULL;
  for (int i = 0; i < rows; i++) ids[i] = cb_result_int(r, i, 0);
  return ids;
}

/* ---- blocking operations ------------------------------------------------------ */

/* Runs a unit built by `build` (which returns the index of the interesting
 * statement) on `queue`. On success *u_out holds the completed unit; the
 * caller frees it. A queue whose table does not exist is NOT_FOUND. */
static int run(cb_runtime *rt, const char *queue, cb_unit **u_out, int *index, int built, cb_unit *u, cb_err *err) {
  *u_out = NULL;
  if (built < 0) {
    cb_unit_free(u);
    return cb_err_set(err, built, "cannot build the statement: %s", cb_strerror(built));
  }
  int rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "42P01") == 0) /* undefined_table */
    rc = cb_err_set(err, CB_ENOTFOUND, "no queue `%s`", queue);
  if (rc != CB_OK) {
    cb_unit_free(u);
    return rc;
  }
  *index = built;
  *u_out = u;
  return CB_OK;
}

#define CHECK_NAME(q)                        \
  do {                                       \
    int rc_ = cb_queue_name_valid((q), err); \
    if (rc_ != CB_OK) return rc_;            \
  } while (0)

#define NEW_UNIT(u)           \
  cb_unit *u = cb_unit_new(); \
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory")

/* pgmq is there when its functions are: installed as an extension, or
 * loaded as plain SQL (pgmq's SQL-only install leaves no pg_extension row). */
static int pgmq_present(cb_runtime *rt, int *present, cb_err *err) {
  NEW_UNIT(u);
  cb_unit_add(u, "SELECT to_regprocedure('pgmq.create(text)') IS NOT NULL", 0, NULL);
  int rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_OK) *present = cb_result_value(cb_unit_result(u, 0), 0, 0)[0] == 't';
  cb_unit_free(u);
  return rc;
}

static int create_once(cb_runtime *rt, const char *queue, cb_err *err) {
  int pgmq = 0;
  int rc = pgmq_present(rt, &pgmq, err);
  if (rc != CB_OK) return rc;
  NEW_UNIT(u);
  const char *params[] = {queue};
  if (pgmq) {
    cb_unit_add_flags(u, "SELECT pgmq.create($1::text)", 1, params, CB_STMT_ONESHOT);
  } else {
    /* pgmq 1.5's tables, column for column, with its index names. */
    const int o = CB_STMT_ONESHOT;
    cb_unit_add_flags(u, QUEUE_DDL_LOCK, 0, NULL, o);
    cb_unit_add_flags(u, "CREATE SCHEMA IF NOT EXISTS pgmq", 0, NULL, o);
    cb_unit_add_flags(u,
                      "CREATE TABLE IF NOT EXISTS pgmq.meta (queue_name varchar UNIQUE NOT NULL, "
                      "is_partitioned boolean NOT NULL, is_unlogged boolean NOT NULL, "
                      "created_at timestamptz NOT NULL DEFAULT now())",
                      0, NULL, o);
    add_sql(u, o, NULL, 0,
            "CREATE TABLE IF NOT EXISTS pgmq.q_%s (msg_id bigint PRIMARY KEY GENERATED ALWAYS AS IDENTITY, "
            "read_ct integer NOT NULL DEFAULT 0, enqueued_at timestamptz NOT NULL DEFAULT now(), "
            "vt timestamptz NOT NULL, message jsonb, headers jsonb)",
            queue);
    add_sql(u, o, NULL, 0, "CREATE INDEX IF NOT EXISTS q_%s_vt_idx ON pgmq.q_%s (vt ASC)", queue, queue);
    add_sql(u, o, NULL, 0,
            "CREATE TABLE IF NOT EXISTS pgmq.a_%s (msg_id bigint PRIMARY KEY, read_ct integer NOT NULL DEFAULT 0, "
            "enqueued_at timestamptz NOT NULL DEFAULT now(), archived_at timestamptz NOT NULL DEFAULT now(), "
            "vt timestamptz NOT NULL, message jsonb, headers jsonb)",
            queue);
    add_sql(u, o, NULL, 0, "CREATE INDEX IF NOT EXISTS archived_at_idx_%s ON pgmq.a_%s (archived_at)", queue, queue);
    cb_unit_add_flags(u,
                      "INSERT INTO pgmq.meta (queue_name, is_partitioned, is_unlogged) VALUES ($1, false, false) "
                      "ON CONFLICT (queue_name) DO NOTHING",
                      1, params, o);
  }
  rc = cb_runtime_exec(rt, u, err);
  cb_unit_free(u);
  return rc;
}

/* Two processes creating the first queues of a database at once: the DDL
 * lock serialises them, but the one that waited may still see the catalog
 * as it was before the other committed (PostgreSQL refreshes a session's
 * catalog caches at the start of a transaction, not after an advisory
 * lock), and then collides on the schema or a table the other made. A new
 * transaction sees them. */
int cb_queue_create(cb_runtime *rt, const char *queue, cb_err *err) {
  CHECK_NAME(queue);
  cb_err local;
  cb_err *e = err ? err : &local;
  int rc = create_once(rt, queue, e);
  if (rc == CB_EDATABASE &&
      (strcmp(e->sqlstate, "23505") == 0 || strcmp(e->sqlstate, "42P06") == 0 || strcmp(e->sqlstate, "42P07") == 0))
    rc = create_once(rt, queue, e);
  return rc;
}

static int ensure_index_once(cb_runtime *rt, const char *queue, const char *suffix, const char *definition,
                             cb_err *err) {
  NEW_UNIT(u);
  cb_unit_add_flags(u, QUEUE_DDL_LOCK, 0, NULL, CB_STMT_ONESHOT);
  int rc = add_sql(u, CB_STMT_ONESHOT, NULL, 0, "CREATE INDEX IF NOT EXISTS q_%s_%s ON pgmq.q_%s %s", queue, suffix,
                   queue, definition);
  if (rc < 0) {
    cb_unit_free(u);
    return cb_err_set(err, rc, "the index statement for %s does not fit its buffer", queue);
  }
  rc = cb_runtime_exec(rt, u, err);
  cb_unit_free(u);
  return rc;
}

/* As for cb_queue_create: a process that waited for another's index may
 * not see it yet, and collide; a new transaction does. */
int cb_queue_ensure_index(cb_runtime *rt, const char *queue, const char *suffix, const char *definition, cb_err *err) {
  CHECK_NAME(queue);
  cb_err local;
  cb_err *e = err ? err : &local;
  int rc = ensure_index_once(rt, queue, suffix, definition, e);
  if (rc == CB_EDATABASE && (strcmp(e->sqlstate, "23505") == 0 || strcmp(e->sqlstate, "42P07") == 0))
    rc = ensure_index_once(rt, queue, suffix, definition, e);
  return rc;
}

int cb_queue_ensure_fillfactor(cb_runtime *rt, const char *queue, int percent, cb_err *err) {
  CHECK_NAME(queue);
  if (percent < 10 || percent > 100) return cb_err_set(err, CB_EINVAL, "fillfactor %d is outside 10..100", percent);
  /* Read first, so that a table that has one (the usual case) takes no
   * lock stronger than a read's. */
  char table[64];
  snprintf(table, sizeof table, "pgmq.q_%s", queue);
  const char *params[] = {table};
  NEW_UNIT(probe);
  cb_unit_add(probe,
              "SELECT EXISTS (SELECT 1 FROM pg_class c, unnest(coalesce(c.reloptions, '{}')) o"
              " WHERE c.oid = to_regclass($1) AND o LIKE 'fillfactor=%')",
              1, params);
  int rc = cb_runtime_exec(rt, probe, err);
  int set = rc == CB_OK && cb_result_value(cb_unit_result(probe, 0), 0, 0)[0] == 't';
  cb_unit_free(probe);
  if (rc != CB_OK || set) return rc;
  NEW_UNIT(u);
  cb_unit_add_flags(u, QUEUE_DDL_LOCK, 0, NULL, CB_STMT_ONESHOT);
  rc = add_sql(u, CB_STMT_ONESHOT, NULL, 0,
               "DO $cb$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_class c, unnest(coalesce(c.reloptions, '{}')) o"
               " WHERE c.oid = 'pgmq.q_%s'::regclass AND o LIKE 'fillfactor=%%') THEN"
               " ALTER TABLE pgmq.q_%s SET (fillfactor = %d); END IF; END $cb$",
               queue, queue, percent);
  if (rc < 0) {
    cb_unit_free(u);
    return cb_err_set(err, rc, "the fillfactor statement for %s does not fit its buffer", queue);
  }
  rc = cb_runtime_exec(rt, u, err);
  cb_unit_free(u);
  return rc;
}

int cb_queue_drop(cb_runtime *rt, const char *queue, int *existed, cb_err *err) {
  CHECK_NAME(queue);
  *existed = 0;
  char table[64];
  snprintf(table, sizeof table, "pgmq.q_%s", queue);
  NEW_UNIT(probe);
  const char *tp[] = {table};
  cb_unit_add(probe, "SELECT to_regclass($1) IS NOT NULL, to_regprocedure('pgmq.drop_queue(text)') IS NOT NULL", 1, tp);
  int rc = cb_runtime_exec(rt, probe, err);
  if (rc != CB_OK) {
    cb_unit_free(probe);
    return rc;
  }
  *existed = cb_result_value(cb_unit_result(probe, 0), 0, 0)[0] == 't';
  int pgmq = cb_result_value(cb_unit_result(probe, 0), 0, 1)[0] == 't';
  cb_unit_free(probe);
  if (!*existed) return CB_OK;
  NEW_UNIT(u);
  const char *params[] = {queue};
  if (pgmq) {
    cb_unit_add_flags(u, "SELECT pgmq.drop_queue($1::text)", 1, params, CB_STMT_ONESHOT);
  } else {
    cb_unit_add_flags(u, QUEUE_DDL_LOCK, 0, NULL, CB_STMT_ONESHOT);
    add_sql(u, CB_STMT_ONESHOT, NULL, 0, "DROP TABLE IF EXISTS pgmq.q_%s", queue);
    add_sql(u, CB_STMT_ONESHOT, NULL, 0, "DROP TABLE IF EXISTS pgmq.a_%s", queue);
    cb_unit_add_flags(u, "DELETE FROM pgmq.meta WHERE queue_name = $1", 1, params, CB_STMT_ONESHOT);
  }
  rc = cb_runtime_exec(rt, u, err);
  cb_unit_free(u);
  return rc;
}

int cb_queue_send(cb_runtime *rt, const char *queue, const char *json, double delay, int64_t *msg_id, cb_err *err) {
  CHECK_NAME(queue);
  NEW_UNIT(u);
  int index;
  int rc = run(rt, queue, &u, &index, cb_queue_add_send(u, queue, json, delay), u, err);
  if (rc != CB_OK) return rc;
  *msg_id = cb_result_int(cb_unit_result(u, index), 0, 0);
  cb_unit_free(u);
  return CB_OK;
}

int cb_queue_send_batch(cb_runtime *rt, const char *queue, const char *json_array, double delay, int64_t **ids,
                        size_t *count, cb_err *err) {
  CHECK_NAME(queue);
  NEW_UNIT(u);
  int index;
  int rc = run(rt, queue, &u, &index, cb_queue_add_send_batch(u, queue, json_array, delay), u, err);
  if (rc != CB_OK) return rc;
  *ids = ids_of(cb_unit_result(u, index), count);
  cb_unit_free(u);
  return *ids ? CB_OK : cb_err_set(err, CB_ENOMEM, "out of memory");
}

static int take(cb_runtime *rt, const char *queue, cb_unit *u, int built, cb_messages *out, cb_err *err) {
  int index;
  int rc = run(rt, queue, &u, &index, built, u, err);
  if (rc != CB_OK) return rc;
  return cb_messages_take(out, u, index, err);
}

int cb_queue_read(cb_runtime *rt, const char *queue, double vt, int qty, cb_messages *out, cb_err *err) {
  memset(out, 0, sizeof *out);
  CHECK_NAME(queue);
  NEW_UNIT(u);
  return take(rt, queue, u, cb_queue_add_read(u, queue, vt, qty), out, err);
}

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int cb_queue_read_with_poll(cb_runtime *rt, const char *queue, double vt, int qty, double max_wait,
                            double poll_interval, cb_messages *out, cb_err *err) {
  memset(out, 0, sizeof *out);
  CHECK_NAME(queue);
  char channel[CB_QUEUE_CHANNEL_MAX];
  cb_queue_channel(queue, channel);
  int rc = cb_runtime_listen(rt, channel, err);
  if (rc != CB_OK) return rc;
  /* Subscribe before the first read: a send that commits between the read
   * and the wait still moves the version, so no wake-up is lost. */
  cb_hub_sub *sub = cb_hub_subscribe(cb_runtime_hub(rt), channel);
  if (sub == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  if (poll_interval <= 0) poll_interval = 0.1;
  double deadline = now_seconds() + max_wait;
  for (;;) {
    rc = cb_queue_read(rt, queue, vt, qty, out, err);
    if (rc != CB_OK || out->count > 0) break;
    double left = deadline - now_seconds();
    if (left <= 0) break;
    cb_messages_free(out);
    double wait = left < poll_interval ? left : poll_interval;
    if (cb_hub_wait(sub, (int)(wait * 1000.0 + 0.5)) == CB_ECLOSED) {
      rc = cb_err_set(err, CB_ECLOSED, "the runtime was closed");
      break;
    }
  }
  cb_hub_unsubscribe(sub);
  return rc;
}

int cb_queue_pop(cb_runtime *rt, const char *queue, int qty, cb_messages *out, cb_err *err) {
  memset(out, 0, sizeof *out);
  CHECK_NAME(queue);
  NEW_UNIT(u);
  return take(rt, queue, u, cb_queue_add_pop(u, queue, qty), out, err);
}

static int id_op(cb_runtime *rt, const char *queue, const int64_t *ids, size_t n, int64_t **done, size_t *count,
                 int archive, cb_err *err) {
  *done = NULL;
  *count = 0;
  CHECK_NAME(queue);
  NEW_UNIT(u);
  int built = archive ? cb_queue_add_archive(u, queue, ids, n) : cb_queue_add_delete(u, queue, ids, n);
  int index;
  int rc = run(rt, queue, &u, &index, built, u, err);
  if (rc != CB_OK) return rc;
  *done = ids_of(cb_unit_result(u, index), count);
  cb_unit_free(u);
  return *done ? CB_OK : cb_err_set(err, CB_ENOMEM, "out of memory");
}

int cb_queue_delete(cb_runtime *rt, const char *queue, const int64_t *ids, size_t n, int64_t **deleted, size_t *count,
                    cb_err *err) {
  return id_op(rt, queue, ids, n, deleted, count, 0, err);
}

int cb_queue_archive(cb_runtime *rt, const char *queue, const int64_t *ids, size_t n, int64_t **archived, size_t *count,
                     cb_err *err) {
  return id_op(rt, queue, ids, n, archived, count, 1, err);
}

int cb_queue_set_vt(cb_runtime *rt, const char *queue, int64_t id, double vt, cb_messages *out, cb_err *err) {
  memset(out, 0, sizeof *out);
  CHECK_NAME(queue);
  NEW_UNIT(u);
  return take(rt, queue, u, cb_queue_add_set_vt(u, queue, id, vt), out, err);
}

/* The metrics of one queue as a row: its name, depth, newest and oldest
 * message age, messages ever sent, time of reading. */
#define METRICS_ROW                                                                     \
  "SELECT '%s'::text, count(*), "                                                       \
  "coalesce(extract(epoch FROM clock_timestamp() - max(enqueued_at))::bigint, -1), "    \
  "coalesce(extract(epoch FROM clock_timestamp() - min(enqueued_at))::bigint, -1), "    \
  "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pgmq.q_%s_msg_id_seq), " \
  "clock_timestamp() FROM pgmq.q_%s"

static void read_metrics(const cb_result *r, int row, cb_queue_metrics *out) {
  snprintf(out->queue_name, sizeof out->queue_name, "%s", cb_result_value(r, row, 0));
  out->queue_length = cb_result_int(r, row, 1);
  out->newest_msg_age_sec = cb_result_int(r, row, 2);
  out->oldest_msg_age_sec = cb_result_int(r, row, 3);
  out->total_messages = cb_result_int(r, row, 4);
  snprintf(out->scrape_time, sizeof out->scrape_time, "%s", cb_result_value(r, row, 5));
}

int cb_queue_metrics_get(cb_runtime *rt, const char *queue, cb_queue_metrics *out, cb_err *err) {
  memset(out, 0, sizeof *out);
  CHECK_NAME(queue);
  NEW_UNIT(u);
  int index;
  int rc = run(rt, queue, &u, &index, add_sql(u, 0, NULL, 0, METRICS_ROW, queue, queue, queue), u, err);
  if (rc != CB_OK) return rc;
  read_metrics(cb_unit_result(u, index), 0, out);
  cb_unit_free(u);
  return CB_OK;
}

/* One statement for every listed queue (its text changes with the list:
 * not prepared). 42P01 when a queue was dropped meanwhile. */
static int metrics_of(cb_runtime *rt, const cb_queue_info *queues, size_t n, cb_queue_metrics *out, size_t *count,
                      cb_err *err) {
  cb_strbuf sql = {0};
  for (size_t i = 0; i < n; i++) {
    if (cb_queue_name_valid(queues[i].name, NULL) != CB_OK) continue; /* not ours to read */
    if (sql.len) cb_strbuf_puts(&sql, " UNION ALL ");
    cb_strbuf_printf(&sql, "(" METRICS_ROW ")", queues[i].name, queues[i].name, queues[i].name);
  }
  *count = 0;
  if (sql.len == 0) return CB_OK;
  cb_strbuf_puts(&sql, " ORDER BY 1");
  cb_unit *u = cb_unit_new();
  int rc = u && !sql.failed && cb_unit_add_flags(u, sql.data, 0, NULL, CB_STMT_ONESHOT) >= 0
               ? cb_runtime_exec(rt, u, err)
               : cb_err_set(err, CB_ENOMEM, "out of memory");
  cb_strbuf_free(&sql);
  const cb_result *r = rc == CB_OK ? cb_unit_result(u, 0) : NULL;
  for (int i = 0; r && i < cb_result_rows(r) && (size_t)i < n; i++) read_metrics(r, i, &out[(*count)++]);
  cb_unit_free(u);
  return rc;
}

int cb_queue_metrics_all(cb_runtime *rt, cb_queue_metrics **out, size_t *count, cb_err *err) {
  *out = NULL;
  *count = 0;
  int rc = CB_OK;
  for (int attempt = 0; attempt < 3; attempt++) {
    cb_queue_info *queues;
    size_t n;
    if ((rc = cb_queue_list(rt, &queues, &n, err)) != CB_OK) return rc;
    free(*out);
    *out = calloc(n + 1, sizeof **out);
    rc = *out ? metrics_of(rt, queues, n, *out, count, err) : cb_err_set(err, CB_ENOMEM, "out of memory");
    free(queues);
    if (!(rc == CB_EDATABASE && strcmp(err->sqlstate, "42P01") == 0)) break; /* else a queue went: list again */
  }
  if (rc != CB_OK) {
    free(*out);
    *out = NULL;
    *count = 0;
  }
  return rc;
}

int cb_queue_purge(cb_runtime *rt, const char *queue, int64_t *count, cb_err *err) {
  CHECK_NAME(queue);
  NEW_UNIT(u);
  int index;
  int rc = run(rt, queue, &u, &index, add_sql(u, CB_STMT_ONESHOT, NULL, 0, "DELETE FROM pgmq.q_%s", queue), u, err);
  if (rc != CB_OK) return rc;
  *count = cb_result_affected(cb_unit_result(u, index));
  cb_unit_free(u);
  return CB_OK;
}

int cb_queue_list(cb_runtime *rt, cb_queue_info **queues, size_t *count, cb_err *err) {
  *queues = NULL;
  *count = 0;
  NEW_UNIT(u);
  /* pgmq.meta exists once any queue was created; before, the list is empty. */
  cb_unit_add(u, "SELECT to_regclass('pgmq.meta') IS NOT NULL", 0, NULL);
  int rc = cb_runtime_exec(rt, u, err);
  int exists = rc == CB_OK && cb_result_value(cb_unit_result(u, 0), 0, 0)[0] == 't';
  cb_unit_reset(u);
  if (rc == CB_OK && exists) {
    cb_unit_add(u, "SELECT queue_name, is_partitioned, is_unlogged, created_at FROM pgmq.meta ORDER BY queue_name", 0,
                NULL);
    rc = cb_runtime_exec(rt, u, err);
  }
  if (rc == CB_OK) {
    const cb_result *r = exists ? cb_unit_result(u, 0) : NULL;
    int rows = cb_result_rows(r);
    *queues = calloc((size_t)rows + 1, sizeof **queues);
    if (*queues == NULL) rc = cb_err_set(err, CB_ENOMEM, "out of memory");
    for (int i = 0; rc == CB_OK && i < rows; i++) {
      cb_queue_info *q = &(*queues)[i];
      snprintf(q->name, sizeof q->name, "%s", cb_result_value(r, i, 0));
      q->is_partitioned = cb_result_value(r, i, 1)[0] == 't';
      q->is_unlogged = cb_result_value(r, i, 2)[0] == 't';
      snprintf(q->created_at, sizeof q->created_at, "%s", cb_result_value(r, i, 3));
    }
    if (rc == CB_OK) *count = (size_t)rows;
  }
  cb_unit_free(u);
  return rc;
}
