/* Sends from concurrent callers share transactions (bus.c): while the
 * connection is busy, sends gather and leave as one transaction, each caller
 * getting its own answer; a send the server refuses fails only itself; ids
 * and dedup keys are told apart as if the sends came one by one; a caller
 * alone sends in a transaction of its own. */
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
#include "commandbus/queue.h"
#include "commandbus/schema.h"
#include "test_support.h"

#define CALLERS 8

typedef struct caller {
  cb_runtime *rt;
  const char *domain;
  const char *data; /* the command's data (JSON text) */
  const char *id;   /* NULL: a new one */
  const char *dedup_key;
  pthread_barrier_t *go;
  int rc;
  cb_err err;
  cb_send_result sent;
} caller;

static void *caller_main(void *p) {
  caller *c = p;
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  spec.data_json = c->data;
  spec.command_id = c->id;
  spec.dedup_key = c->dedup_key;
  spec.dedup_for = c->dedup_key ? 60 : 0;
  pthread_barrier_wait(c->go);
  c->rc = cb_bus_send(c->rt, c->domain, &spec, 1, 0, &c->sent, &c->err);
  return NULL;
}

static void *sleeper_main(void *p) {
  cb_runtime *rt = p;
  cb_unit *u = test_sql(rt, "SELECT pg_sleep(1)");
  cb_unit_free(u);
  return NULL;
}

static long long count_commands(cb_runtime *rt, const char *domain) {
  cb_unit *u = cb_unit_new();
  const char *params[] = {domain};
  cb_unit_add(u, "SELECT count(*) FROM commandbus.command WHERE domain = $1", 1, params);
  cb_err err;
  assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
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
  cb_unit_add(u, "DELETE FROM commandbus.dedup WHERE domain = $1", 1, params);
  cb_runtime_exec(rt, u, &err);
  cb_unit_free(u);
}

static void wait_for_units(cb_runtime *rt, uint64_t n) {
  while (cb_runtime_units_sent(rt) < n) usleep(1000);
}

/* One connection, busy for a second (a sleep); a send made meanwhile (the
 * opener) leaves at once, queued behind it; the sends made while it is on
 * its way gather, and leave in one transaction when it is back. In the
 * second round one of them carries data the server refuses: that
 * transaction is refused, and each of its sends is made again alone. */
static void concurrent_sends_share_a_transaction_and_a_refused_one_fails_alone(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("sendgroup"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result first;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &first, &err), CB_OK); /* makes the queue */

  for (int round = 0; round < 2; round++) {
    int with_bad = round == 1;
    pthread_barrier_t go, go_opener;
    pthread_barrier_init(&go, NULL, CALLERS + 1);
    pthread_barrier_init(&go_opener, NULL, 2);
    caller callers[CALLERS], opener = {.rt = rt, .domain = domain, .go = &go_opener, .rc = -99, .data = "{}"};
    pthread_t threads[CALLERS], sleeper, opener_thread;
    for (int i = 0; i < CALLERS; i++) {
      callers[i] = (caller){.rt = rt, .domain = domain, .go = &go, .rc = -99,
                            .data = with_bad && i == CALLERS / 2 ? "{\"n\": oops}" : "{\"n\": 1}"};
      pthread_create(&threads[i], NULL, caller_main, &callers[i]);
    }
    pthread_create(&opener_thread, NULL, caller_main, &opener);
    uint64_t units_before = cb_runtime_units_sent(rt);
    pthread_create(&sleeper, NULL, sleeper_main, rt);
    wait_for_units(rt, units_before + 1); /* the sleep is on the connection */
    pthread_barrier_wait(&go_opener);
    wait_for_units(rt, units_before + 2); /* the opener is on its way behind it */
    pthread_barrier_wait(&go);
    for (int i = 0; i < CALLERS; i++) pthread_join(threads[i], NULL);
    pthread_join(opener_thread, NULL);
    pthread_join(sleeper, NULL);
    uint64_t units = cb_runtime_units_sent(rt) - units_before;
    assert_int_equal(opener.rc, CB_OK);
    int ok = 0;
    for (int i = 0; i < CALLERS; i++) {
      if (with_bad && i == CALLERS / 2) {
        assert_int_equal(callers[i].rc, CB_EINVAL);
        assert_non_null(strstr(callers[i].err.message, "invalid command data"));
        continue;
      }
      assert_int_equal(callers[i].rc, CB_OK);
      assert_true(callers[i].sent.msg_id > 0);
      assert_false(callers[i].sent.duplicate);
      assert_true(callers[i].sent.msg_id != opener.sent.msg_id);
      for (int j = 0; j < i; j++) assert_true(callers[i].sent.msg_id != callers[j].sent.msg_id);
      ok++;
    }
    /* The sleep, the opener, one transaction for the rest; after a refusal,
     * one more for each send of it. */
    assert_int_equal(units, with_bad ? 3 + CALLERS : 3);
    assert_int_equal(count_commands(rt, domain), 1 + (1 + CALLERS) + (round == 1 ? 1 + ok : 0));
    pthread_barrier_destroy(&go);
    pthread_barrier_destroy(&go_opener);
  }
  drop(rt, domain);
  cb_runtime_free(rt);
}

/* Sends that share a transaction are told apart as sends made one after
 * the other would be: of two with one id, or one dedup key, the first one
 * is sent and the second is a duplicate naming it; the others are sent. */
static void sends_sharing_a_transaction_keep_ids_and_dedup_keys_apart(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("sendtwins"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result first;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &first, &err), CB_OK);
  const char *twin = "01234567-89ab-7def-8123-456789abcdef";
  pthread_barrier_t go, go_opener;
  pthread_barrier_init(&go, NULL, CALLERS + 1);
  pthread_barrier_init(&go_opener, NULL, 2);
  caller callers[CALLERS], opener = {.rt = rt, .domain = domain, .go = &go_opener, .rc = -99, .data = "{}"};
  pthread_t threads[CALLERS], sleeper, opener_thread;
  for (int i = 0; i < CALLERS; i++) {
    callers[i] = (caller){.rt = rt, .domain = domain, .go = &go, .rc = -99, .data = "{\"n\": 2}",
                          .id = i < 2 ? twin : NULL, .dedup_key = i == 2 || i == 3 ? "once" : NULL};
    pthread_create(&threads[i], NULL, caller_main, &callers[i]);
  }
  pthread_create(&opener_thread, NULL, caller_main, &opener);
  uint64_t units_before = cb_runtime_units_sent(rt);
  pthread_create(&sleeper, NULL, sleeper_main, rt);
  wait_for_units(rt, units_before + 1);
  pthread_barrier_wait(&go_opener);
  wait_for_units(rt, units_before + 2);
  pthread_barrier_wait(&go);
  for (int i = 0; i < CALLERS; i++) pthread_join(threads[i], NULL);
  pthread_join(opener_thread, NULL);
  pthread_join(sleeper, NULL);
  assert_int_equal(cb_runtime_units_sent(rt) - units_before, 3); /* the sleep, the opener, the rest together */
  assert_int_equal(opener.rc, CB_OK);
  /* Which of a pair came first is up to the threads: one of each is sent. */
  for (int pair = 0; pair < 4; pair += 2) {
    caller *a = &callers[pair], *b = &callers[pair + 1];
    assert_true((a->rc == CB_OK) != (b->rc == CB_OK));
    caller *sent = a->rc == CB_OK ? a : b, *refused = a->rc == CB_OK ? b : a;
    assert_int_equal(refused->rc, CB_EDUPLICATE);
    assert_true(refused->sent.duplicate);
    assert_string_equal(refused->sent.duplicate_of, sent->sent.command_id);
    assert_non_null(strstr(refused->err.message, pair == 0 ? "already exists" : "dedup key `once`"));
  }
  for (int i = 4; i < CALLERS; i++) assert_int_equal(callers[i].rc, CB_OK);
  assert_int_equal(count_commands(rt, domain), 1 + 1 + (CALLERS - 2));
  pthread_barrier_destroy(&go);
  pthread_barrier_destroy(&go_opener);
  drop(rt, domain);
  cb_runtime_free(rt);
}

/* A caller alone: one transaction per send. */
static void a_caller_alone_sends_in_a_transaction_of_its_own(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("sendalone"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result sent;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK);
  uint64_t before = cb_runtime_units_sent(rt);
  for (int i = 0; i < 5; i++) assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK);
  assert_int_equal(cb_runtime_units_sent(rt) - before, 5);
  /* A duplicate id is still its caller's answer. */
  spec.command_id = sent.command_id;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_EDUPLICATE);
  drop(rt, domain);
  cb_runtime_free(rt);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(concurrent_sends_share_a_transaction_and_a_refused_one_fails_alone),
      cmocka_unit_test(sends_sharing_a_transaction_keep_ids_and_dedup_keys_apart),
      cmocka_unit_test(a_caller_alone_sends_in_a_transaction_of_its_own),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
