/* A worker's background jobs from C: retention removes old finished commands
 * and counts them, a due schedule sends its command, and stopping the worker
 * waits for them. Clean under ASan, TSan and valgrind. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commandbus/bus.h"
#include "commandbus/metrics.h"
#include "commandbus/runner.h"
#include "commandbus/schedule.h"
#include "commandbus/schema.h"
#include "commandbus/worker.h"
#include "test_support.h"

typedef struct lane_arg {
  cb_worker *w;
  int handled;
} lane_arg;

static void *lane_main(void *p) {
  lane_arg *a = p;
  cb_work *work;
  for (;;) {
    int n = cb_worker_take(a->w, 0, &work, 1, 100);
    if (n < 0) break;
    if (n == 0) continue;
    cb_work_succeed(work, NULL);
    cb_worker_done(a->w, work);
    a->handled++;
  }
  return NULL;
}

static int64_t count(cb_runtime *rt, const char *sql, const char *domain) {
  cb_unit *u = cb_unit_new();
  const char *p[] = {domain};
  cb_unit_add(u, sql, 1, p);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
  int64_t n = cb_result_int(cb_unit_result(u, 0), 0, 0);
  cb_unit_free(u);
  return n;
}

static void background_jobs_remove_old_work_and_send_due_schedules(void **state) {
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], name[80], sql[512];
  snprintf(domain, sizeof domain, "%s", test_name("cupkeep"));
  snprintf(name, sizeof name, "%s_tick", domain);

  /* Fifty commands that finished eight days ago. */
  cb_command_spec specs[50];
  cb_send_result results[50];
  memset(specs, 0, sizeof specs);
  for (int i = 0; i < 50; i++) specs[i].command_type = "Old";
  assert_int_equal(cb_bus_send(rt, domain, specs, 50, 0, results, &err), CB_OK);
  snprintf(sql, sizeof sql, "DELETE FROM pgmq.q_%s__commands", domain);
  cb_unit_free(test_sql(rt, sql));
  snprintf(sql, sizeof sql,
           "UPDATE commandbus.command SET status = 'COMPLETED', updated_at = now() - interval '8 days'"
           " WHERE domain = '%s'",
           domain);
  cb_unit_free(test_sql(rt, sql));
  cb_schedule_spec s = {.name = name, .domain = domain, .command_type = "Tick", .every = 1};
  cb_unit *rows;
  assert_int_equal(cb_schedule_set(rt, &s, &rows, &err), CB_OK);
  cb_unit_free(rows);

  cb_worker_options o;
  cb_worker_options_init(&o);
  o.domain = domain;
  o.lanes = 1;
  o.poll_interval = 0.05;
  o.retention_interval = 0.1;
  cb_worker *w;
  assert_int_equal(cb_worker_new(rt, &o, &w, &err), CB_OK);
  lane_arg arg = {w, 0};
  pthread_t lane;
  pthread_create(&lane, NULL, lane_main, &arg);
  assert_int_equal(cb_engine_start(cb_worker_engine(w), &err), CB_OK);
  cb_worker_health h;
  for (int i = 0; i < 200; i++) {
    cb_worker_health_get(w, &h);
    if (h.upkeep.removed.commands == 50 && h.upkeep.scheduled >= 1 && arg.handled >= 1) break;
    usleep(50 * 1000);
  }
  cb_engine_stop(cb_worker_engine(w));
  assert_int_equal(cb_engine_wait(cb_worker_engine(w), 30000), 1);
  pthread_join(lane, NULL);
  cb_worker_health_get(w, &h);
  assert_int_equal(h.upkeep.removed.commands, 50);
  assert_int_equal(h.upkeep.removed.audit, 50); /* their SENT rows */
  assert_true(h.upkeep.retention_passes >= 1);
  assert_true(h.upkeep.scheduled >= 1);
  /* The metrics carry the counts, by kind. */
  cb_metrics m;
  assert_int_equal(cb_metrics_collect(rt, 0, &m, &err), CB_OK);
  char *text = cb_metrics_text(&m);
  assert_non_null(text);
  char line[256];
  snprintf(line, sizeof line, "commandbus_worker_retention_removed_total{domain=\"%s\",runner=\"", domain);
  const char *at = strstr(text, line);
  assert_non_null(at);
  assert_non_null(strstr(at, "\",kind=\"commands\"} 50\n"));
  free(text);
  cb_metrics_free(&m);
  cb_worker_free(w);
  /* So does its heartbeat row, written when it was removed. */
  cb_runner_stat *runners;
  size_t nrunners;
  assert_int_equal(cb_runner_list(rt, domain, &runners, &nrunners, &err), CB_OK);
  assert_int_equal(nrunners, 1);
  assert_int_equal(runners[0].removed[0], 50); /* commands */
  assert_int_equal(runners[0].removed[1], 50); /* audit */
  assert_true(runners[0].scheduled >= 1);
  free(runners);

  assert_int_equal(
      count(rt, "SELECT count(*) FROM commandbus.command WHERE domain = $1 AND command_type = 'Old'", domain), 0);
  assert_true(count(rt,
                    "SELECT count(*) FROM commandbus.command WHERE domain = $1 AND command_type = 'Tick'"
                    " AND status = 'COMPLETED'",
                    domain) >= 1);
  int existed;
  assert_int_equal(cb_schedule_remove(rt, name, &existed, &err), CB_OK);
  assert_true(existed);
  snprintf(sql, sizeof sql, "%s__commands", domain);
  cb_queue_drop(rt, sql, &existed, &err);
  cb_runtime_free(rt);
}

static void a_worker_stopped_at_once_stops_its_jobs_too(void **state) {
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  cb_worker_options o;
  cb_worker_options_init(&o);
  o.domain = test_name("cupstop");
  o.lanes = 1;
  for (int i = 0; i < 5; i++) {
    cb_worker *w;
    assert_int_equal(cb_worker_new(rt, &o, &w, &err), CB_OK);
    lane_arg arg = {w, 0};
    pthread_t lane;
    pthread_create(&lane, NULL, lane_main, &arg);
    assert_int_equal(cb_engine_start(cb_worker_engine(w), &err), CB_OK);
    cb_engine_stop(cb_worker_engine(w));
    assert_int_equal(cb_engine_wait(cb_worker_engine(w), 30000), 1);
    pthread_join(lane, NULL);
    cb_worker_free(w);
  }
  char queue[80];
  snprintf(queue, sizeof queue, "%s__commands", o.domain);
  int existed;
  cb_queue_drop(rt, queue, &existed, &err);
  cb_runtime_free(rt);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(background_jobs_remove_old_work_and_send_due_schedules),
      cmocka_unit_test(a_worker_stopped_at_once_stops_its_jobs_too),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
