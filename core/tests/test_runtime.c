/* The sync runtime against a real PostgreSQL: units, pipelining, errors,
 * the loop-thread deadlock guard, lost connections and shutdown under load. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "commandbus/queue.h"
#include "commandbus/runtime.h"
#include "commandbus/thread.h"
#include "test_support.h"

/* What a child forked from a process with an open runtime sees (nginx forks
 * its workers after init_by_lua): an error at once, and an exit that does not
 * wait for a loop thread it does not have. Returns the exit status the child
 * reports: 0 when all held. */
static int in_forked_child(cb_runtime *rt) {
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, "SELECT 1", 0, NULL);
  cb_err err;
  int rc = cb_runtime_exec(rt, u, &err);
  int ok = rc == CB_ESTATE && strstr(err.message, "cannot be used in process") != NULL;
  ok = ok && cb_runtime_check(rt, &err) == CB_ESTATE && cb_runtime_is_closed(rt);
  ok = ok && cb_runtime_submit(rt, &u, 1) == CB_ESTATE;
  ok = ok && cb_process_id() == getpid(); /* the parent's, kept by thread.c, was forgotten */
  cb_runtime_close(rt);                   /* what the atexit hook does at exit(): only forgets it */
  cb_runtime_free(rt);
  cb_unit_free(u);
  return ok ? 0 : 1;
}

static void a_forked_child_gets_an_error_at_once_and_exits_cleanly(void **state) {
  /* Under valgrind the child's leak report would count the parent's memory
   * it holds a copy of (and the TLS of threads it does not have). */
  if (getenv("CB_UNDER_VALGRIND")) skip();
  cb_runtime *rt = test_runtime(1);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) _exit(in_forked_child(rt)); /* _exit: no leak report over the parent's copies either */
  int status = -1;
  for (int i = 0; i < 500 && waitpid(pid, &status, WNOHANG) == 0; i++) usleep(10000);
  if (!WIFEXITED(status)) kill(pid, SIGKILL); /* hung: fail rather than wait forever */
  assert_true(WIFEXITED(status));
  assert_int_equal(WEXITSTATUS(status), 0);
  /* The parent's runtime is untouched. */
  cb_unit *u = test_sql(rt, "SELECT 1");
  assert_int_equal(cb_unit_status(u), CB_OK);
  cb_unit_free(u);
  cb_runtime_free(rt);
}

static void a_unit_returns_rows_and_parameters_round_trip(void **state) {
  cb_runtime *rt = test_runtime(2);
  cb_unit *u = cb_unit_new();
  const char *params[] = {"41", NULL};
  int i = cb_unit_add(u, "SELECT $1::int + 1, $2::text IS NULL", 2, params);
  assert_int_equal(i, 0);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  assert_int_equal(cb_result_rows(cb_unit_result(u, 0)), 1);
  assert_string_equal(cb_result_value(cb_unit_result(u, 0), 0, 0), "42");
  assert_string_equal(cb_result_value(cb_unit_result(u, 0), 0, 1), "t");
  /* Run again: now prepared on the connection. */
  cb_unit_reset(u);
  cb_unit_add(u, "SELECT $1::int + 1, $2::text IS NULL", 2, params);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  assert_string_equal(cb_result_value(cb_unit_result(u, 0), 0, 0), "42");
  cb_unit_free(u);
  cb_runtime_free(rt);
}

static void an_error_rolls_back_the_whole_unit_and_reports_sqlstate(void **state) {
  cb_runtime *rt = test_runtime(1);
  /* A temporary table: private to the session, so parallel runs never meet.
   * The pool has one connection, so every unit below uses that session. */
  cb_unit_free(test_sql(rt, "CREATE TEMP TABLE cb_test_rollback (x int primary key)"));
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, "INSERT INTO cb_test_rollback VALUES (1)", 0, NULL);
  cb_unit_add(u, "INSERT INTO cb_test_rollback VALUES (1)", 0, NULL); /* duplicate key */
  cb_unit_add(u, "SELECT 1", 0, NULL);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_EDATABASE);
  assert_string_equal(err.sqlstate, "23505");
  assert_null(cb_unit_result(u, 2));
  cb_unit_free(u);
  u = test_sql(rt, "SELECT count(*) FROM cb_test_rollback");
  assert_string_equal(cb_result_value(cb_unit_result(u, 0), 0, 0), "0");
  cb_unit_free(u);
  /* The connection is healthy afterwards, and a statement first prepared in
   * a failing unit still works. */
  u = cb_unit_new();
  cb_unit_add(u, "SELECT 1/0", 0, NULL);
  cb_unit_add(u, "SELECT 'fresh statement'::text", 0, NULL);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_EDATABASE);
  cb_unit_reset(u);
  cb_unit_add(u, "SELECT 'fresh statement'::text", 0, NULL);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  assert_string_equal(cb_result_value(cb_unit_result(u, 0), 0, 0), "fresh statement");
  cb_unit_free(u);
  cb_runtime_free(rt);
}

static void a_failed_prepare_spoils_only_its_own_statements(void **state) {
  cb_runtime *rt = test_runtime(1);
  cb_err err;
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, "SELECT 'cached before'::text", 0, NULL);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  /* One Prepare fails (syntax), the other in its segment is skipped. */
  cb_unit_reset(u);
  cb_unit_add(u, "SELEC broken", 0, NULL);
  cb_unit_add(u, "SELECT 'skipped prepare'::text", 0, NULL);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_EDATABASE);
  assert_string_equal(err.sqlstate, "42601");
  /* Both surviving statements run: one prepared again, one still cached. */
  cb_unit_reset(u);
  cb_unit_add(u, "SELECT 'skipped prepare'::text", 0, NULL);
  cb_unit_add(u, "SELECT 'cached before'::text", 0, NULL);
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  assert_string_equal(cb_result_value(cb_unit_result(u, 0), 0, 0), "skipped prepare");
  assert_string_equal(cb_result_value(cb_unit_result(u, 1), 0, 0), "cached before");
  cb_unit_free(u);
  cb_runtime_free(rt);
}

static void many_units_in_one_round_trip_are_each_atomic(void **state) {
  cb_runtime *rt = test_runtime(1);
  enum { N = 50 };
  cb_unit *units[N];
  for (int i = 0; i < N; i++) {
    units[i] = cb_unit_new();
    char v[16];
    snprintf(v, sizeof v, "%d", i);
    const char *p[] = {v};
    cb_unit_add(units[i], i == 7 ? "SELECT 1/($1::int - 7)" : "SELECT $1::int", 1, p);
  }
  cb_err err;
  assert_int_equal(cb_runtime_exec_many(rt, units, N, &err), CB_OK);
  for (int i = 0; i < N; i++) {
    if (i == 7) {
      assert_int_equal(cb_unit_status(units[i]), CB_EDATABASE);
      assert_string_equal(cb_unit_error(units[i])->sqlstate, "22012");
    } else {
      assert_int_equal(cb_unit_status(units[i]), CB_OK);
      assert_int_equal(cb_result_int(cb_unit_result(units[i], 0), 0, 0), i);
    }
    cb_unit_free(units[i]);
  }
  cb_runtime_free(rt);
}

typedef struct deadlock_probe {
  pthread_mutex_t lock;
  pthread_cond_t done;
  int finished;
  int rc;
} deadlock_probe;

static void call_blocking_from_loop(cb_runtime *rt, void *arg) {
  deadlock_probe *p = arg;
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, "SELECT 1", 0, NULL);
  cb_err err;
  int rc = cb_runtime_exec(rt, u, &err);
  cb_unit_free(u);
  pthread_mutex_lock(&p->lock);
  p->rc = rc;
  p->finished = 1;
  pthread_cond_signal(&p->done);
  pthread_mutex_unlock(&p->lock);
}

static void a_blocking_call_on_the_loop_thread_fails_with_deadlock(void **state) {
  cb_runtime *rt = test_runtime(1);
  deadlock_probe p = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
  assert_int_equal(cb_runtime_call(rt, call_blocking_from_loop, &p), CB_OK);
  pthread_mutex_lock(&p.lock);
  while (!p.finished) pthread_cond_wait(&p.done, &p.lock);
  pthread_mutex_unlock(&p.lock);
  assert_int_equal(p.rc, CB_EDEADLOCK);
  assert_string_equal(cb_strerror(p.rc), "DEADLOCK");
  cb_runtime_free(rt);
}

static void an_unreachable_database_fails_with_connection_within_the_timeout(void **state) {
  cb_runtime_options o = {0};
  o.conninfo = "postgresql://nobody@127.0.0.1:1/none";
  o.connect_timeout_ms = 2000;
  cb_runtime *rt = (cb_runtime *)0x1;
  cb_err err;
  assert_int_equal(cb_runtime_new(&o, &rt, &err), CB_ECONNECTION);
  assert_null(rt);
  assert_string_equal(cb_strerror(err.code), "CONNECTION");
  assert_non_null(strstr(err.message, "PostgreSQL"));
}

static void a_closed_runtime_refuses_work_with_closed(void **state) {
  cb_runtime *rt = test_runtime(1);
  cb_runtime_close(rt);
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, "SELECT 1", 0, NULL);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_ECLOSED);
  assert_string_equal(cb_strerror(err.code), "CLOSED");
  cb_unit_free(u);
  cb_runtime_close(rt); /* twice is fine */
  cb_runtime_free(rt);
}

typedef struct slow_call {
  cb_runtime *rt;
  int rc;
  char code[32];
} slow_call;

static void *run_slow(void *arg) {
  slow_call *c = arg;
  cb_unit *u = cb_unit_new();
  cb_unit_add(u, "SELECT pg_sleep(30)", 0, NULL);
  cb_err err;
  c->rc = cb_runtime_exec(c->rt, u, &err);
  snprintf(c->code, sizeof c->code, "%s", cb_strerror(c->rc));
  cb_unit_free(u);
  return NULL;
}

/* A runtime of one connection whose sessions are found by their
 * application name (victim gets a unique one made from prefix). */
static cb_runtime *victim_runtime(const char *prefix, char *victim, size_t len) {
  cb_runtime_options o = {0};
  o.conninfo = test_dsn();
  o.pool_size = 1;
  snprintf(victim, len, "%s", test_name(prefix));
  o.application_name = victim;
  cb_runtime *rt = NULL;
  cb_err err;
  assert_int_equal(cb_runtime_new(&o, &rt, &err), CB_OK);
  return rt;
}

static void a_lost_connection_fails_in_flight_work_and_reconnects(void **state) {
  char victim[64];
  cb_runtime *rt = victim_runtime("cb_victim", victim, sizeof victim);
  cb_err err;
  cb_runtime *killer = test_runtime(1);

  slow_call c = {rt, 1, ""};
  pthread_t t;
  pthread_create(&t, NULL, run_slow, &c);
  /* Wait until the sleep is running, then kill the victim's backends. */
  int killed = 0;
  for (int i = 0; i < 200 && !killed; i++) {
    cb_unit *k = cb_unit_new();
    const char *p[] = {victim};
    cb_unit_add(k,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1 AND query LIKE 'SELECT pg_sleep%'",
                1, p);
    cb_err kerr;
    killed = cb_runtime_exec(killer, k, &kerr) == CB_OK && cb_result_int(cb_unit_result(k, 0), 0, 0) > 0;
    cb_unit_free(k);
    if (!killed) usleep(20 * 1000);
  }
  assert_true(killed);
  pthread_join(t, NULL);
  assert_int_equal(c.rc, CB_ECONNECTION);
  assert_string_equal(c.code, "CONNECTION");

  /* The pool reconnects with backoff; work succeeds again shortly. */
  int ok = 0;
  cb_unit *u = cb_unit_new();
  for (int i = 0; i < 100 && !ok; i++) {
    cb_unit_reset(u);
    cb_unit_add(u, "SELECT 1", 0, NULL);
    ok = cb_runtime_exec(rt, u, &err) == CB_OK;
    if (!ok) usleep(50 * 1000);
  }
  assert_true(ok);
  cb_unit_free(u);
  cb_runtime_free(killer);
  cb_runtime_free(rt);
}

/* Kills the idle backends of application `name` from another runtime. */
static int kill_backends(const char *name) {
  cb_runtime *killer = test_runtime(1);
  cb_unit *k = cb_unit_new();
  const char *p[] = {name};
  /* With a timeout, pg_terminate_backend returns once the backend is gone. */
  cb_unit_add(k, "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity WHERE application_name = $1", 1,
              p);
  cb_err err;
  int killed = cb_runtime_exec(killer, k, &err) == CB_OK ? (int)cb_result_int(cb_unit_result(k, 0), 0, 0) : -1;
  cb_unit_free(k);
  cb_runtime_free(killer);
  return killed;
}

static void work_whose_connection_died_before_it_was_sent_goes_out_on_a_fresh_one(void **state) {
  char victim[64];
  cb_runtime *rt = victim_runtime("cb_idle_victim", victim, sizeof victim);
  cb_err err;
  cb_unit *u = cb_unit_new();
  /* Whether the loop has noticed the loss yet (reconnecting) or not (the
   * goodbye still unread in the socket), the very next call succeeds. */
  for (int round = 0; round < 3; round++) {
    assert_true(kill_backends(victim) >= 1);
    if (round == 1) usleep(200 * 1000);
    cb_unit_reset(u);
    cb_unit_add(u, "SELECT 1", 0, NULL);
    int rc = cb_runtime_exec(rt, u, &err);
    if (rc != CB_OK) fprintf(stderr, "round %d: %s: %s\n", round, cb_strerror(rc), err.message);
    assert_int_equal(rc, CB_OK);
  }
  cb_unit_free(u);
  cb_runtime_free(rt);
}

typedef struct sender {
  cb_runtime *rt;
  int sent, closed, other;
} sender;

static char queue_name[64];

static void *send_many(void *arg) {
  sender *s = arg;
  for (int i = 0; i < 1000; i++) {
    int64_t id;
    cb_err err;
    int rc = cb_queue_send(s->rt, queue_name, "{\"n\":1}", 0, &id, &err);
    if (rc == CB_OK) s->sent++;
    else if (rc == CB_ECLOSED) s->closed++;
    else s->other++;
  }
  return NULL;
}

static void run_senders(cb_runtime *rt, sender *s, int close_midway) {
  pthread_t t[8];
  for (int i = 0; i < 8; i++) {
    s[i] = (sender){rt, 0, 0, 0};
    pthread_create(&t[i], NULL, send_many, &s[i]);
  }
  if (close_midway) {
    usleep(100 * 1000);
    cb_runtime_close(rt);
  }
  for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
}

static void eight_threads_sending_a_thousand_each_all_land(void **state) {
  snprintf(queue_name, sizeof queue_name, "%s", test_name("cb_test_threads"));
  cb_runtime *rt = test_runtime(4);
  cb_err err;
  int existed;
  cb_queue_drop(rt, queue_name, &existed, &err);
  assert_int_equal(cb_queue_create(rt, queue_name, &err), CB_OK);
  sender s[8];
  run_senders(rt, s, 0);
  int total = 0;
  for (int i = 0; i < 8; i++) {
    assert_int_equal(s[i].other, 0);
    total += s[i].sent;
  }
  assert_int_equal(total, 8000);
  cb_queue_metrics m;
  assert_int_equal(cb_queue_metrics_get(rt, queue_name, &m, &err), CB_OK);
  assert_int_equal(m.queue_length, 8000);
  assert_int_equal(cb_queue_drop(rt, queue_name, &existed, &err), CB_OK);
  cb_runtime_free(rt);
}

static void closing_while_eight_threads_send_fails_the_late_ones_cleanly(void **state) {
  snprintf(queue_name, sizeof queue_name, "%s", test_name("cb_test_closing"));
  cb_runtime *rt = test_runtime(4);
  cb_err err;
  assert_int_equal(cb_queue_create(rt, queue_name, &err), CB_OK);
  sender s[8];
  run_senders(rt, s, 1);
  int sent = 0, closed = 0;
  for (int i = 0; i < 8; i++) {
    assert_int_equal(s[i].other, 0); /* nothing but success or CLOSED */
    sent += s[i].sent;
    closed += s[i].closed;
  }
  assert_int_equal(sent + closed, 8000);
  assert_true(closed > 0);
  cb_runtime_free(rt);
  /* What was reported sent is really there. */
  rt = test_runtime(1);
  cb_queue_metrics m;
  assert_int_equal(cb_queue_metrics_get(rt, queue_name, &m, &err), CB_OK);
  assert_true(m.queue_length >= sent);
  int existed;
  cb_queue_drop(rt, queue_name, &existed, &err);
  cb_runtime_free(rt);
}

static void default_threads_come_from_configure_then_environment_then_cores(void **state) {
  cb_set_default_threads(0);
  setenv("COMMANDBUS_SYNC_THREADS", "7", 1);
  assert_int_equal(cb_default_threads(), 7);
  cb_set_default_threads(3);
  assert_int_equal(cb_default_threads(), 3);
  cb_set_default_threads(0);
  unsetenv("COMMANDBUS_SYNC_THREADS");
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  assert_int_equal(cb_default_threads(), cores < 32 ? cores : 32);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(a_unit_returns_rows_and_parameters_round_trip),
      cmocka_unit_test(an_error_rolls_back_the_whole_unit_and_reports_sqlstate),
      cmocka_unit_test(a_failed_prepare_spoils_only_its_own_statements),
      cmocka_unit_test(many_units_in_one_round_trip_are_each_atomic),
      cmocka_unit_test(a_blocking_call_on_the_loop_thread_fails_with_deadlock),
      cmocka_unit_test(an_unreachable_database_fails_with_connection_within_the_timeout),
      cmocka_unit_test(a_closed_runtime_refuses_work_with_closed),
      cmocka_unit_test(a_forked_child_gets_an_error_at_once_and_exits_cleanly),
      cmocka_unit_test(a_lost_connection_fails_in_flight_work_and_reconnects),
      cmocka_unit_test(work_whose_connection_died_before_it_was_sent_goes_out_on_a_fresh_one),
      cmocka_unit_test(eight_threads_sending_a_thousand_each_all_land),
      cmocka_unit_test(closing_while_eight_threads_send_fails_the_late_ones_cleanly),
      cmocka_unit_test(default_threads_come_from_configure_then_environment_then_cores),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
