/* Units of work against a real PostgreSQL: a unit remembers the first
 * statement it could not take, and running it runs none of its statements
 * (so a dropped statement can never shift the results of the others). The
 * failing add is a statement with more parameters than a statement may take,
 * or none of its values, or no SQL text: what a caller can get wrong without
 * any memory pressure, and the path an allocation failure takes too.
 * Appending one unit to another copies its statements, or its failure. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "commandbus/runtime.h"
#include "commandbus/unit.h"
#include "test_support.h"
#include "unit_internal.h" /* cb__unit_add_kept */

/* A table of this run, and how many rows it holds. */
static const char *make_table(cb_runtime *rt) {
  const char *table = test_name("cb_test_unit");
  char sql[160];
  snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", table);
  cb_unit_free(test_sql(rt, sql));
  snprintf(sql, sizeof sql, "CREATE TABLE %s (v text)", table);
  cb_unit *u = test_sql(rt, sql);
  assert_int_equal(cb_unit_status(u), CB_OK);
  cb_unit_free(u);
  return table;
}

static void drop_table(cb_runtime *rt, const char *table) {
  char sql[96];
  snprintf(sql, sizeof sql, "DROP TABLE %s", table);
  cb_unit_free(test_sql(rt, sql));
}

static long rows_in(cb_runtime *rt, const char *table) {
  char sql[96];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
  cb_unit *u = test_sql(rt, sql);
  assert_int_equal(cb_unit_status(u), CB_OK);
  long n = (long)cb_result_int(cb_unit_result(u, 0), 0, 0);
  cb_unit_free(u);
  return n;
}

/* INSERT INTO table VALUES ($1) */
static int add_insert(cb_unit *u, const char *table, const char *value) {
  char sql[96];
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES ($1)", table);
  const char *params[] = {value};
  return cb_unit_add(u, sql, 1, params);
}

/* A statement one parameter over the limit: cb_unit_add refuses it. */
static int add_oversized(cb_unit *u) {
  static const char *params[CB_UNIT_MAX_PARAMS + 1];
  for (int i = 0; i <= CB_UNIT_MAX_PARAMS; i++) params[i] = "x";
  return cb_unit_add(u, "SELECT $1", CB_UNIT_MAX_PARAMS + 1, params);
}

static void a_failed_add_is_remembered_and_the_exec_runs_nothing(void **state) {
  cb_runtime *rt = test_runtime(1);
  const char *table = make_table(rt);
  cb_unit *u = cb_unit_new();
  assert_int_equal(add_insert(u, table, "before"), 0);
  assert_int_equal(add_oversized(u), CB_EINVAL);
  /* The unit is failed from now on: what follows is not taken either, so
   * it cannot take index 1, the dropped statement's. */
  assert_int_equal(cb_unit_status(u), CB_EINVAL);
  assert_int_equal(add_insert(u, table, "after"), CB_EINVAL);
  assert_int_equal(cb_unit_count(u), 1);

  uint64_t sent = cb_runtime_units_sent(rt);
  cb_err err;
  cb_err_clear(&err);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_EINVAL);
  assert_int_equal(err.code, CB_EINVAL);
  assert_non_null(strstr(err.message, "statement 2 of a unit has 257 parameters"));
  assert_int_equal(cb_unit_status(u), CB_EINVAL);
  assert_null(cb_unit_result(u, 0));
  /* Nothing went to PostgreSQL, and the statement before the failure did
   * not run. */
  assert_true(cb_runtime_units_sent(rt) == sent);
  assert_int_equal(rows_in(rt, table), 0);
  /* Running it again changes nothing: the failure stays until a reset. */
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_EINVAL);
  assert_int_equal(rows_in(rt, table), 0);

  cb_unit_reset(u);
  assert_int_equal(cb_unit_status(u), CB_OK);
  assert_int_equal(add_insert(u, table, "again"), 0);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  assert_int_equal(rows_in(rt, table), 1);
  cb_unit_free(u);
  drop_table(rt, table);
  cb_runtime_free(rt);
}

static void every_kind_of_bad_statement_fails_the_unit(void **state) {
  cb_runtime *rt = test_runtime(1);
  const char *one[] = {"1"};
  struct {
    const char *sql;
    int nparams;
    const char *const *params;
    const char *says;
  } bad[] = {
      {NULL, 0, NULL, "has no SQL text"},
      {"SELECT $1", -1, one, "has -1 parameters"},
      {"SELECT $1", 1, NULL, "has 1 parameters and no values"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    cb_unit *u = cb_unit_new();
    assert_int_equal(cb_unit_add(u, "SELECT 1", 0, NULL), 0);
    assert_int_equal(cb_unit_add(u, bad[i].sql, bad[i].nparams, bad[i].params), CB_EINVAL);
    assert_non_null(strstr(cb_unit_error(u)->message, bad[i].says));
    cb_err err;
    uint64_t sent = cb_runtime_units_sent(rt);
    assert_int_equal(cb_runtime_exec(rt, u, &err), CB_EINVAL);
    assert_non_null(strstr(err.message, bad[i].says));
    assert_true(cb_runtime_units_sent(rt) == sent);
    assert_null(cb_unit_result(u, 0));
    cb_unit_free(u);
  }
  cb_runtime_free(rt);
}

/* Units run together: the failed one completes with its failure in its
 * turn (callbacks keep the order of the units), and only the others run. */
typedef struct completions {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int n, order[3], status[3];
} completions;

static completions seen = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, {0}, {0}};

static void on_done(cb_unit *u, void *arg) {
  pthread_mutex_lock(&seen.lock);
  seen.order[seen.n] = (int)(intptr_t)arg;
  seen.status[seen.n] = cb_unit_status(u);
  seen.n++;
  pthread_cond_broadcast(&seen.cond);
  pthread_mutex_unlock(&seen.lock);
}

static void among_several_units_only_the_failed_one_runs_nothing(void **state) {
  cb_runtime *rt = test_runtime(1);
  const char *table = make_table(rt);
  cb_unit *units[3] = {cb_unit_new(), cb_unit_new(), cb_unit_new()};
  add_insert(units[0], table, "first");
  add_insert(units[1], table, "lost");
  add_oversized(units[1]);
  add_insert(units[2], table, "third");

  /* Blocking: each unit has its own status. */
  cb_err err;
  assert_int_equal(cb_runtime_exec_many(rt, units, 3, &err), CB_OK);
  assert_int_equal(cb_unit_status(units[0]), CB_OK);
  assert_int_equal(cb_unit_status(units[1]), CB_EINVAL);
  assert_int_equal(cb_unit_status(units[2]), CB_OK);
  assert_int_equal(rows_in(rt, table), 2);

  /* Asynchronous: callbacks on the loop thread, in the units' order. */
  for (int i = 0; i < 3; i++) cb_unit_on_done(units[i], on_done, (void *)(intptr_t)i);
  assert_int_equal(cb_runtime_submit(rt, units, 3), CB_OK);
  pthread_mutex_lock(&seen.lock);
  while (seen.n < 3) pthread_cond_wait(&seen.cond, &seen.lock);
  pthread_mutex_unlock(&seen.lock);
  for (int i = 0; i < 3; i++) assert_int_equal(seen.order[i], i);
  assert_int_equal(seen.status[0], CB_OK);
  assert_int_equal(seen.status[1], CB_EINVAL);
  assert_int_equal(seen.status[2], CB_OK);
  assert_int_equal(rows_in(rt, table), 4);

  for (int i = 0; i < 3; i++) cb_unit_free(units[i]);
  drop_table(rt, table);
  cb_runtime_free(rt);
}

static void a_statement_at_the_limit_is_taken_and_runs(void **state) {
  cb_runtime *rt = test_runtime(1);
  static const char *params[CB_UNIT_MAX_PARAMS];
  char sql[CB_UNIT_MAX_PARAMS * 12 + 16] = "SELECT ";
  for (int i = 0; i < CB_UNIT_MAX_PARAMS; i++) {
    params[i] = "1";
    snprintf(sql + strlen(sql), sizeof sql - strlen(sql), "%s$%d::int", i ? " + " : "", i + 1);
  }
  cb_unit *u = cb_unit_new();
  assert_int_equal(cb_unit_add(u, sql, CB_UNIT_MAX_PARAMS, params), 0);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  assert_int_equal(cb_result_int(cb_unit_result(u, 0), 0, 0), CB_UNIT_MAX_PARAMS);
  cb_unit_free(u);
  cb_runtime_free(rt);
}

/* Appending copies statements, parameters (SQL NULL too) and flags, to run
 * in the other unit's transaction; a source that failed passes its failure
 * on, and the copy runs nothing. */
static void appending_copies_statements_and_passes_a_failure_on(void **state) {
  cb_runtime *rt = test_runtime(1);
  const char *table = make_table(rt);
  cb_unit *src = cb_unit_new(), *dst = cb_unit_new();
  assert_int_equal(add_insert(dst, table, "first"), 0);
  assert_int_equal(add_insert(src, table, "second"), 0);
  assert_int_equal(add_insert(src, table, NULL), 1);
  char sql[96];
  snprintf(sql, sizeof sql, "SELECT count(*), count(v) FROM %s", table);
  assert_int_equal(cb_unit_add_flags(src, sql, 0, NULL, CB_STMT_ONESHOT), 2);
  assert_int_equal(cb_unit_append(dst, src), CB_OK);
  assert_int_equal(cb_unit_count(dst), 4);
  cb_unit_free(src); /* the copies are dst's own */
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, dst, &err), CB_OK);
  assert_string_equal(cb_result_value(cb_unit_result(dst, 3), 0, 0), "3");
  assert_string_equal(cb_result_value(cb_unit_result(dst, 3), 0, 1), "2");
  cb_unit_free(dst);

  src = cb_unit_new();
  dst = cb_unit_new();
  assert_int_equal(add_oversized(src), CB_EINVAL);
  assert_int_equal(add_insert(dst, table, "never"), 0);
  assert_int_equal(cb_unit_append(dst, src), CB_EINVAL);
  assert_int_equal(cb_unit_status(dst), CB_EINVAL);
  assert_int_equal(cb_runtime_exec(rt, dst, &err), CB_EINVAL);
  assert_non_null(strstr(err.message, "257 parameters"));
  assert_int_equal(rows_in(rt, table), 3);
  cb_unit_free(src);
  cb_unit_free(dst);
  drop_table(rt, table);
  cb_runtime_free(rt);
}

/* A kept statement's text is the caller's, read when the unit runs, not a
 * copy (a single send keeps its thread's statement text rather than copy
 * 1.7 kB into every unit); appending it to another unit copies it, so that
 * the copy runs what it was given after the caller's text changed. */
static void a_kept_statement_runs_the_callers_text_and_an_append_copies_it(void **state) {
  cb_runtime *rt = test_runtime(1);
  char text[64] = "SELECT 1 + $1::int";
  const char *one[] = {"1"};
  cb_unit *kept = cb_unit_new(), *copy = cb_unit_new();
  assert_int_equal(cb__unit_add_kept(kept, text, cb__sql_hash(text), 1, one), 0);
  assert_int_equal(cb_unit_append(copy, kept), CB_OK);
  snprintf(text, sizeof text, "SELECT 10 + $1::int");
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, copy, &err), CB_OK);
  assert_string_equal(cb_result_value(cb_unit_result(copy, 0), 0, 0), "2");
  /* the kept one runs the text as it is now, prepared under its own hash */
  cb_unit_free(kept);
  kept = cb_unit_new();
  assert_int_equal(cb__unit_add_kept(kept, text, cb__sql_hash(text), 1, one), 0);
  assert_int_equal(cb_runtime_exec(rt, kept, &err), CB_OK);
  assert_string_equal(cb_result_value(cb_unit_result(kept, 0), 0, 0), "11");
  cb_unit_free(kept);
  cb_unit_free(copy);
  cb_runtime_free(rt);
}

/* Integers read back as PostgreSQL wrote them, at the ends of int8 and
 * where a digit count stops fitting (cb_result_int reads short ones itself
 * and hands the rest to strtoll); NULL reads as 0. */
static void integers_read_back_whole(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(1);
  static const int64_t want[] = {0,
                                 -1,
                                 7,
                                 123456789012345678LL,
                                 -123456789012345678LL,
                                 1234567890123456789LL,
                                 -1234567890123456789LL,
                                 INT64_MAX,
                                 INT64_MIN,
                                 0};
  cb_unit *u = test_sql(rt,
                        "SELECT 0::int8, -1::int8, 7::int8, 123456789012345678::int8, -123456789012345678::int8, "
                        "1234567890123456789::int8, -1234567890123456789::int8, 9223372036854775807::int8, "
                        "(-9223372036854775807 - 1)::int8, NULL::int8");
  assert_int_equal(cb_unit_status(u), CB_OK);
  const cb_result *r = cb_unit_result(u, 0);
  for (int col = 0; col < (int)(sizeof want / sizeof want[0]); col++)
    assert_int_equal(cb_result_int(r, 0, col), want[col]);
  cb_unit_free(u);
  cb_runtime_free(rt);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(integers_read_back_whole),
      cmocka_unit_test(a_failed_add_is_remembered_and_the_exec_runs_nothing),
      cmocka_unit_test(every_kind_of_bad_statement_fails_the_unit),
      cmocka_unit_test(among_several_units_only_the_failed_one_runs_nothing),
      cmocka_unit_test(a_statement_at_the_limit_is_taken_and_runs),
      cmocka_unit_test(appending_copies_statements_and_passes_a_failure_on),
      cmocka_unit_test(a_kept_statement_runs_the_callers_text_and_an_append_copies_it),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
