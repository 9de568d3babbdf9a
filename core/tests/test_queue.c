/* The queue client against a real PostgreSQL: pgmq's operations, name
 * validation, and read_with_poll woken by LISTEN/NOTIFY from another
 * runtime. Each test makes its own queue, named per process (the same binary
 * runs in parallel under plain, sanitizer and valgrind builds), and drops it.
 * Waits have generous bounds; none depends on tight timing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "commandbus/queue.h"
#include "commandbus/runtime.h"
#include "test_support.h"

/* ------------------------------------------------------------ helpers */

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* A queue named prefix_<pid>, created afresh (a leftover of an aborted run
 * is dropped first). The name lives in one of test_name's buffers. */
static const char *fresh_queue(cb_runtime *rt, const char *prefix) {
  const char *name = test_name(prefix);
  cb_err err;
  int existed;
  assert_int_equal(cb_queue_drop(rt, name, &existed, &err), CB_OK);
  assert_int_equal(cb_queue_create(rt, name, &err), CB_OK);
  return name;
}

static void drop_queue(cb_runtime *rt, const char *name) {
  cb_err err;
  int existed = 0;
  assert_int_equal(cb_queue_drop(rt, name, &existed, &err), CB_OK);
  assert_true(existed);
}

static int64_t send_one(cb_runtime *rt, const char *queue, const char *json, double delay) {
  int64_t id = 0;
  cb_err err;
  assert_int_equal(cb_queue_send(rt, queue, json, delay, &id, &err), CB_OK);
  assert_true(id > 0);
  return id;
}

static cb_queue_metrics metrics_of(cb_runtime *rt, const char *queue) {
  cb_queue_metrics m;
  cb_err err;
  assert_int_equal(cb_queue_metrics_get(rt, queue, &m, &err), CB_OK);
  return m;
}

/* The first value of a one-row query with one text parameter. */
static int64_t sql_int(cb_runtime *rt, const char *sql, const char *param) {
  cb_unit *u = cb_unit_new();
  const char *params[] = {param};
  cb_unit_add_flags(u, sql, param ? 1 : 0, param ? params : NULL, CB_STMT_ONESHOT);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  int64_t v = cb_result_int(cb_unit_result(u, 0), 0, 0);
  cb_unit_free(u);
  return v;
}

/* ------------------------------------------------------------ basics */

static void creating_a_queue_twice_is_fine(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_create");
  cb_err err;
  assert_int_equal(cb_queue_create(rt, q, &err), CB_OK);
  assert_int_equal(sql_int(rt, "SELECT count(*) FROM pgmq.meta WHERE queue_name = $1", q), 1);
  send_one(rt, q, "{\"n\":1}", 0);
  assert_int_equal(cb_queue_create(rt, q, &err), CB_OK); /* and keeps what is there */
  assert_int_equal(metrics_of(rt, q).queue_length, 1);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void a_sent_message_is_read_back_with_read_count_one(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_send");
  int64_t id = send_one(rt, q, "{\"order\":42,\"item\":\"tea\"}", 0);
  cb_messages m;
  cb_err err;
  assert_int_equal(cb_queue_read(rt, q, 30, 10, &m, &err), CB_OK);
  assert_int_equal(m.count, 1);
  assert_int_equal(m.items[0].msg_id, id);
  assert_int_equal(m.items[0].read_ct, 1);
  assert_string_equal(m.items[0].message, "{\"item\": \"tea\", \"order\": 42}"); /* jsonb's text form */
  assert_true(m.items[0].enqueued_at[0] != '\0');
  assert_true(m.items[0].vt[0] != '\0');
  cb_messages_free(&m);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void a_read_message_is_hidden_for_vt_then_redelivered_with_a_higher_read_count(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_vt");
  int64_t id = send_one(rt, q, "{\"n\":1}", 0);
  cb_messages m;
  cb_err err;
  double t0 = now_seconds();
  assert_int_equal(cb_queue_read(rt, q, 1, 1, &m, &err), CB_OK);
  assert_int_equal(m.count, 1);
  assert_int_equal(m.items[0].read_ct, 1);
  cb_messages_free(&m);

  /* Hidden: a read right away sees nothing (checked only when "right away"
   * really was well within the second, so a slow machine cannot fail it). */
  assert_int_equal(cb_queue_read(rt, q, 1, 1, &m, &err), CB_OK);
  if (now_seconds() - t0 < 0.8) assert_int_equal(m.count, 0);
  size_t early = m.count;
  cb_messages_free(&m);

  /* Redelivered once the second has passed: poll for up to ~5 s. */
  int found = 0;
  while (!found && now_seconds() - t0 < 5.0) {
    assert_int_equal(cb_queue_read(rt, q, 30, 1, &m, &err), CB_OK);
    if (m.count == 1) {
      found = 1;
      assert_int_equal(m.items[0].msg_id, id);
      assert_int_equal(m.items[0].read_ct, early ? 3 : 2);
    }
    cb_messages_free(&m);
    if (!found) sleep_ms(100);
  }
  assert_true(found);
  assert_true(now_seconds() - t0 >= 0.9); /* not before its vt ran out */

  /* Every delivery counts: make it visible now and read it once more. */
  assert_int_equal(cb_queue_set_vt(rt, q, id, 0, &m, &err), CB_OK);
  assert_int_equal(m.count, 1);
  assert_int_equal(m.items[0].msg_id, id);
  cb_messages_free(&m);
  assert_int_equal(cb_queue_read(rt, q, 30, 1, &m, &err), CB_OK);
  assert_int_equal(m.count, 1);
  assert_int_equal(m.items[0].read_ct, early ? 4 : 3);
  cb_messages_free(&m);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void a_delayed_message_stays_invisible(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_delay");
  send_one(rt, q, "{\"later\":true}", 60);
  int64_t now_id = send_one(rt, q, "{\"now\":true}", 0);
  cb_messages m;
  cb_err err;
  assert_int_equal(cb_queue_read(rt, q, 30, 10, &m, &err), CB_OK);
  assert_int_equal(m.count, 1); /* only the undelayed one */
  assert_int_equal(m.items[0].msg_id, now_id);
  cb_messages_free(&m);
  assert_int_equal(cb_queue_pop(rt, q, 10, &m, &err), CB_OK);
  assert_int_equal(m.count, 0);
  cb_messages_free(&m);
  assert_int_equal(metrics_of(rt, q).queue_length, 2); /* but it is there */
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void a_batch_gets_ids_in_order_and_is_read_in_queue_order(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_batch");
  int64_t *ids = NULL;
  size_t n = 0;
  cb_err err;
  assert_int_equal(cb_queue_send_batch(rt, q, "[{\"n\":1},{\"n\":2},{\"n\":3},{\"n\":4},{\"n\":5}]", 0, &ids, &n, &err),
                   CB_OK);
  assert_int_equal(n, 5);
  for (size_t i = 1; i < n; i++) assert_true(ids[i] > ids[i - 1]);
  cb_messages m;
  assert_int_equal(cb_queue_read(rt, q, 30, 10, &m, &err), CB_OK);
  assert_int_equal(m.count, 5);
  for (size_t i = 0; i < n; i++) {
    char expected[32];
    snprintf(expected, sizeof expected, "{\"n\": %zu}", i + 1);
    assert_int_equal(m.items[i].msg_id, ids[i]);
    assert_string_equal(m.items[i].message, expected);
  }
  cb_messages_free(&m);
  free(ids);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void pop_returns_and_removes_the_oldest_messages(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_pop");
  int64_t first = send_one(rt, q, "{\"n\":1}", 0);
  int64_t second = send_one(rt, q, "{\"n\":2}", 0);
  cb_messages m;
  cb_err err;
  assert_int_equal(cb_queue_pop(rt, q, 1, &m, &err), CB_OK);
  assert_int_equal(m.count, 1);
  assert_int_equal(m.items[0].msg_id, first);
  assert_string_equal(m.items[0].message, "{\"n\": 1}");
  cb_messages_free(&m);
  assert_int_equal(metrics_of(rt, q).queue_length, 1);
  assert_int_equal(cb_queue_read(rt, q, 30, 10, &m, &err), CB_OK);
  assert_int_equal(m.count, 1);
  assert_int_equal(m.items[0].msg_id, second);
  cb_messages_free(&m);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void delete_returns_the_ids_it_found_and_ignores_unknown_ones(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_delete");
  int64_t a = send_one(rt, q, "{\"n\":1}", 0);
  int64_t b = send_one(rt, q, "{\"n\":2}", 0);
  int64_t ids[] = {a, b + 1000000};
  int64_t *deleted = NULL;
  size_t n = 99;
  cb_err err;
  assert_int_equal(cb_queue_delete(rt, q, ids, 2, &deleted, &n, &err), CB_OK);
  assert_int_equal(n, 1);
  assert_int_equal(deleted[0], a);
  free(deleted);
  /* Deleting it again is not an error: it simply is not there. */
  assert_int_equal(cb_queue_delete(rt, q, ids, 1, &deleted, &n, &err), CB_OK);
  assert_int_equal(n, 0);
  free(deleted);
  cb_queue_metrics mt = metrics_of(rt, q);
  assert_int_equal(mt.queue_length, 1);
  cb_messages m;
  assert_int_equal(cb_queue_read(rt, q, 30, 10, &m, &err), CB_OK);
  assert_int_equal(m.count, 1);
  assert_int_equal(m.items[0].msg_id, b);
  cb_messages_free(&m);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void archive_moves_messages_to_the_archive_table(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_archive");
  int64_t a = send_one(rt, q, "{\"n\":1}", 0);
  int64_t b = send_one(rt, q, "{\"n\":2}", 0);
  int64_t keep = send_one(rt, q, "{\"n\":3}", 0);
  int64_t ids[] = {b, a, keep + 1000000};
  int64_t *archived = NULL;
  size_t n = 0;
  cb_err err;
  assert_int_equal(cb_queue_archive(rt, q, ids, 3, &archived, &n, &err), CB_OK);
  assert_int_equal(n, 2);
  assert_true((archived[0] == a && archived[1] == b) || (archived[0] == b && archived[1] == a));
  free(archived);

  char sql[256];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM pgmq.a_%s WHERE msg_id IN (%lld, %lld)", q, (long long)a,
           (long long)b);
  assert_int_equal(sql_int(rt, sql, NULL), 2);
  snprintf(sql, sizeof sql, "SELECT count(*) FROM pgmq.a_%s WHERE msg_id = %lld AND message = '{\"n\":2}'", q,
           (long long)b);
  assert_int_equal(sql_int(rt, sql, NULL), 1); /* the message went with it */
  snprintf(sql, sizeof sql, "SELECT count(*) FROM pgmq.q_%s", q);
  assert_int_equal(sql_int(rt, sql, NULL), 1); /* only `keep` is left */
  cb_messages m;
  assert_int_equal(cb_queue_read(rt, q, 30, 10, &m, &err), CB_OK);
  assert_int_equal(m.count, 1);
  assert_int_equal(m.items[0].msg_id, keep);
  cb_messages_free(&m);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void set_vt_on_an_unknown_id_returns_an_empty_list(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_setvt");
  int64_t id = send_one(rt, q, "{\"n\":1}", 0);
  cb_messages m;
  cb_err err;
  assert_int_equal(cb_queue_set_vt(rt, q, id + 1000000, 30, &m, &err), CB_OK);
  assert_int_equal(m.count, 0);
  cb_messages_free(&m);
  /* On a known id it hides the message. */
  assert_int_equal(cb_queue_set_vt(rt, q, id, 60, &m, &err), CB_OK);
  assert_int_equal(m.count, 1);
  assert_int_equal(m.items[0].read_ct, 0);
  cb_messages_free(&m);
  assert_int_equal(cb_queue_read(rt, q, 30, 10, &m, &err), CB_OK);
  assert_int_equal(m.count, 0);
  cb_messages_free(&m);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void metrics_count_what_is_in_the_queue_and_what_was_ever_sent(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_metrics");
  cb_queue_metrics m = metrics_of(rt, q);
  assert_int_equal(m.queue_length, 0);
  assert_int_equal(m.total_messages, 0);
  assert_int_equal(m.newest_msg_age_sec, -1);
  assert_int_equal(m.oldest_msg_age_sec, -1);
  assert_true(m.scrape_time[0] != '\0');
  int64_t first = send_one(rt, q, "{\"n\":1}", 0);
  send_one(rt, q, "{\"n\":2}", 0);
  send_one(rt, q, "{\"n\":3}", 0);
  int64_t *deleted;
  size_t n;
  cb_err err;
  assert_int_equal(cb_queue_delete(rt, q, &first, 1, &deleted, &n, &err), CB_OK);
  free(deleted);
  m = metrics_of(rt, q);
  assert_int_equal(m.queue_length, 2);
  assert_int_equal(m.total_messages, 3);
  assert_true(m.newest_msg_age_sec >= 0);
  assert_true(m.oldest_msg_age_sec >= m.newest_msg_age_sec);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void purge_reports_how_many_messages_it_removed(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_purge");
  int64_t *ids;
  size_t n;
  cb_err err;
  assert_int_equal(cb_queue_send_batch(rt, q, "[1,2,3,4,5]", 0, &ids, &n, &err), CB_OK);
  free(ids);
  send_one(rt, q, "{\"late\":1}", 60); /* delayed messages are purged too */
  int64_t count = -1;
  assert_int_equal(cb_queue_purge(rt, q, &count, &err), CB_OK);
  assert_int_equal(count, 6);
  assert_int_equal(metrics_of(rt, q).queue_length, 0);
  assert_int_equal(cb_queue_purge(rt, q, &count, &err), CB_OK);
  assert_int_equal(count, 0);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static int listed(cb_runtime *rt, const char *q) {
  cb_queue_info *queues = NULL;
  size_t n = 0;
  cb_err err;
  assert_int_equal(cb_queue_list(rt, &queues, &n, &err), CB_OK);
  int found = 0;
  for (size_t i = 0; i < n; i++)
    if (strcmp(queues[i].name, q) == 0) {
      found = 1;
      assert_false(queues[i].is_partitioned);
      assert_false(queues[i].is_unlogged);
      assert_true(queues[i].created_at[0] != '\0');
    }
  free(queues);
  return found;
}

static void drop_reports_whether_the_queue_existed_and_list_follows(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_drop");
  assert_true(listed(rt, q));
  send_one(rt, q, "{\"n\":1}", 0);
  int existed = 0;
  cb_err err;
  assert_int_equal(cb_queue_drop(rt, q, &existed, &err), CB_OK);
  assert_int_equal(existed, 1);
  assert_false(listed(rt, q));
  char table[80];
  snprintf(table, sizeof table, "pgmq.q_%s", q);
  assert_int_equal(sql_int(rt, "SELECT count(to_regclass($1))", table), 0);
  snprintf(table, sizeof table, "pgmq.a_%s", q);
  assert_int_equal(sql_int(rt, "SELECT count(to_regclass($1))", table), 0);
  existed = 1;
  assert_int_equal(cb_queue_drop(rt, q, &existed, &err), CB_OK);
  assert_int_equal(existed, 0);
  cb_runtime_free(rt);
}

/* ------------------------------------------------------------ names */

static void invalid_queue_names_fail_with_invalid_argument_before_any_sql(void **state) {
  (void)state;
  char long_name[61];
  memset(long_name, 'a', 60);
  long_name[60] = '\0';
  const char *bad[] = {"", "Orders", "a; drop table x", long_name, "1abc", NULL};
  enum { NBAD = sizeof bad / sizeof bad[0] };

  /* A closed runtime: any call that reached SQL would answer CLOSED. */
  cb_runtime *rt = test_runtime(1);
  cb_runtime_close(rt);
  cb_err err;
  int64_t id = 0, count = 0, one = 1, *ids = NULL;
  size_t n = 0;
  int existed = 0;
  cb_messages m;
  cb_queue_metrics mt;
  assert_int_equal(cb_queue_send(rt, "valid_name", "{}", 0, &id, &err), CB_ECLOSED);

  for (size_t i = 0; i < NBAD; i++) {
    const char *q = bad[i];
    assert_int_equal(cb_queue_name_valid(q, &err), CB_EINVAL);
    assert_string_equal(cb_strerror(err.code), "INVALID_ARGUMENT");
    assert_true(err.message[0] != '\0');
    assert_int_equal(cb_queue_create(rt, q, &err), CB_EINVAL);
    assert_int_equal(cb_queue_drop(rt, q, &existed, &err), CB_EINVAL);
    assert_int_equal(cb_queue_send(rt, q, "{}", 0, &id, &err), CB_EINVAL);
    assert_int_equal(cb_queue_send_batch(rt, q, "[{}]", 0, &ids, &n, &err), CB_EINVAL);
    assert_int_equal(cb_queue_read(rt, q, 30, 1, &m, &err), CB_EINVAL);
    assert_int_equal(m.count, 0);
    assert_int_equal(cb_queue_read_with_poll(rt, q, 30, 1, 1, 0.1, &m, &err), CB_EINVAL);
    assert_int_equal(cb_queue_pop(rt, q, 1, &m, &err), CB_EINVAL);
    assert_int_equal(cb_queue_delete(rt, q, &one, 1, &ids, &n, &err), CB_EINVAL);
    assert_null(ids);
    assert_int_equal(cb_queue_archive(rt, q, &one, 1, &ids, &n, &err), CB_EINVAL);
    assert_null(ids);
    assert_int_equal(cb_queue_set_vt(rt, q, 1, 30, &m, &err), CB_EINVAL);
    assert_int_equal(cb_queue_metrics_get(rt, q, &mt, &err), CB_EINVAL);
    assert_int_equal(cb_queue_purge(rt, q, &count, &err), CB_EINVAL);
    assert_int_equal(err.code, CB_EINVAL);
  }
  cb_runtime_free(rt);

  /* The bounds: 47 bytes is the longest name, a digit may follow the first. */
  long_name[CB_QUEUE_NAME_MAX] = '\0';
  assert_int_equal(cb_queue_name_valid(long_name, &err), CB_OK);
  long_name[CB_QUEUE_NAME_MAX] = 'a';
  long_name[CB_QUEUE_NAME_MAX + 1] = '\0';
  assert_int_equal(cb_queue_name_valid(long_name, &err), CB_EINVAL);
  assert_int_equal(cb_queue_name_valid("_a1_b2", &err), CB_OK);
}

/* ------------------------------------------------------------ read_with_poll */

typedef struct late_sender {
  char queue[64];
  int delay_ms;
  int rc;
  int64_t id;
} late_sender;

/* Sends from a runtime of its own, so that only PostgreSQL's NOTIFY can tell
 * the reader's runtime about it. */
static void *send_later(void *arg) {
  late_sender *s = arg;
  cb_runtime *other = test_runtime(1);
  sleep_ms(s->delay_ms);
  cb_err err;
  s->rc = cb_queue_send(other, s->queue, "{\"late\":true}", 0, &s->id, &err);
  cb_runtime_free(other);
  return NULL;
}

static void a_send_from_another_runtime_wakes_read_with_poll(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_wake");
  late_sender s = {"", 300, -100, 0};
  snprintf(s.queue, sizeof s.queue, "%s", q);
  pthread_t t;
  assert_int_equal(pthread_create(&t, NULL, send_later, &s), 0);
  cb_messages m;
  cb_err err;
  double t0 = now_seconds();
  /* A 10 s poll interval: an early return can only come from the NOTIFY. */
  assert_int_equal(cb_queue_read_with_poll(rt, q, 30, 1, 20, 10, &m, &err), CB_OK);
  double elapsed = now_seconds() - t0;
  pthread_join(t, NULL);
  assert_int_equal(s.rc, CB_OK);
  assert_int_equal(m.count, 1);
  assert_int_equal(m.items[0].msg_id, s.id);
  assert_string_equal(m.items[0].message, "{\"late\": true}");
  assert_true(elapsed < 3.0);
  cb_messages_free(&m);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

static void read_with_poll_returns_empty_after_max_wait_when_nothing_comes(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  const char *q = fresh_queue(rt, "cb_tq_nothing");
  send_one(rt, q, "{\"later\":true}", 60); /* there, but not visible */
  cb_messages m;
  cb_err err;
  double t0 = now_seconds();
  assert_int_equal(cb_queue_read_with_poll(rt, q, 30, 1, 0.5, 0.1, &m, &err), CB_OK);
  double elapsed = now_seconds() - t0;
  assert_int_equal(m.count, 0);
  cb_messages_free(&m);
  assert_true(elapsed >= 0.45);
  assert_true(elapsed < 10.0);
  drop_queue(rt, q);
  cb_runtime_free(rt);
}

typedef struct closer {
  cb_runtime *rt;
  int delay_ms;
} closer;

static void *close_later(void *arg) {
  closer *c = arg;
  sleep_ms(c->delay_ms);
  cb_runtime_close(c->rt);
  return NULL;
}

static void closing_the_runtime_while_read_with_poll_waits_returns_closed(void **state) {
  (void)state;
  cb_runtime *admin = test_runtime(1);
  const char *q = fresh_queue(admin, "cb_tq_closed");
  cb_runtime *rt = test_runtime(2);
  closer c = {rt, 300};
  pthread_t t;
  assert_int_equal(pthread_create(&t, NULL, close_later, &c), 0);
  cb_messages m;
  cb_err err;
  double t0 = now_seconds();
  assert_int_equal(cb_queue_read_with_poll(rt, q, 30, 1, 60, 10, &m, &err), CB_ECLOSED);
  double elapsed = now_seconds() - t0;
  pthread_join(t, NULL);
  assert_int_equal(err.code, CB_ECLOSED);
  assert_int_equal(m.count, 0);
  cb_messages_free(&m);
  assert_true(elapsed < 5.0);
  cb_runtime_free(rt);
  drop_queue(admin, q);
  cb_runtime_free(admin);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(creating_a_queue_twice_is_fine),
      cmocka_unit_test(a_sent_message_is_read_back_with_read_count_one),
      cmocka_unit_test(a_read_message_is_hidden_for_vt_then_redelivered_with_a_higher_read_count),
      cmocka_unit_test(a_delayed_message_stays_invisible),
      cmocka_unit_test(a_batch_gets_ids_in_order_and_is_read_in_queue_order),
      cmocka_unit_test(pop_returns_and_removes_the_oldest_messages),
      cmocka_unit_test(delete_returns_the_ids_it_found_and_ignores_unknown_ones),
      cmocka_unit_test(archive_moves_messages_to_the_archive_table),
      cmocka_unit_test(set_vt_on_an_unknown_id_returns_an_empty_list),
      cmocka_unit_test(metrics_count_what_is_in_the_queue_and_what_was_ever_sent),
      cmocka_unit_test(purge_reports_how_many_messages_it_removed),
      cmocka_unit_test(drop_reports_whether_the_queue_existed_and_list_follows),
      cmocka_unit_test(invalid_queue_names_fail_with_invalid_argument_before_any_sql),
      cmocka_unit_test(a_send_from_another_runtime_wakes_read_with_poll),
      cmocka_unit_test(read_with_poll_returns_empty_after_max_wait_when_nothing_comes),
      cmocka_unit_test(closing_the_runtime_while_read_with_poll_waits_returns_closed),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
