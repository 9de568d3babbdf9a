/* A large send of fresh commands goes by COPY (bus.c): the same rows as the
 * send statement writes (cb_bus_add_send still writes by statement), the
 * queue's notify, message ids drawn in several runs, bad data refused as
 * invalid input with nothing written, data that is not one JSON value left
 * to the statement; and COPY units (pg.c): one waits for a connection with
 * nothing in flight, one takes its data from a copy source piece by piece
 * after the rows its query drew, one whose source fails rolls back; and
 * streams, whose COPY starts before the caller has all its commands: the
 * same rows, nothing written when one is abandoned or cannot take a
 * command, and the connection usable after. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <libpq-fe.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commandbus/bus.h"
#include "commandbus/queue.h"
#include "commandbus/schema.h"
#include "strbuf.h"
#include "test_support.h"
#include "unit_internal.h"

#define LARGE 2500 /* more than bus.c's COPY_MIN */

static cb_runtime *setup_runtime(int pool) {
  cb_runtime *rt = test_runtime(pool);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  return rt;
}

static long long number(cb_runtime *rt, const char *sql, const char *a, const char *b) {
  cb_unit *u = cb_unit_new();
  const char *params[] = {a, b};
  cb_unit_add(u, sql, b ? 2 : a ? 1 : 0, params);
  cb_err err;
  int rc = cb_runtime_exec(rt, u, &err);
  if (rc != CB_OK) fprintf(stderr, "%s: %s\n", sql, err.message);
  assert_int_equal(rc, CB_OK);
  long long n = cb_result_int(cb_unit_result(u, 0), 0, 0);
  cb_unit_free(u);
  return n;
}

static void drop(cb_runtime *rt, const char *domain) {
  char queue[80];
  snprintf(queue, sizeof queue, "%s__commands", domain);
  int existed;
  cb_err err;
  cb_queue_drop(rt, queue, &existed, &err);
  cb_unit *u = cb_unit_new();
  const char *params[] = {domain};
  cb_unit_add(u, "DELETE FROM commandbus.audit WHERE domain = $1", 1, params);
  cb_unit_add(u, "DELETE FROM commandbus.command WHERE domain = $1", 1, params);
  cb_runtime_exec(rt, u, &err);
  cb_unit_free(u);
}

/* n commands of every kind a fresh send has: types and data with
 * characters COPY and JSON escape, reply queues, priorities, attempts and
 * batch ids on some. */
typedef struct specs {
  cb_command_spec s[LARGE];
  char data[LARGE][64];
  cb_send_result results[LARGE];
} specs;

static specs *make_specs(const char *reply_queue) {
  specs *p = calloc(1, sizeof *p);
  assert_non_null(p);
  for (int i = 0; i < LARGE; i++) {
    cb_command_spec *s = &p->s[i];
    s->command_type = i % 2 ? "Plain" : "Tab\there, new\nline, back\\slash, \"quote\", \xc3\xa9";
    snprintf(p->data[i], sizeof p->data[i], "{\"n\": %d,\n\t\"s\": \"a\\tb\\\\c\\\"d\"}", i);
    s->data_json = i % 11 == 0 ? NULL : p->data[i];
    s->reply_to = i % 3 == 0 ? reply_queue : NULL;
    s->priority = i % 5 == 0 ? 2 : i % 7 == 0 ? -1 : 0;
    s->max_attempts = i % 4 == 0 ? 9 : 0;
    s->batch_id = i % 6 == 0 ? "01890a5d-ac96-774b-bcce-b302099a8057" : NULL;
  }
  return p;
}

/* How many rows k of two domains (in message order) are alike, but for
 * the ids. */
static long long alike_rows(cb_runtime *rt, const char *by_statement, const char *by_copy) {
  char sql[4096];
  snprintf(sql, sizeof sql,
           "WITH rows AS (SELECT c.domain, row_number() OVER (PARTITION BY c.domain ORDER BY c.msg_id) AS k,"
           " c.command_type, c.status, c.attempts, c.max_attempts, c.reply_queue, c.batch_id, m.read_ct,"
           " c.queue_name = c.domain || '__commands' AS queue_ok, a.audit_id,"
           " m.message - 'domain' - 'command_id' - 'correlation_id' AS message,"
           " m.message->>'domain' = c.domain AND m.message->>'command_id' = c.command_id::text"
           " AND m.message->>'correlation_id' = c.correlation_id::text AS message_ids_ok,"
           " a.details_json - 'correlation_id' - 'msg_id' AS details,"
           " a.details_json->>'correlation_id' = c.correlation_id::text"
           " AND (a.details_json->>'msg_id')::bigint = c.msg_id AS details_ids_ok"
           " FROM commandbus.command c JOIN pgmq.q_%s__commands m ON m.msg_id = c.msg_id AND c.domain = $2"
           " JOIN commandbus.audit a ON a.domain = c.domain AND a.command_id = c.command_id AND a.event_type = 'SENT'"
           " UNION ALL"
           " SELECT c.domain, row_number() OVER (PARTITION BY c.domain ORDER BY c.msg_id),"
           " c.command_type, c.status, c.attempts, c.max_attempts, c.reply_queue, c.batch_id, m.read_ct,"
           " c.queue_name = c.domain || '__commands', a.audit_id,"
           " m.message - 'domain' - 'command_id' - 'correlation_id',"
           " m.message->>'domain' = c.domain AND m.message->>'command_id' = c.command_id::text"
           " AND m.message->>'correlation_id' = c.correlation_id::text,"
           " a.details_json - 'correlation_id' - 'msg_id',"
           " a.details_json->>'correlation_id' = c.correlation_id::text"
           " AND (a.details_json->>'msg_id')::bigint = c.msg_id"
           " FROM commandbus.command c JOIN pgmq.q_%s__commands m ON m.msg_id = c.msg_id AND c.domain = $1"
           " JOIN commandbus.audit a ON a.domain = c.domain AND a.command_id = c.command_id AND a.event_type = 'SENT')"
           " SELECT count(*) FROM rows s JOIN rows c ON c.k = s.k AND s.domain = $1 AND c.domain = $2"
           " WHERE s.command_type = c.command_type AND s.status = c.status AND s.attempts = c.attempts"
           " AND s.max_attempts = c.max_attempts AND s.reply_queue = c.reply_queue"
           " AND s.batch_id IS NOT DISTINCT FROM c.batch_id AND s.read_ct = c.read_ct AND s.queue_ok AND c.queue_ok"
           " AND s.message = c.message AND s.details = c.details"
           " AND s.message_ids_ok AND c.message_ids_ok AND s.details_ids_ok AND c.details_ids_ok",
           by_copy, by_statement);
  return number(rt, sql, by_statement, by_copy);
}

/* Sends p's LARGE commands into domain by statement (cb_bus_add_send
 * writes by statement, whatever the size): the rows a COPY must match. */
static void send_by_statement(cb_runtime *rt, const char *domain, specs *p) {
  cb_err err;
  cb_unit *u = cb_unit_new();
  assert_int_equal(cb_bus_add_send(rt, u, domain, p->s, LARGE, 0, p->results, NULL, &err), CB_OK);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  cb_unit_free(u);
}

static void a_large_send_writes_by_copy_the_rows_a_statement_writes(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(2);
  char by_statement[64], by_copy[64], replies[80];
  snprintf(by_statement, sizeof by_statement, "%s", test_name("copy_stmt"));
  snprintf(by_copy, sizeof by_copy, "%s", test_name("copy_copy"));
  snprintf(replies, sizeof replies, "%s__replies", by_copy);
  drop(rt, by_statement);
  drop(rt, by_copy);
  specs *p = make_specs(replies);
  cb_err err;
  send_by_statement(rt, by_statement, p);
  assert_int_equal(cb_bus_send(rt, by_copy, p->s, LARGE, 0, p->results, &err), CB_OK);

  /* By COPY: the message's vt is the transaction's start, as enqueued_at
   * (the statement's is the clock's time, later). */
  char sql[4096];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM pgmq.q_%s__commands WHERE vt = enqueued_at", by_copy);
  assert_int_equal(number(rt, sql, NULL, NULL), LARGE);
  /* Each result names its command and message; ids in the call's order. */
  for (int i = 0; i < LARGE; i++) {
    assert_false(p->results[i].duplicate);
    if (i > 0) assert_true(p->results[i].msg_id > p->results[i - 1].msg_id);
  }
  for (int i = 0; i < LARGE; i += 97) {
    char msg_id[24];
    snprintf(msg_id, sizeof msg_id, "%lld", (long long)p->results[i].msg_id);
    assert_int_equal(number(rt,
                            "SELECT count(*) FROM commandbus.command WHERE command_id = $1::uuid"
                            " AND msg_id = $2::bigint",
                            p->results[i].command_id, msg_id),
                     1);
  }
  assert_int_equal(alike_rows(rt, by_statement, by_copy), LARGE);
  /* The SENT rows' ids follow the call's order, by COPY as by the
   * statement (which reads its input in order, unsorted). */
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM (SELECT a.audit_id, lag(a.audit_id) OVER (ORDER BY c.msg_id) AS before"
           " FROM commandbus.command c JOIN commandbus.audit a ON a.domain = c.domain AND a.command_id = c.command_id"
           " WHERE c.domain = $1) x WHERE audit_id < before");
  assert_int_equal(number(rt, sql, by_copy, NULL), 0);
  assert_int_equal(number(rt, sql, by_statement, NULL), 0);
  /* The priority index holds the messages with a priority. */
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM pgmq.q_%s__commands WHERE commandbus.priority_of(message) <> 0"
           " AND (message->>'priority')::int IN (2, -1)",
           by_copy);
  assert_int_equal(number(rt, sql, NULL, NULL), number(rt,
                                                       "SELECT count(*) FROM generate_series(0, 2499) i"
                                                       " WHERE i % 5 = 0 OR i % 7 = 0",
                                                       NULL, NULL));
  free(p);
  drop(rt, by_statement);
  drop(rt, by_copy);
  int existed;
  cb_queue_drop(rt, replies, &existed, &err);
  cb_runtime_free(rt);
}

static void a_large_send_notifies_its_queue(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(2);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("copy_notify"));
  drop(rt, domain);
  specs *p = make_specs(NULL);
  cb_err err;
  assert_int_equal(cb_bus_ensure_command_queue(rt, domain, 0, &err), CB_OK);
  PGconn *listener = PQconnectdb(test_dsn());
  assert_int_equal(PQstatus(listener), CONNECTION_OK);
  char sql[160];
  snprintf(sql, sizeof sql, "LISTEN pgmq_notify_%s__commands", domain);
  PQclear(PQexec(listener, sql));
  assert_int_equal(cb_bus_send(rt, domain, p->s, LARGE, 0, p->results, &err), CB_OK);
  PGnotify *n = NULL;
  for (int tries = 0; tries < 100 && n == NULL; tries++) {
    struct pollfd fd = {PQsocket(listener), POLLIN, 0};
    poll(&fd, 1, 100);
    PQconsumeInput(listener);
    n = PQnotifies(listener);
  }
  assert_non_null(n);
  char channel[160];
  snprintf(channel, sizeof channel, "pgmq_notify_%s__commands", domain);
  assert_string_equal(n->relname, channel);
  PQfreemem(n);
  PQfinish(listener);
  free(p);
  drop(rt, domain);
  cb_runtime_free(rt);
}

static void message_ids_drawn_in_several_runs_go_to_the_commands_in_order(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(1);
  char domain[64], sql[512];
  snprintf(domain, sizeof domain, "%s", test_name("copy_runs"));
  drop(rt, domain);
  cb_err err;
  assert_int_equal(cb_bus_ensure_command_queue(rt, domain, 0, &err), CB_OK);
  /* Ids three apart: every id a run of its own, as when other sessions
   * draw from the sequence at the same time. */
  snprintf(sql, sizeof sql, "ALTER SEQUENCE pgmq.q_%s__commands_msg_id_seq INCREMENT BY 3", domain);
  cb_unit_free(test_sql(rt, sql));
  specs *p = make_specs(NULL);
  assert_int_equal(cb_bus_send(rt, domain, p->s, LARGE, 0, p->results, &err), CB_OK);
  for (int i = 1; i < LARGE; i++) assert_int_equal(p->results[i].msg_id - p->results[i - 1].msg_id, 3);
  /* Each command, its message and its SENT row name the result's id. */
  cb_strbuf ids = {0};
  cb_strbuf_putc(&ids, '{');
  for (int i = 0; i < LARGE; i++)
    cb_strbuf_printf(&ids, "%s\"(%s,%lld)\"", i ? "," : "", p->results[i].command_id, (long long)p->results[i].msg_id);
  cb_strbuf_putc(&ids, '}');
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM unnest($1::text[]) r(v), LATERAL (SELECT split_part(trim(r.v, '()'), ',', 1)::uuid"
           " AS id, split_part(trim(r.v, '()'), ',', 2)::bigint AS msg_id) x"
           " JOIN commandbus.command c ON c.domain = $2 AND c.command_id = x.id AND c.msg_id = x.msg_id"
           " JOIN pgmq.q_%s__commands m ON m.msg_id = x.msg_id AND m.message->>'command_id' = x.id::text"
           " JOIN commandbus.audit a ON a.command_id = x.id AND (a.details_json->>'msg_id')::bigint = x.msg_id",
           domain);
  assert_int_equal(number(rt, sql, ids.data, domain), LARGE);
  cb_strbuf_free(&ids);
  free(p);
  drop(rt, domain);
  cb_runtime_free(rt);
}

static void bad_data_in_a_large_send_is_invalid_input_and_writes_nothing(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(1);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("copy_bad"));
  drop(rt, domain);
  specs *p = make_specs(NULL);
  cb_err err;
  /* The first command's message fails while the rest are still being
   * sent (the server skips them); the last one's at the end. */
  int bad[] = {0, LARGE - 1};
  for (int k = 0; k < 2; k++) {
    p->s[bad[k]].data_json = "{\"a\": tru}"; /* one value as far as brackets go: the server refuses it */
    assert_int_equal(cb_bus_send(rt, domain, p->s, LARGE, 0, p->results, &err), CB_EINVAL);
    assert_non_null(strstr(err.message, "invalid command data"));
    assert_int_equal(number(rt, "SELECT count(*) FROM commandbus.command WHERE domain = $1", domain, NULL), 0);
    assert_int_equal(number(rt, "SELECT count(*) FROM commandbus.audit WHERE domain = $1", domain, NULL), 0);
    p->s[bad[k]].data_json = NULL;
  }
  /* The connection is back in the pipeline: the next send goes. */
  assert_int_equal(cb_bus_send(rt, domain, p->s, LARGE, 0, p->results, &err), CB_OK);
  assert_int_equal(cb_bus_send(rt, domain, p->s, 1, 0, p->results, &err), CB_OK);
  assert_int_equal(number(rt, "SELECT count(*) FROM commandbus.command WHERE domain = $1", domain, NULL), LARGE + 1);
  free(p);
  drop(rt, domain);
  cb_runtime_free(rt);
}

static void data_that_is_not_one_json_value_goes_by_statement(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(1);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("copy_value"));
  drop(rt, domain);
  specs *p = make_specs(NULL);
  /* Pasted into a message text, this would give the message a priority
   * its command was not sent with. */
  p->s[7].data_json = "1, \"priority\": 5";
  p->s[7].priority = 0;
  cb_err err;
  assert_int_equal(cb_bus_send(rt, domain, p->s, LARGE, 0, p->results, &err), CB_OK);
  char sql[256];
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM pgmq.q_%s__commands WHERE message->>'command_id' = $1 AND message->'data' = '1'"
           " AND NOT message ? 'priority'",
           domain);
  assert_int_equal(number(rt, sql, p->results[7].command_id, NULL), 1);
  free(p);
  drop(rt, domain);
  cb_runtime_free(rt);
}

static void *sleeper_main(void *arg) {
  cb_unit *u = test_sql(arg, "SELECT pg_sleep(0.5)");
  cb_unit_free(u);
  return NULL;
}

static void a_copy_waits_for_a_connection_with_nothing_in_flight(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(1);
  char table[80], sql[256];
  snprintf(table, sizeof table, "public.%s", test_name("copy_wait"));
  snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", table);
  cb_unit_free(test_sql(rt, sql));
  snprintf(sql, sizeof sql, "CREATE TABLE %s (n int)", table);
  cb_unit_free(test_sql(rt, sql));
  uint64_t sent = cb_runtime_units_sent(rt);
  pthread_t sleeper;
  pthread_create(&sleeper, NULL, sleeper_main, rt);
  while (cb_runtime_units_sent(rt) == sent) usleep(1000);
  /* The one connection has the sleep in flight: the COPY goes after it. */
  cb_unit *u = cb_unit_new();
  const char *data[] = {"1\n2\n3\n"};
  snprintf(sql, sizeof sql, "COPY %s (n) FROM STDIN", table);
  cb_unit_add_flags(u, sql, 1, data, CB_STMT_COPY);
  cb_err err;
  int rc = cb_runtime_exec(rt, u, &err);
  if (rc != CB_OK) fprintf(stderr, "%s\n", err.message);
  assert_int_equal(rc, CB_OK);
  cb_unit_free(u);
  pthread_join(sleeper, NULL);
  snprintf(sql, sizeof sql, "SELECT sum(n) FROM %s", table);
  assert_int_equal(number(rt, sql, NULL, NULL), 6);
  snprintf(sql, sizeof sql, "DROP TABLE %s", table);
  cb_unit_free(test_sql(rt, sql));
  cb_runtime_free(rt);
}

/* A copy source for the tests below: `pieces` pieces of `rows` numbers each
 * for every COPY, each number the first drawn row's value plus its place;
 * or, with fail_at, -1 at that piece. */
typedef struct numbers {
  int pieces, rows, fail_at, made;
  long long base;
  char piece[4096];
} numbers;

static int numbers_source(void *arg, int copy, const cb_result *rows, const char **data, size_t *len) {
  (void)copy;
  numbers *n = arg;
  if (n->made == n->fail_at) return -1;
  if (n->made == 0) n->base = rows ? cb_result_int(rows, 0, 0) : -1;
  size_t at = 0;
  for (int i = 0; i < n->rows; i++)
    at += (size_t)snprintf(n->piece + at, sizeof n->piece - at, "%lld\n", n->base + n->made * n->rows + i);
  n->made++;
  *data = n->piece;
  *len = at;
  return n->made < n->pieces;
}

static void a_copy_takes_its_data_from_a_source_piece_by_piece(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(1);
  char table[80], sql[256];
  snprintf(table, sizeof table, "public.%s", test_name("copy_source"));
  snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", table);
  cb_unit_free(test_sql(rt, sql));
  snprintf(sql, sizeof sql, "CREATE TABLE %s (n bigint)", table);
  cb_unit_free(test_sql(rt, sql));
  /* More pieces than the socket takes at once: the loop comes back for them. */
  numbers n = {.pieces = 2000, .rows = 100, .fail_at = -1};
  cb_unit *u = cb_unit_new();
  snprintf(sql, sizeof sql, "SELECT 1000; COPY %s (n) FROM STDIN; SELECT 7", table);
  cb_unit_add_flags(u, sql, 0, NULL, CB_STMT_COPY);
  cb__unit_copy_source(u, numbers_source, &n);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  /* The statement's result: the first rows the query returned. */
  assert_int_equal(cb_result_int(cb_unit_result(u, 0), 0, 0), 1000);
  cb_unit_free(u);
  snprintf(sql, sizeof sql, "SELECT count(DISTINCT n) FROM %s WHERE n BETWEEN 1000 AND 200999", table);
  assert_int_equal(number(rt, sql, NULL, NULL), 200000);
  snprintf(sql, sizeof sql, "DROP TABLE %s", table);
  cb_unit_free(test_sql(rt, sql));
  cb_runtime_free(rt);
}

static void a_copy_whose_source_fails_writes_nothing(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(1);
  char table[80], sql[256];
  snprintf(table, sizeof table, "public.%s", test_name("copy_source_fails"));
  snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", table);
  cb_unit_free(test_sql(rt, sql));
  snprintf(sql, sizeof sql, "CREATE TABLE %s (n bigint)", table);
  cb_unit_free(test_sql(rt, sql));
  numbers n = {.pieces = 50, .rows = 100, .fail_at = 30};
  cb_unit *u = cb_unit_new();
  snprintf(sql, sizeof sql, "SELECT 1; COPY %s (n) FROM STDIN", table);
  cb_unit_add_flags(u, sql, 0, NULL, CB_STMT_COPY);
  cb__unit_copy_source(u, numbers_source, &n);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_EDATABASE);
  assert_non_null(strstr(err.message, "could not be made"));
  cb_unit_free(u);
  /* Nothing written, and the connection is back in the pipeline. */
  snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
  assert_int_equal(number(rt, sql, NULL, NULL), 0);
  snprintf(sql, sizeof sql, "DROP TABLE %s", table);
  cb_unit_free(test_sql(rt, sql));
  cb_runtime_free(rt);
}

static void a_copy_statement_runs_alone_in_its_unit(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(1);
  cb_unit *u = cb_unit_new();
  const char *data[] = {"1\n"};
  cb_unit_add(u, "SELECT 1", 0, NULL);
  cb_unit_add_flags(u, "COPY pg_temp.nothing FROM STDIN", 1, data, CB_STMT_COPY);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_EINVAL);
  cb_unit_free(u);
  u = test_sql(rt, "SELECT 41 + 1");
  assert_int_equal(cb_unit_status(u), CB_OK);
  assert_int_equal(cb_result_int(cb_unit_result(u, 0), 0, 0), 42);
  cb_unit_free(u);
  cb_runtime_free(rt);
}

/* ---- streams (cb_bus_stream_*): the send leaves before its commands are all there */

/* Hands p's commands over to s in pieces of `step`, pausing now and then
 * so that the COPY catches up and waits for the next ones. */
static int hand_over(cb_send_stream *s, size_t step) {
  for (size_t upto = step;; upto += step) {
    if (upto > LARGE) upto = LARGE;
    if (upto % (4 * step) == 0) usleep(20000);
    if (!cb_bus_stream_add(s, upto)) return 0;
    if (upto == LARGE) return 1;
  }
}

static void a_stream_writes_the_rows_a_statement_writes(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(2);
  char by_statement[64], by_stream[64], replies[80];
  snprintf(by_statement, sizeof by_statement, "%s", test_name("stream_stmt"));
  snprintf(by_stream, sizeof by_stream, "%s", test_name("stream_copy"));
  snprintf(replies, sizeof replies, "%s__replies", by_stream);
  drop(rt, by_statement);
  drop(rt, by_stream);
  specs *p = make_specs(replies);
  cb_err err;
  send_by_statement(rt, by_statement, p);
  /* A stream takes reply queues that are made already (that one is, now). */
  cb_send_result *results = calloc(LARGE, sizeof *results);
  cb_send_stream *s = cb_bus_stream_start(rt, by_stream, p->s, results, LARGE, 0);
  assert_non_null(s);
  assert_int_equal(hand_over(s, 100), 1);
  assert_int_equal(cb_bus_stream_ids(s), 1);
  for (int i = 1; i < LARGE; i++) assert_true(results[i].msg_id > results[i - 1].msg_id);
  assert_int_equal(cb_bus_stream_finish(s, &err), CB_OK);
  assert_int_equal(alike_rows(rt, by_statement, by_stream), LARGE);
  for (int i = 0; i < LARGE; i += 97) {
    char msg_id[24];
    snprintf(msg_id, sizeof msg_id, "%lld", (long long)results[i].msg_id);
    assert_false(results[i].duplicate);
    assert_int_equal(number(rt,
                            "SELECT count(*) FROM commandbus.command WHERE command_id = $1::uuid"
                            " AND msg_id = $2::bigint",
                            results[i].command_id, msg_id),
                     1);
  }
  free(results);
  free(p);
  drop(rt, by_statement);
  drop(rt, by_stream);
  int existed;
  cb_queue_drop(rt, replies, &existed, &err);
  cb_runtime_free(rt);
}

static long long commands_of(cb_runtime *rt, const char *domain) {
  return number(rt, "SELECT count(*) FROM commandbus.command WHERE domain = $1", domain, NULL) +
         number(rt, "SELECT count(*) FROM commandbus.audit WHERE domain = $1", domain, NULL);
}

static void a_stream_that_cannot_take_a_command_writes_nothing(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(2);
  char domain[64];
  specs *p = make_specs(NULL);
  cb_err err;
  /* A command with its own id, a bad one, one replying to a queue not made:
   * each found after the first ones went. */
  const char *fields[] = {"id", "bad", "reply"};
  for (int k = 0; k < 3; k++) {
    snprintf(domain, sizeof domain, "%s_%d", test_name("stream_gone"), k); /* a queue dropped stays known */
    drop(rt, domain);
    cb_command_spec was = p->s[2100];
    if (k == 0) p->s[2100].command_id = "01890a5d-ac96-774b-bcce-b302099a8058";
    if (k == 1) p->s[2100].correlation_id = "nope";
    if (k == 2) p->s[2100].reply_to = "stream_gone_nowhere";
    cb_send_stream *s = cb_bus_stream_start(rt, domain, p->s, p->results, LARGE, 0);
    assert_non_null(s);
    if (hand_over(s, 300) != 0) fail_msg("the stream took the command with %s", fields[k]);
    assert_int_equal(commands_of(rt, domain), 0);
    /* The connection goes on; cb_bus_send answers as ever. */
    int rc = cb_bus_send(rt, domain, p->s, LARGE, 0, p->results, &err);
    assert_int_equal(rc, k == 1 ? CB_EINVAL : CB_OK);
    if (k == 1) assert_non_null(strstr(err.message, "command #2101: correlation_id `nope` is not a UUID"));
    assert_int_equal(commands_of(rt, domain), k == 1 ? 0 : 2 * LARGE);
    p->s[2100] = was;
    drop(rt, domain);
  }
  int existed;
  cb_queue_drop(rt, "stream_gone_nowhere", &existed, &err);
  free(p);
  cb_runtime_free(rt);
}

static void an_abandoned_stream_writes_nothing(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(2);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("stream_abandon"));
  drop(rt, domain);
  specs *p = make_specs(NULL);
  cb_err err;
  /* Before the draw is back, while the COPY waits for commands, and once
   * they are all there. */
  size_t handed[] = {0, 1000, LARGE};
  for (int k = 0; k < 3; k++) {
    cb_send_stream *s = cb_bus_stream_start(rt, domain, p->s, p->results, LARGE, 0);
    assert_non_null(s);
    if (handed[k]) assert_int_equal(cb_bus_stream_add(s, handed[k]), 1);
    if (k == 1) usleep(100000);
    cb_bus_stream_abandon(s);
    assert_int_equal(commands_of(rt, domain), 0);
  }
  assert_int_equal(cb_bus_send(rt, domain, p->s, 1, 0, p->results, &err), CB_OK);
  assert_int_equal(commands_of(rt, domain), 2);
  free(p);
  drop(rt, domain);
  cb_runtime_free(rt);
}

static void a_stream_with_data_the_server_refuses_is_invalid_input(void **state) {
  (void)state;
  cb_runtime *rt = setup_runtime(2);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("stream_data"));
  drop(rt, domain);
  specs *p = make_specs(NULL);
  p->s[LARGE - 1].data_json = "{\"a\": tru}";
  cb_err err;
  cb_send_stream *s = cb_bus_stream_start(rt, domain, p->s, p->results, LARGE, 0);
  assert_non_null(s);
  assert_int_equal(hand_over(s, 500), 1);
  cb_bus_stream_ids(s);
  assert_int_equal(cb_bus_stream_finish(s, &err), CB_EINVAL);
  assert_non_null(strstr(err.message, "invalid command data"));
  assert_int_equal(commands_of(rt, domain), 0);
  /* Fewer than a COPY's worth, a delay, or a pool of one connection (the
   * stream would hold it while the caller reads): no stream. */
  assert_null(cb_bus_stream_start(rt, domain, p->s, p->results, 10, 0));
  assert_null(cb_bus_stream_start(rt, domain, p->s, p->results, LARGE, 1));
  cb_runtime *one = setup_runtime(1);
  assert_null(cb_bus_stream_start(one, domain, p->s, p->results, LARGE, 0));
  cb_runtime_free(one);
  free(p);
  drop(rt, domain);
  cb_runtime_free(rt);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(a_large_send_writes_by_copy_the_rows_a_statement_writes),
      cmocka_unit_test(a_large_send_notifies_its_queue),
      cmocka_unit_test(message_ids_drawn_in_several_runs_go_to_the_commands_in_order),
      cmocka_unit_test(bad_data_in_a_large_send_is_invalid_input_and_writes_nothing),
      cmocka_unit_test(data_that_is_not_one_json_value_goes_by_statement),
      cmocka_unit_test(a_copy_waits_for_a_connection_with_nothing_in_flight),
      cmocka_unit_test(a_copy_takes_its_data_from_a_source_piece_by_piece),
      cmocka_unit_test(a_copy_whose_source_fails_writes_nothing),
      cmocka_unit_test(a_copy_statement_runs_alone_in_its_unit),
      cmocka_unit_test(a_stream_writes_the_rows_a_statement_writes),
      cmocka_unit_test(a_stream_that_cannot_take_a_command_writes_nothing),
      cmocka_unit_test(an_abandoned_stream_writes_nothing),
      cmocka_unit_test(a_stream_with_data_the_server_refuses_is_invalid_input),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
