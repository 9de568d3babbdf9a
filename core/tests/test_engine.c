/* The engine's fetches (core/src/engine.c), with an owner of the test's
 * own. Its wake-up: a notification that arrives while a fetch is on its way must bring
 * another fetch once that one is back, not wait for the next poll.
 *
 * The race, made to happen every time: the owner's fetch is one SELECT that
 * first waits for an advisory lock the test holds (an uncorrelated subquery:
 * evaluated once, before the table is read, even when it is empty). PostgreSQL takes the
 * statement's snapshot before the wait, so a row committed during the wait
 * is not in its result. While the fetch waits, the test commits a row and
 * notifies the engine's channel, makes sure the engine's loop has taken the
 * notification (the runtime's hub hears it in the same callback, before
 * the fetch can come back), then releases the lock: the waiting fetch
 * returns no rows, and only a fetch built after the notification finds the
 * row. The poll interval is an hour, so the row is found by that fetch or
 * not within the test's (generous) bound. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "commandbus/hub.h"
#include "commandbus/schema.h"
#include "engine_internal.h"
#include "test_support.h"

#define MAX_FETCHES 64

typedef struct owner {
  cb_engine e;
  char name[56], table[64], sql[256];
  long long key; /* the advisory lock the fetch waits for */
  int nth_param; /* the fetch's number (from 1) is its $2 */
  int max_fetches;
  long long last; /* [loop] the highest id fetched */
  pthread_mutex_t lock;
  pthread_cond_t changed;
  int built;                    /* [lock] fetches built */
  int fetches;                  /* [lock] fetches handed over */
  int rows[MAX_FETCHES];        /* [lock] rows of each */
  long long first[MAX_FETCHES]; /* [lock] the first id of each */
  long long found;              /* [lock] the highest id fetched */
} owner;

static int room(void *self) {
  (void)self;
  return 16;
}

static int add_fetch(void *self, cb_unit *u, int n) {
  (void)n;
  owner *o = self;
  char last[32], nth[16];
  snprintf(last, sizeof last, "%lld", o->last);
  pthread_mutex_lock(&o->lock);
  snprintf(nth, sizeof nth, "%d", ++o->built);
  pthread_cond_broadcast(&o->changed);
  pthread_mutex_unlock(&o->lock);
  const char *params[] = {last, nth};
  return cb_unit_add(u, o->sql, o->nth_param ? 2 : 1, params);
}

static void fetched(void *self, cb_unit *u, int index) {
  owner *o = self;
  const cb_result *r = cb_unit_result(u, index);
  int rows = cb_result_rows(r);
  for (int i = 0; i < rows; i++) {
    long long id = cb_result_int(r, i, 0);
    if (id > o->last) o->last = id;
  }
  pthread_mutex_lock(&o->lock);
  if (o->fetches < MAX_FETCHES) {
    o->rows[o->fetches] = rows;
    o->first[o->fetches] = rows ? cb_result_int(r, 0, 0) : 0;
  }
  o->fetches++;
  o->found = o->last;
  pthread_cond_broadcast(&o->changed);
  pthread_mutex_unlock(&o->lock);
}

static void report(void *self, cb_runner_stat *stat) {
  (void)self;
  (void)stat;
}

static const cb_engine_ops OPS = {.room = room, .add_fetch = add_fetch, .fetched = fetched, .report = report};

/* Waits until pred(o) holds, up to `seconds`; whether it does. */
static int wait_for(owner *o, int (*pred)(const owner *), int seconds) {
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += seconds;
  pthread_mutex_lock(&o->lock);
  int ok;
  while (!(ok = pred(o)) && pthread_cond_timedwait(&o->changed, &o->lock, &until) == 0) {
  }
  pthread_mutex_unlock(&o->lock);
  return ok;
}

static int one_fetch_back(const owner *o) { return o->fetches >= 1; }
static int three_built(const owner *o) { return o->built >= 3; }
static int three_back(const owner *o) { return o->fetches >= 3; }
static int row_found(const owner *o) { return o->found > 0; }

static void exec_ok(cb_runtime *rt, const char *sql, int nparams, const char *const *params) {
  cb_unit *u = cb_unit_new();
  assert_non_null(u);
  cb_unit_add(u, sql, nparams, params);
  cb_err err;
  int rc = cb_runtime_exec(rt, u, &err);
  if (rc != CB_OK) fprintf(stderr, "%s: %s\n", sql, err.message);
  assert_int_equal(rc, CB_OK);
  cb_unit_free(u);
}

static long long count_of(cb_runtime *rt, const char *sql) {
  cb_unit *u = test_sql(rt, sql);
  assert_int_equal(cb_unit_status(u), CB_OK);
  long long n = cb_result_int(cb_unit_result(u, 0), 0, 0);
  cb_unit_free(u);
  return n;
}

/* The owner's lock and its table (public.<name>, ids only), made afresh. */
static void open_owner(owner *o, cb_runtime *other, const char *name) {
  memset(o, 0, sizeof *o);
  pthread_mutex_init(&o->lock, NULL);
  pthread_cond_init(&o->changed, NULL);
  snprintf(o->name, sizeof o->name, "%s", name);
  snprintf(o->table, sizeof o->table, "public.%s", name);
  char sql[512];
  snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", o->table);
  exec_ok(other, sql, 0, NULL);
  snprintf(sql, sizeof sql, "CREATE TABLE %s (id bigserial PRIMARY KEY)", o->table);
  exec_ok(other, sql, 0, NULL);
}

/* Starts the owner's engine on rt: one lane, fetching o->sql. */
static void start_engine(owner *o, cb_runtime *rt, double poll_interval) {
  cb_engine_config c = {.kind = "test",
                        .name = "test engine",
                        .domain = o->name,
                        .queue = o->name,
                        .lanes = 1,
                        .capacity = 16,
                        .visibility_timeout = 30,
                        .statement_timeout = 60,
                        .poll_interval = poll_interval,
                        .max_fetches = o->max_fetches,
                        .ops = &OPS,
                        .owner = o};
  cb_err err;
  assert_int_equal(cb_engine_init(&o->e, rt, &c, &err), CB_OK);
  assert_int_equal(cb_engine_start(&o->e, &err), CB_OK);
}

/* Stops the engine, drops the table. */
static void close_owner(owner *o, cb_runtime *other) {
  cb_engine_stop(&o->e);
  assert_true(cb_engine_wait(&o->e, 60000));
  cb_engine_destroy(&o->e);
  char sql[512];
  snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", o->table);
  exec_ok(other, sql, 0, NULL);
  pthread_cond_destroy(&o->changed);
  pthread_mutex_destroy(&o->lock);
}

static void test_notification_during_fetch_is_kept(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);     /* the engine's */
  cb_runtime *other = test_runtime(2);  /* the sender's */
  cb_runtime *holder = test_runtime(1); /* one connection: the session lock is taken and released there */
  cb_err err;
  assert_int_equal(cb_schema_setup(other, NULL, &err), CB_OK);

  owner o;
  open_owner(&o, other, test_name("engine_wake"));
  o.key = 1000000 + (long long)getpid();
  snprintf(o.sql, sizeof o.sql,
           "SELECT i.id FROM %s i WHERE (SELECT 1 FROM (SELECT pg_advisory_xact_lock_shared(%lld)) l) = 1"
           " AND i.id > $1::bigint ORDER BY i.id",
           o.table, o.key);
  char sql[512];

  start_engine(&o, rt, 3600);                    /* no poll within the test */
  assert_true(wait_for(&o, one_fetch_back, 60)); /* the fetch at start: nothing there */
  pthread_mutex_lock(&o.lock);
  assert_int_equal(o.rows[0], 0);
  pthread_mutex_unlock(&o.lock);

  /* The next fetch will wait for the lock. */
  char key[32];
  snprintf(key, sizeof key, "%lld", o.key);
  const char *key_param[] = {key};
  exec_ok(holder, "SELECT pg_advisory_lock($1::bigint)", 1, key_param);
  const char *channel_param[] = {o.e.channel};
  exec_ok(other, "SELECT pg_notify($1, '')", 1, channel_param);
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = 0"
           " AND objid = %lld AND objsubid = 1",
           o.key);
  for (int i = 0; count_of(other, sql) == 0; i++) {
    assert_true(i < 6000); /* a minute */
    usleep(10000);
  }
  pthread_mutex_lock(&o.lock);
  assert_int_equal(o.fetches, 1); /* the second one waits */
  pthread_mutex_unlock(&o.lock);

  /* A row is committed and the engine notified while its fetch waits; once
   * the hub heard it, the engine's watch has run or runs next on its loop. */
  cb_hub_sub *sub = cb_hub_subscribe(cb_runtime_hub(rt), o.e.channel);
  assert_non_null(sub);
  snprintf(sql, sizeof sql, "WITH i AS (INSERT INTO %s DEFAULT VALUES RETURNING id) SELECT pg_notify($1, '') FROM i",
           o.table);
  exec_ok(other, sql, 1, channel_param);
  assert_int_equal(cb_hub_wait(sub, 60000), 1);
  cb_hub_unsubscribe(sub);

  exec_ok(holder, "SELECT pg_advisory_unlock($1::bigint)", 1, key_param);
  int found = wait_for(&o, row_found, 60);
  pthread_mutex_lock(&o.lock);
  int fetches = o.fetches, waited_rows = o.rows[1];
  pthread_mutex_unlock(&o.lock);
  assert_true(fetches >= 2);
  assert_int_equal(waited_rows, 0); /* the fetch that waited did not see the row: the race happened */
  assert_true(found);               /* a fetch after it did, without a poll */

  close_owner(&o, other);
  cb_runtime_free(holder);
  cb_runtime_free(other);
  cb_runtime_free(rt);
}

/* A fetch that found fewer rows than it asked for leaves the engine waiting
 * for a notification (no fetch after it, see drained); a row nobody
 * notified of (a redelivery, a delay that ran out) is still found by the
 * poll. */
static void test_poll_fetches_after_a_drained_queue(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_runtime *other = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(other, NULL, &err), CB_OK);
  owner o;
  open_owner(&o, other, test_name("engine_poll"));
  snprintf(o.sql, sizeof o.sql, "SELECT i.id FROM %s i WHERE i.id > $1::bigint ORDER BY i.id", o.table);
  char sql[512];
  start_engine(&o, rt, 0.05);
  assert_true(wait_for(&o, one_fetch_back, 60)); /* nothing there: drained */
  snprintf(sql, sizeof sql, "INSERT INTO %s DEFAULT VALUES", o.table);
  exec_ok(other, sql, 0, NULL); /* no notification */
  assert_true(wait_for(&o, row_found, 60));
  close_owner(&o, other);
  cb_runtime_free(other);
  cb_runtime_free(rt);
}

/* A fetch that came back full (the queue holds more) brings two at once,
 * each in its own transaction, so that the pool's connections read side by
 * side; their rows are handed over in the order the fetches were built,
 * even when the later one comes back first (commands keep the queue's order
 * on their lanes).
 *
 * The owner's fetches number themselves ($2): the first returns a full
 * batch, the second waits for an advisory lock the test holds, the third
 * returns at once, the later ones nothing (the queue drained). */
static void test_full_fetch_brings_two_in_order(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_runtime *other = test_runtime(2);
  cb_runtime *holder = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(other, NULL, &err), CB_OK);
  owner o;
  open_owner(&o, other, test_name("engine_two"));
  o.key = 2000000 + (long long)getpid();
  o.nth_param = 1;
  o.max_fetches = 2;
  snprintf(o.sql, sizeof o.sql,
           "SELECT g FROM generate_series($2::int * 100 + 1, $2::int * 100 + CASE WHEN $2::int <= 3 THEN 16 ELSE 0"
           " END) g WHERE $1::bigint >= 0 AND (SELECT count(*) FROM (SELECT pg_advisory_xact_lock_shared(%lld)"
           " WHERE $2::int = 2) l) >= 0",
           o.key);
  char key[32];
  snprintf(key, sizeof key, "%lld", o.key);
  const char *key_param[] = {key};
  exec_ok(holder, "SELECT pg_advisory_lock($1::bigint)", 1, key_param);

  start_engine(&o, rt, 3600);                 /* no poll within the test */
  assert_true(wait_for(&o, three_built, 60)); /* the second waits: the third went beside it */
  /* The third has come back from the server: only the waiting one runs. */
  char sql[512];
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid()"
           " AND query LIKE '%%advisory_xact_lock_shared(%lld)%%'",
           o.key);
  for (int i = 0; count_of(other, sql) != 1; i++) {
    assert_true(i < 6000); /* a minute */
    usleep(10000);
  }
  pthread_mutex_lock(&o.lock);
  assert_int_equal(o.fetches, 1); /* the third waits for the second */
  pthread_mutex_unlock(&o.lock);

  exec_ok(holder, "SELECT pg_advisory_unlock($1::bigint)", 1, key_param);
  assert_true(wait_for(&o, three_back, 60));
  pthread_mutex_lock(&o.lock);
  assert_int_equal(o.first[0], 101);
  assert_int_equal(o.first[1], 201);
  assert_int_equal(o.first[2], 301);
  pthread_mutex_unlock(&o.lock);

  close_owner(&o, other);
  cb_runtime_free(holder);
  cb_runtime_free(other);
  cb_runtime_free(rt);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_notification_during_fetch_is_kept),
      cmocka_unit_test(test_poll_fetches_after_a_drained_queue),
      cmocka_unit_test(test_full_fetch_brings_two_in_order),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
