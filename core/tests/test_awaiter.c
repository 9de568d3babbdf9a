/* Awaiting commands: the poll schedule, and sixteen waiters released
 * together by one completion (no lost wake-up). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "commandbus/awaiter.h"
#include "commandbus/bus.h"
#include "commandbus/schema.h"
#include "commandbus/worker.h"
#include "test_support.h"

static void the_poll_schedule_is_25_ms_doubling_capped_at_1_s(void **state) {
  const int expected[] = {25, 50, 100, 200, 400, 800, 1000, 1000};
  for (int i = 0; i < 8; i++) assert_int_equal(cb_await_backoff_ms(i), expected[i]);
  assert_int_equal(cb_await_backoff_ms(100), 1000);
}

typedef struct waiter_arg {
  cb_runtime *rt;
  const char *domain;
  const char *id;
  int rc;
  char status[32];
} waiter_arg;

static void *await_main(void *p) {
  waiter_arg *a = p;
  cb_unit *rows = NULL;
  cb_err err;
  a->rc = cb_await_command(a->rt, a->domain, a->id, 20, &rows, &err);
  if (a->rc == CB_OK)
    snprintf(a->status, sizeof a->status, "%s", cb_result_value(cb_unit_result(rows, cb_unit_count(rows) - 1), 0, 3));
  cb_unit_free(rows);
  return NULL;
}

static void *lane_main(void *p) {
  cb_worker *w = p;
  cb_work *work;
  int n;
  while ((n = cb_worker_take(w, 0, &work, 1, 100)) >= 0) {
    if (n == 0) continue;
    usleep(300 * 1000); /* the waiters are all waiting by now */
    cb_work_succeed(work, "{\"done\": true}");
    cb_worker_done(w, work);
  }
  return NULL;
}

static void sixteen_waiters_are_released_together_by_one_completion(void **state) {
  cb_runtime *rt = test_runtime(4);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("await16"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result sent;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK);

  waiter_arg args[16];
  pthread_t threads[16];
  for (int i = 0; i < 16; i++) {
    args[i] = (waiter_arg){rt, domain, sent.command_id, -99, ""};
    pthread_create(&threads[i], NULL, await_main, &args[i]);
  }
  cb_worker_options o;
  cb_worker_options_init(&o);
  o.domain = domain;
  o.lanes = 1;
  o.poll_interval = 0.05;
  cb_worker *w;
  assert_int_equal(cb_worker_new(rt, &o, &w, &err), CB_OK);
  pthread_t lane;
  pthread_create(&lane, NULL, lane_main, w);
  assert_int_equal(cb_worker_start(w, &err), CB_OK);
  for (int i = 0; i < 16; i++) {
    pthread_join(threads[i], NULL);
    assert_int_equal(args[i].rc, CB_OK);
    assert_string_equal(args[i].status, "COMPLETED");
  }
  cb_worker_stop(w);
  cb_worker_wait(w, -1);
  pthread_join(lane, NULL);
  cb_worker_free(w);
  char queue[80];
  snprintf(queue, sizeof queue, "%s__commands", domain);
  int existed;
  cb_queue_drop(rt, queue, &existed, &err);
  cb_runtime_free(rt);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(the_poll_schedule_is_25_ms_doubling_capped_at_1_s),
      cmocka_unit_test(sixteen_waiters_are_released_together_by_one_completion),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
