/* Sends from concurrent callers share transactions (bus.c): while a group
 * of sends is on its way (one at a time, whatever the pool size), sends
 * gather and leave as one transaction, each caller getting its own answer;
 * a send the server refuses fails only itself; ids and dedup keys are told
 * apart as if the sends came one by one; a caller alone sends in a
 * transaction of its own. */
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
#include <sys/wait.h>
#include <unistd.h>

#include "commandbus/bus.h"
#include "commandbus/queue.h"
#include "commandbus/schema.h"
#include "commandbus/uuid.h"
#include "test_support.h"

#define CALLERS 8
#define MANY 17 /* more commands than a send that joins a group has (bus.c's SHARE_MAX) */

typedef struct caller {
  cb_runtime *rt;
  const char *domain;
  const char *data; /* the command's data (JSON text) */
  const char *id;   /* NULL: a new one */
  const char *dedup_key;
  const cb_command_spec *spec; /* non-NULL: sends this rather than the fields above */
  int two;                     /* sends two commands in one call (not merged into the group's statement) */
  int many;                    /* sends MANY commands in one call (too many to join a group) */
  pthread_barrier_t *go;
  int rc;
  cb_err err;
  cb_send_result sent;
  cb_send_result second; /* the second command of `two` */
} caller;

static void *caller_main(void *p) {
  caller *c = p;
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  spec.data_json = c->data;
  spec.command_id = c->id;
  spec.dedup_key = c->dedup_key;
  spec.dedup_for = c->dedup_key ? 60 : 0;
  if (c->spec) spec = *c->spec;
  pthread_barrier_wait(c->go);
  if (c->many) {
    cb_command_spec specs[MANY];
    cb_send_result results[MANY];
    for (int i = 0; i < MANY; i++) specs[i] = spec;
    c->rc = cb_bus_send(c->rt, c->domain, specs, MANY, 0, results, &c->err);
    c->sent = results[0];
  } else if (c->two) {
    cb_command_spec specs[2] = {spec, spec};
    specs[1].command_id = NULL;
    cb_send_result results[2];
    c->rc = cb_bus_send(c->rt, c->domain, specs, 2, 0, results, &c->err);
    c->sent = results[0];
    c->second = results[1];
  } else {
    c->rc = cb_bus_send(c->rt, c->domain, &spec, 1, 0, &c->sent, &c->err);
  }
  return NULL;
}

/* Holds the domain's queue table (a lock its sends wait for) for a second,
 * on a pool connection of rt. */
typedef struct sleeper {
  cb_runtime *rt;
  const char *domain;
  int done; /* atomic: its transaction is over */
} sleeper;

static void *sleeper_main(void *p) {
  sleeper *s = p;
  char lock[160], sleep[160];
  snprintf(lock, sizeof lock, "LOCK TABLE pgmq.q_%s__commands IN SHARE MODE", s->domain);
  snprintf(sleep, sizeof sleep, "SELECT pg_sleep(1), '%s holds its queue'", s->domain);
  cb_unit *u = cb_unit_new();
  cb_unit_add_flags(u, "BEGIN", 0, NULL, CB_STMT_ONESHOT);
  cb_unit_add_flags(u, lock, 0, NULL, CB_STMT_ONESHOT);
  cb_unit_add_flags(u, sleep, 0, NULL, CB_STMT_ONESHOT);
  cb_unit_add_flags(u, "COMMIT", 0, NULL, CB_STMT_ONESHOT);
  cb_err err;
  if (cb_runtime_exec(s->rt, u, &err) != CB_OK) fprintf(stderr, "sleeper: %s\n", err.message);
  cb_unit_free(u);
  __atomic_store_n(&s->done, 1, __ATOMIC_RELEASE);
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

/* One number from a query with the domain as $1 and `id` (may be NULL) as $2. */
static long long count_of(cb_runtime *rt, const char *sql, const char *domain, const char *id) {
  cb_unit *u = cb_unit_new();
  const char *params[] = {domain, id};
  cb_unit_add(u, sql, id ? 2 : 1, params);
  cb_err err;
  int rc = cb_runtime_exec(rt, u, &err);
  if (rc != CB_OK) fprintf(stderr, "%s: %s\n", sql, err.message);
  assert_int_equal(rc, CB_OK);
  long long n = cb_result_int(cb_unit_result(u, 0), 0, 0);
  cb_unit_free(u);
  return n;
}

/* The rows of a sent command: the command (PENDING) with its message in the
 * queue under the msg_id its caller was told, and one SENT audit row. */
static void assert_sent(cb_runtime *rt, const char *domain, const cb_send_result *r) {
  char sql[512];
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM commandbus.command k JOIN pgmq.q_%s__commands q ON q.msg_id = k.msg_id"
           " WHERE k.domain = $1 AND k.command_id = $2::uuid AND k.status = 'PENDING' AND k.msg_id = %lld"
           " AND q.message->>'command_id' = $2::uuid::text",
           domain, (long long)r->msg_id);
  assert_int_equal(count_of(rt, sql, domain, r->command_id), 1);
  assert_int_equal(count_of(rt,
                            "SELECT count(*) FROM commandbus.audit WHERE domain = $1 AND command_id = $2::uuid"
                            " AND event_type = 'SENT'",
                            domain, r->command_id),
                   1);
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

/* Makes the sends of callers[0..n) share one transaction. The domain's
 * queue is held for a second (a lock and a sleep, on a pool connection); a
 * send made meanwhile (*opener) leaves at once and waits for the lock; the
 * callers, released together while it is on its way, gather and leave in
 * one transaction when it is back. Fills in
 * each caller's runtime, domain and barrier (the test sets what it sends);
 * returns the units the runtime sent meanwhile. */
#define MAX_CALLERS 16
static uint64_t send_together(cb_runtime *rt, const char *domain, caller *callers, int n, caller *opener) {
  assert_true(n <= MAX_CALLERS);
  pthread_barrier_t go, go_opener;
  pthread_barrier_init(&go, NULL, (unsigned)n + 1);
  pthread_barrier_init(&go_opener, NULL, 2);
  *opener = (caller){.rt = rt, .domain = domain, .go = &go_opener, .rc = -99, .data = "{}"};
  pthread_t threads[MAX_CALLERS], sleeper_thread, opener_thread;
  for (int i = 0; i < n; i++) {
    callers[i].rt = rt;
    callers[i].domain = domain;
    callers[i].go = &go;
    callers[i].rc = -99;
    pthread_create(&threads[i], NULL, caller_main, &callers[i]);
  }
  pthread_create(&opener_thread, NULL, caller_main, opener);
  uint64_t units_before = cb_runtime_units_sent(rt);
  sleeper s = {rt, domain, 0};
  pthread_create(&sleeper_thread, NULL, sleeper_main, &s);
  wait_for_units(rt, units_before + 1);
  cb_runtime *watcher = test_runtime(1);
  int held = 0; /* the lock is held: seen sleeping; the sleeper's end ends the wait too */
  while (!held && !__atomic_load_n(&s.done, __ATOMIC_ACQUIRE)) {
    held = count_of(watcher,
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                    " AND strpos(query, $1 || ' holds its queue') > 0",
                    domain, NULL) > 0;
    if (!held) usleep(1000);
  }
  cb_runtime_free(watcher);
  if (!held)
    fprintf(stderr, "send_together: the queue's second-long lock ended before it was seen (a loaded machine)\n");
  assert_true(held);
  pthread_barrier_wait(&go_opener);
  wait_for_units(rt, units_before + 2); /* the opener is on its way, waiting for the lock */
  pthread_barrier_wait(&go);
  for (int i = 0; i < n; i++) pthread_join(threads[i], NULL);
  pthread_join(opener_thread, NULL);
  pthread_join(sleeper_thread, NULL);
  pthread_barrier_destroy(&go);
  pthread_barrier_destroy(&go_opener);
  return cb_runtime_units_sent(rt) - units_before;
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
    caller callers[CALLERS], opener;
    for (int i = 0; i < CALLERS; i++)
      callers[i] = (caller){.data = with_bad && i == CALLERS / 2 ? "{\"n\": oops}" : "{\"n\": 1}"};
    uint64_t units = send_together(rt, domain, callers, CALLERS, &opener);
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
  caller callers[CALLERS], opener;
  for (int i = 0; i < CALLERS; i++)
    callers[i] = (caller){
        .data = "{\"n\": 2}", .id = i < 2 ? twin : NULL, .dedup_key = i == 2 || i == 3 ? "once" : NULL};
  /* The sleep, the opener, the rest together. */
  assert_int_equal(send_together(rt, domain, callers, CALLERS, &opener), 3);
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
  drop(rt, domain);
  cb_runtime_free(rt);
}

/* Duplicates and a refusal in one shared transaction: an id that exists
 * already, a dedup key another command holds from before, two sends with one
 * new dedup key, two with one new id, a call of two commands (its own
 * statements in the group), a plain send, and a send whose data the server
 * refuses. The refusal undoes the shared transaction; each send is then made
 * alone, and each caller gets the answer it would have had alone: nothing is
 * lost, nothing is written twice, and the dedup key goes to the one sent. */
static void a_refused_send_among_duplicates_fails_alone_and_the_others_keep_their_answers(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("sendmixed"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result existing, holder;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &existing, &err), CB_OK);
  spec.dedup_key = "held";
  spec.dedup_for = 60;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &holder, &err), CB_OK);
  const char *twin = "01234567-89ab-7def-8123-456789abcd01";
  enum { OLD_ID, HELD_KEY, PAIR_A, PAIR_B, TWIN_A, TWIN_B, TWO, BAD, PLAIN, MIXED };
  caller callers[MIXED], opener;
  for (int i = 0; i < MIXED; i++) {
    callers[i] = (caller){.data = "{\"n\": 3}"};
    caller *c = &callers[i];
    if (i == OLD_ID) c->id = existing.command_id;
    if (i == HELD_KEY) c->dedup_key = "held";
    if (i == PAIR_A || i == PAIR_B) c->dedup_key = "pair";
    if (i == TWIN_A || i == TWIN_B) c->id = twin;
    if (i == TWO) c->two = 1;
    if (i == BAD) c->data = "{\"n\": oops}";
  }
  uint64_t units = send_together(rt, domain, callers, MIXED, &opener);
  /* The sleep, the opener, the shared transaction refused, each send alone. */
  assert_int_equal(units, 3 + MIXED);
  assert_int_equal(opener.rc, CB_OK);
  assert_int_equal(callers[BAD].rc, CB_EINVAL);
  assert_non_null(strstr(callers[BAD].err.message, "invalid command data"));
  assert_int_equal(callers[OLD_ID].rc, CB_EDUPLICATE);
  assert_string_equal(callers[OLD_ID].sent.duplicate_of, existing.command_id);
  assert_int_equal(callers[HELD_KEY].rc, CB_EDUPLICATE);
  assert_string_equal(callers[HELD_KEY].sent.duplicate_of, holder.command_id);
  assert_non_null(strstr(callers[HELD_KEY].err.message, "dedup key `held`"));
  caller *sent_pair = NULL, *sent_twin = NULL;
  for (int pair = PAIR_A; pair <= TWIN_A; pair += 2) {
    caller *a = &callers[pair], *b = &callers[pair + 1];
    assert_true((a->rc == CB_OK) != (b->rc == CB_OK));
    caller *sent = a->rc == CB_OK ? a : b, *refused = a->rc == CB_OK ? b : a;
    assert_int_equal(refused->rc, CB_EDUPLICATE);
    assert_string_equal(refused->sent.duplicate_of, sent->sent.command_id);
    if (pair == PAIR_A) sent_pair = sent;
    else sent_twin = sent;
  }
  assert_int_equal(callers[TWO].rc, CB_OK);
  assert_int_equal(callers[PLAIN].rc, CB_OK);
  /* What each caller was told is what the database holds. */
  assert_sent(rt, domain, &opener.sent);
  assert_sent(rt, domain, &sent_pair->sent);
  assert_sent(rt, domain, &sent_twin->sent);
  assert_sent(rt, domain, &callers[TWO].sent);
  assert_sent(rt, domain, &callers[TWO].second);
  assert_sent(rt, domain, &callers[PLAIN].sent);
  /* Before: 2; now the opener, a pair's, a twin's, two, plain. */
  assert_int_equal(count_commands(rt, domain), 2 + 6);
  char sql[256];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM pgmq.q_%s__commands WHERE message->>'domain' = $1", domain);
  assert_int_equal(count_of(rt, sql, domain, NULL), 2 + 6);
  assert_int_equal(
      count_of(rt, "SELECT count(*) FROM commandbus.audit WHERE domain = $1 AND event_type = 'SENT'", domain, NULL),
      2 + 6);
  assert_int_equal(count_of(rt,
                            "SELECT count(*) FROM commandbus.dedup WHERE domain = $1 AND dedup_key = 'pair'"
                            " AND command_id = $2::uuid",
                            domain, sent_pair->sent.command_id),
                   1);
  assert_int_equal(count_of(rt,
                            "SELECT count(*) FROM commandbus.dedup WHERE domain = $1 AND dedup_key = 'held'"
                            " AND command_id = $2::uuid",
                            domain, holder.command_id),
                   1);
  drop(rt, domain);
  cb_runtime_free(rt);
}

/* A caller alone: one transaction per send. */
/* A send's rows are the same whichever statement writes them: a group's
 * (the merged single sends' array, each element carrying the message its
 * caller made), a send of several commands (the same statement), or a
 * lone send's (of parameters, the message built by the server). Every
 * command column a send sets, every key and value of the queue message
 * (reply_to and priority only when set) and of the SENT audit row's
 * details are compared, sent each way with the same correlation id: only
 * the ids (command_id, msg_id) differ, and those match the command row's.
 * Data that is more than one JSON value as far as its commas go (a lone
 * send refuses it) is read by the others as the statement reads it, its
 * first value, and adds no key to the message. */
static void a_groups_rows_are_those_of_lone_sends(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], replies[80];
  snprintf(domain, sizeof domain, "%s", test_name("sendsame"));
  snprintf(replies, sizeof replies, "%s_replies", domain);
  enum { KINDS = 6, LONE = 5 }; /* the last kind, odd data, is not sent alone */
  char corr[KINDS][CB_UUID_LEN + 1], batch[CB_UUID_LEN + 1];
  for (int k = 0; k < KINDS; k++) cb_uuid_v7(corr[k]);
  cb_uuid_v7(batch);
  cb_command_spec specs[KINDS] = {
      {.command_type = "Plain", .data_json = "{\"n\": 1, \"s\": \"a \\\"quoted\\\" \\u00e9\", \"f\": 1.50}"},
      {.command_type = "Ask",
       .data_json = "[1, 2, {\"x\": null}]",
       .reply_to = replies,
       .priority = 7,
       .batch_id = batch},
      {.command_type = "NoData", .max_attempts = 5},
      {.command_type = "Low \"quoted\" type", .data_json = "\"text\"", .priority = -3, .reply_to = replies},
      {.command_type = "Empty", .data_json = "{}", .reply_to = ""},
      {.command_type = "Odd", .data_json = "1, \"priority\": 5, \"reply_to\": \"x\""},
  };
  for (int k = 0; k < KINDS; k++) specs[k].correlation_id = corr[k];

  /* Lone sends: each in a transaction of its own, one at a time. */
  char lone[LONE * (CB_UUID_LEN + 1) + 3] = "{";
  for (int k = 0; k < LONE; k++) {
    cb_send_result r;
    assert_int_equal(cb_bus_send(rt, domain, &specs[k], 1, 0, &r, &err), CB_OK);
    if (k) strcat(lone, ",");
    strcat(lone, r.command_id);
  }
  strcat(lone, "}");
  /* One send of all of them. */
  cb_send_result results[KINDS];
  assert_int_equal(cb_bus_send(rt, domain, specs, KINDS, 0, results, &err), CB_OK);
  /* Their single sends from concurrent callers, merged into a group. */
  caller callers[KINDS], opener;
  for (int k = 0; k < KINDS; k++) callers[k] = (caller){.spec = &specs[k]};
  assert_int_equal(send_together(rt, domain, callers, KINDS, &opener), 3); /* the sleep, the opener, the group */
  assert_int_equal(opener.rc, CB_OK);
  for (int k = 0; k < KINDS; k++) {
    assert_int_equal(callers[k].rc, CB_OK);
    assert_sent(rt, domain, &callers[k].sent);
    assert_sent(rt, domain, &results[k]);
  }

  char sql[2048];
  snprintf(
      sql, sizeof sql,
      "WITH rows AS (SELECT k.*, q.message, a.details_json FROM commandbus.command k"
      " JOIN pgmq.q_%s__commands q ON q.msg_id = k.msg_id"
      " JOIN commandbus.audit a ON a.domain = k.domain AND a.command_id = k.command_id AND a.event_type = 'SENT'"
      " WHERE k.domain = $1)"
      " SELECT count(*) FROM rows x JOIN rows l ON l.command_id = ANY ($2::uuid[])"
      " AND l.correlation_id = x.correlation_id"
      " WHERE x.queue_name = l.queue_name AND x.command_type = l.command_type AND x.status = 'PENDING'"
      " AND l.status = 'PENDING' AND x.attempts = 0 AND l.attempts = 0 AND x.max_attempts = l.max_attempts"
      " AND x.reply_queue = l.reply_queue AND x.batch_id IS NOT DISTINCT FROM l.batch_id"
      " AND x.message - 'command_id' = l.message - 'command_id' AND x.message->>'command_id' = x.command_id::text"
      " AND x.details_json - 'msg_id' = l.details_json - 'msg_id' AND x.details_json->'msg_id' = to_jsonb(x.msg_id)",
      domain);
  assert_int_equal(count_of(rt, sql, domain, lone), 3 * LONE);
  /* What a lone send writes (the reference above), spelled out for one. */
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM commandbus.command k JOIN pgmq.q_%s__commands q ON q.msg_id = k.msg_id"
           " JOIN commandbus.audit a ON a.domain = k.domain AND a.command_id = k.command_id AND a.event_type = 'SENT'"
           " WHERE k.domain = $1 AND k.command_type = 'Ask' AND k.max_attempts = 3 AND k.reply_queue = $1 || '_replies'"
           " AND q.message = jsonb_build_object('domain', $1, 'command_type', 'Ask', 'command_id', k.command_id,"
           " 'correlation_id', k.correlation_id, 'data', '[1, 2, {\"x\": null}]'::jsonb, 'reply_to', $1 || '_replies',"
           " 'priority', 7)"
           " AND a.details_json = jsonb_build_object('command_type', 'Ask', 'correlation_id', k.correlation_id,"
           " 'reply_to', $1 || '_replies', 'msg_id', k.msg_id, 'batch_id', k.batch_id) AND k.batch_id IS NOT NULL",
           domain);
  assert_int_equal(count_of(rt, sql, domain, NULL), 3);
  /* The odd data, sent twice (by the group and with the others). */
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM commandbus.command k JOIN pgmq.q_%s__commands q ON q.msg_id = k.msg_id"
           " JOIN commandbus.audit a ON a.domain = k.domain AND a.command_id = k.command_id AND a.event_type = 'SENT'"
           " WHERE k.domain = $1 AND k.command_type = 'Odd' AND k.reply_queue = ''"
           " AND q.message = jsonb_build_object('domain', $1, 'command_type', 'Odd', 'command_id', k.command_id,"
           " 'correlation_id', k.correlation_id, 'data', 1)"
           " AND a.details_json = jsonb_build_object('command_type', 'Odd', 'correlation_id', k.correlation_id,"
           " 'reply_to', NULL, 'msg_id', k.msg_id, 'batch_id', NULL)",
           domain);
  assert_int_equal(count_of(rt, sql, domain, NULL), 2);
  drop(rt, domain);
  char queue[96];
  int existed;
  snprintf(queue, sizeof queue, "%s", replies);
  cb_queue_drop(rt, queue, &existed, &err);
  cb_runtime_free(rt);
}

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

static void *busy_main(void *p) {
  sleeper *s = p;
  char sleep[160];
  snprintf(sleep, sizeof sleep, "SELECT pg_sleep(2), '%s keeps the pool busy'", s->domain);
  cb_unit *u = test_sql(s->rt, sleep);
  cb_unit_free(u);
  __atomic_store_n(&s->done, 1, __ATOMIC_RELEASE);
  return NULL;
}

/* A caller alone sends from its own thread, on the runtime's send
 * connection: it does not wait behind the work the pool has in hand (here
 * the pool's one connection sleeps for two seconds), and its rows are
 * there once it returns. */
static void a_lone_send_does_not_wait_behind_the_pools_work(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(1), *watcher = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("sendbeside"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result sent;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK); /* makes the queue */
  sleeper s = {rt, domain, 0};
  pthread_t busy;
  pthread_create(&busy, NULL, busy_main, &s);
  const char *sleeping =
      "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
      " AND strpos(query, $1 || ' keeps the pool busy') > 0";
  int seen = 0; /* the sleep, or its end (then the test cannot tell, and fails) */
  while (!(seen = count_of(watcher, sleeping, domain, NULL) > 0) && !__atomic_load_n(&s.done, __ATOMIC_ACQUIRE))
    usleep(1000);
  assert_true(seen);
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK);
  assert_int_equal(count_of(watcher, sleeping, domain, NULL), 1); /* the pool is still busy */
  assert_sent(watcher, domain, &sent);
  pthread_join(busy, NULL);
  drop(rt, domain);
  cb_runtime_free(watcher);
  cb_runtime_free(rt);
}

/* The send connection ended by the server while idle (a terminated
 * backend): the next send finds it gone before writing anything, makes a
 * new one and is sent, once; close() ends the new one. */
static void a_send_after_its_connection_ended_makes_a_new_one(void **state) {
  (void)state;
  char app[64];
  snprintf(app, sizeof app, "%s", test_name("sendconn"));
  cb_runtime_options o = {0};
  o.conninfo = test_dsn();
  o.application_name = app;
  cb_runtime *rt, *watcher = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_runtime_new(&o, &rt, &err), CB_OK);
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("sendconn"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result sent;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK);
  assert_int_equal(count_of(watcher,
                            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                            " WHERE application_name = $1 || ':send'",
                            app, NULL),
                   1);
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK);
  assert_sent(watcher, domain, &sent);
  assert_int_equal(count_commands(watcher, domain), 2);
  const char *sending = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 || ':send'";
  assert_int_equal(count_of(watcher, sending, app, NULL), 1);
  drop(rt, domain);
  cb_runtime_close(rt);
  while (count_of(watcher, sending, app, NULL) != 0) usleep(10000); /* gone once the server has seen it go */
  cb_runtime_free(rt);
  cb_runtime_free(watcher);
}

/* Whether the listener hears a notification within `ms` milliseconds; what
 * came is consumed. *marker (may be NULL) is set when one of them carried
 * the payload "end". */
static int heard_marked(PGconn *listener, int ms, int *marker) {
  for (int waited = 0;; waited += 20) {
    int got = 0;
    PQconsumeInput(listener);
    for (PGnotify *n; (n = PQnotifies(listener)) != NULL; PQfreemem(n)) {
      if (marker && strcmp(n->extra, "end") == 0) *marker = 1;
      else got = 1;
    }
    if (got || (marker && *marker) || waited >= ms) return got;
    struct pollfd fd = {PQsocket(listener), POLLIN, 0};
    poll(&fd, 1, 20);
  }
}

static int heard(PGconn *listener, int ms) { return heard_marked(listener, ms, NULL); }

static long long pq_number(PGconn *pg, const char *sql) {
  PGresult *r = PQexec(pg, sql);
  assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
  long long n = atoll(PQgetvalue(r, 0, 0));
  PQclear(r);
  return n;
}

static void pq_ok(PGconn *pg, const char *sql) {
  PGresult *r = PQexec(pg, sql);
  assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
  PQclear(r);
}

/* A send's wake-up (its queue's notify, which workers wait on between
 * polls) comes once its rows are there to read, never before: while the
 * queue's table is locked, so that the sends' inserts wait, a listener on
 * the queue's channel hears nothing; the first notification after the lock
 * is released finds commands of those sends committed; and every send is
 * followed by one. A send alone, then concurrent sends sharing
 * transactions. With notify_after_commit (after), the same, the notify in
 * a transaction of its own after the rows': a send alone is two. */
static void wake_up_once_rows_are_there(int after) {
  cb_runtime_options o = {0};
  o.conninfo = test_dsn();
  o.pool_size = 2;
  o.notify_after_commit = after;
  cb_runtime *rt = NULL, *watcher = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_runtime_new(&o, &rt, &err), CB_OK);
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], sql[256];
  snprintf(domain, sizeof domain, "%s", test_name("sendwake"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result first;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &first, &err), CB_OK); /* makes the queue */
  PGconn *listener = PQconnectdb(test_dsn()), *locker = PQconnectdb(test_dsn());
  assert_int_equal(PQstatus(listener), CONNECTION_OK);
  assert_int_equal(PQstatus(locker), CONNECTION_OK);
  snprintf(sql, sizeof sql, "LISTEN pgmq_notify_%s__commands", domain);
  pq_ok(listener, sql);
  heard(listener, 0);
  char count_sql[160];
  snprintf(count_sql, sizeof count_sql, "SELECT count(*) FROM commandbus.command WHERE domain = '%s'", domain);

  long long sent = 1;
  for (int round = 0; round < 2; round++) {
    int n = round == 0 ? 1 : CALLERS;
    pq_ok(locker, "BEGIN");
    snprintf(sql, sizeof sql, "LOCK TABLE pgmq.q_%s__commands IN SHARE MODE", domain);
    pq_ok(locker, sql);
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, (unsigned)n + 1);
    caller callers[CALLERS];
    pthread_t threads[CALLERS];
    uint64_t units = cb_runtime_units_sent(rt);
    for (int i = 0; i < n; i++) {
      callers[i] = (caller){.rt = rt, .domain = domain, .go = &go, .rc = -99, .data = "{}"};
      pthread_create(&threads[i], NULL, caller_main, &callers[i]);
    }
    pthread_barrier_wait(&go);
    const char *waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND strpos(query, 'q_' || $1 || '__commands') > 0";
    while (count_of(watcher, waiting, domain, NULL) == 0) usleep(1000); /* a send waits for the table */
    assert_false(heard(listener, 300));                                 /* nothing committed, nothing heard */
    pq_ok(locker, "COMMIT");
    assert_true(heard(listener, 30000));
    long long seen = pq_number(listener, count_sql);
    assert_true(seen > sent); /* the rows of what woke it are there */
    for (int i = 0; i < n; i++) {
      pthread_join(threads[i], NULL);
      assert_int_equal(callers[i].rc, CB_OK);
    }
    pthread_barrier_destroy(&go);
    if (round == 0) assert_int_equal(cb_runtime_units_sent(rt) - units, after ? 2 : 1);
    sent += n;
    /* Each commit is followed by a wake-up: what the listener reads after
     * the last one it hears is everything sent. Notifications arrive in
     * the order of their transactions' commits, so once a marker notified
     * after every send has returned is heard, none of theirs is still to
     * come. */
    snprintf(sql, sizeof sql, "NOTIFY pgmq_notify_%s__commands, 'end'", domain);
    pq_ok(locker, sql);
    int marker = 0;
    for (int tries = 0; !marker; tries++) {
      assert_true(tries < 100);
      if (heard_marked(listener, 300, &marker)) seen = pq_number(listener, count_sql);
    }
    assert_int_equal(seen, sent);
  }
  PQfinish(locker);
  PQfinish(listener);
  drop(rt, domain);
  cb_runtime_free(watcher);
  cb_runtime_free(rt);
}

static void a_sends_wake_up_comes_once_its_rows_are_there(void **state) {
  (void)state;
  wake_up_once_rows_are_there(0);
}

static void with_notify_after_commit_the_wake_up_follows_in_a_transaction_of_its_own(void **state) {
  (void)state;
  wake_up_once_rows_are_there(1);
}

/* A single command's send is one statement, which also raises its queue's
 * notification (a statement and a result less a send, for the server and
 * the client): with an id the send makes, with one its caller gives, and
 * for a duplicate id (not sent; notified as before). The listener hears
 * each, and the rows are there. */
static void a_single_send_is_one_statement_that_also_wakes_the_queue(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64], sql[256];
  snprintf(domain, sizeof domain, "%s", test_name("sendone"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result sent;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &sent, &err), CB_OK); /* makes the queue */
  PGconn *listener = PQconnectdb(test_dsn());
  assert_int_equal(PQstatus(listener), CONNECTION_OK);
  snprintf(sql, sizeof sql, "LISTEN pgmq_notify_%s__commands", domain);
  pq_ok(listener, sql);
  heard(listener, 0);
  char given[CB_UUID_LEN + 1];
  cb_uuid_v7(given);
  for (int round = 0; round < 3; round++) {
    spec.command_id = round == 0 ? NULL : given; /* made, given, given again */
    cb_unit *u = cb_unit_new();
    assert_int_equal(cb_bus_add_send(rt, u, domain, &spec, 1, 0, &sent, NULL, &err), CB_OK);
    assert_int_equal(cb_unit_count(u), 1);
    assert_int_equal(cb_runtime_exec(rt, u, &err), CB_OK);
    cb_bus_read_send(u, 0, 1, &sent);
    assert_int_equal(sent.duplicate, round == 2);
    assert_true(round == 2 || sent.msg_id > 0);
    assert_true(heard(listener, 30000));
    cb_unit_free(u);
  }
  snprintf(sql, sizeof sql, "SELECT count(*) FROM pgmq.q_%s__commands", domain);
  assert_int_equal(pq_number(listener, sql), 3);
  PQfinish(listener);
  drop(rt, domain);
  cb_runtime_free(rt);
}

/* Holds a command's id for a second: sends it, then sleeps, in one
 * transaction. A send of that id meanwhile waits until it commits. */
typedef struct holder {
  cb_runtime *rt;
  const char *domain;
  const char *id;
  int rc;
} holder;

static void *holder_main(void *p) {
  holder *h = p;
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  spec.command_id = h->id;
  cb_send_result sent;
  cb_err err;
  cb_unit *u = cb_unit_new();
  h->rc = cb_bus_add_send(h->rt, u, h->domain, &spec, 1, 0, &sent, NULL, &err);
  char sleep[96]; /* names the id, so that the test can see it is held */
  snprintf(sleep, sizeof sleep, "SELECT pg_sleep(1), '%s'", h->id);
  if (h->rc == CB_OK) cb_unit_add_flags(u, sleep, 0, NULL, CB_STMT_ONESHOT);
  if (h->rc == CB_OK) h->rc = cb_runtime_exec(h->rt, u, &err);
  cb_unit_free(u);
  return NULL;
}

/* One group of sends on its way at a time, however many connections the
 * pool has: with two, one busy (a transaction holding an id) and the other
 * carrying a send (the opener, which waits for that id), the sends made
 * meanwhile do not take the idle connection one by one; they gather and
 * leave in one transaction when the opener is back. In the second round one
 * caller sends MANY commands in one call: too many to join a group, it
 * leaves at once, alone. */
static void one_group_of_sends_is_on_its_way_at_a_time(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2), *watcher = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("sendonce"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result first;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &first, &err), CB_OK); /* makes the queue */

  for (int round = 0; round < 2; round++) {
    char held[CB_UUID_LEN + 1];
    cb_uuid_v7(held);
    holder h = {.rt = rt, .domain = domain, .id = held, .rc = -99};
    pthread_barrier_t go, go_opener;
    pthread_barrier_init(&go, NULL, CALLERS + 1);
    pthread_barrier_init(&go_opener, NULL, 2);
    caller callers[CALLERS];
    caller opener = {.rt = rt, .domain = domain, .go = &go_opener, .rc = -99, .data = "{}", .id = held};
    pthread_t threads[CALLERS], holder_thread, opener_thread;
    for (int i = 0; i < CALLERS; i++) {
      callers[i] = (caller){.rt = rt, .domain = domain, .go = &go, .rc = -99, .data = "{}"};
      callers[i].many = round == 1 && i == 0;
      pthread_create(&threads[i], NULL, caller_main, &callers[i]);
    }
    pthread_create(&opener_thread, NULL, caller_main, &opener);
    uint64_t before = cb_runtime_units_sent(rt);
    pthread_create(&holder_thread, NULL, holder_main, &h);
    wait_for_units(rt, before + 1);
    while (count_of(watcher,
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                    " AND strpos(query, $1) > 0",
                    held, NULL) == 0)
      usleep(1000); /* until the id is held, on one connection */
    pthread_barrier_wait(&go_opener);
    wait_for_units(rt, before + 2); /* the opener is on the other, waiting for the id */
    pthread_barrier_wait(&go);
    for (int i = 0; i < CALLERS; i++) pthread_join(threads[i], NULL);
    pthread_join(opener_thread, NULL);
    pthread_join(holder_thread, NULL);
    pthread_barrier_destroy(&go);
    pthread_barrier_destroy(&go_opener);
    uint64_t units = cb_runtime_units_sent(rt) - before;

    assert_int_equal(h.rc, CB_OK);
    assert_int_equal(opener.rc, CB_EDUPLICATE); /* the holder's id, once it committed */
    for (int i = 0; i < CALLERS; i++) {
      assert_int_equal(callers[i].rc, CB_OK);
      assert_sent(rt, domain, &callers[i].sent);
    }
    /* The holder, the opener, one transaction for the callers; in the
     * second round one more, the call of MANY alone. */
    assert_int_equal(units, round == 0 ? 3 : 4);
  }
  assert_int_equal(count_commands(rt, domain), 1 + 2 * (1 + CALLERS) + MANY - 1);
  drop(rt, domain);
  cb_runtime_free(watcher);
  cb_runtime_free(rt);
}

/* A group of sends that stalls (here the opener, waiting for an id another
 * process's open transaction holds) does not hold back the sends behind it
 * for long: once it has been out for bus.c's STALL_MS, the next group leaves
 * on the pool's other connection, and a fresh send completes while the id
 * is still held. */
static void a_stalled_group_does_not_hold_back_the_next(void **state) {
  (void)state;
  cb_runtime *rt = test_runtime(2), *elsewhere = test_runtime(1), *watcher = test_runtime(1);
  cb_err err;
  assert_int_equal(cb_schema_setup(rt, NULL, &err), CB_OK);
  char domain[64];
  snprintf(domain, sizeof domain, "%s", test_name("sendstall"));
  cb_command_spec spec = {0};
  spec.command_type = "Work";
  cb_send_result first;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &first, &err), CB_OK); /* makes the queue */

  char held[CB_UUID_LEN + 1];
  cb_uuid_v7(held);
  holder h = {.rt = elsewhere, .domain = domain, .id = held, .rc = -99};
  pthread_t holder_thread, opener_thread;
  pthread_create(&holder_thread, NULL, holder_main, &h);
  while (count_of(watcher,
                  "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND strpos(query, $1) > 0", held,
                  NULL) == 0)
    usleep(1000); /* until the id is held */
  pthread_barrier_t go_opener;
  pthread_barrier_init(&go_opener, NULL, 2);
  caller opener = {.rt = rt, .domain = domain, .go = &go_opener, .rc = -99, .data = "{}", .id = held};
  uint64_t before = cb_runtime_units_sent(rt);
  pthread_create(&opener_thread, NULL, caller_main, &opener);
  pthread_barrier_wait(&go_opener);
  wait_for_units(rt, before + 1); /* the opener's group is out, waiting for the id */

  cb_send_result fresh;
  assert_int_equal(cb_bus_send(rt, domain, &spec, 1, 0, &fresh, &err), CB_OK);
  /* Sent and committed while the id is still held (the holder sleeps 1 s). */
  assert_int_equal(
      count_of(watcher, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND strpos(query, $1) > 0",
               held, NULL),
      1);
  assert_sent(rt, domain, &fresh);

  pthread_join(opener_thread, NULL);
  pthread_join(holder_thread, NULL);
  pthread_barrier_destroy(&go_opener);
  assert_int_equal(h.rc, CB_OK);
  assert_int_equal(opener.rc, CB_EDUPLICATE);
  drop(rt, domain);
  cb_runtime_free(watcher);
  cb_runtime_free(elsewhere);
  cb_runtime_free(rt);
}

/* Ids draw their random bits from a pool (uuid.c): a forked child must not
 * hand out the bits its parent has left in it. Parent and child each make
 * ids at once after the fork; no two share their random part. */
#define FORK_IDS 200
static void ids_made_after_a_fork_differ_from_the_parents(void **state) {
  (void)state;
  char id[CB_UUID_LEN + 1];
  cb_uuid_v7(id); /* the pool is filled, most of it unused */
  int fds[2];
  assert_int_equal(pipe(fds), 0);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    close(fds[0]);
    for (int i = 0; i < FORK_IDS; i++) {
      cb_uuid_v7(id);
      if (write(fds[1], id, CB_UUID_LEN) != CB_UUID_LEN) _exit(1);
    }
    _exit(0);
  }
  close(fds[1]);
  static char mine[FORK_IDS][CB_UUID_LEN + 1], theirs[FORK_IDS][CB_UUID_LEN + 1];
  for (int i = 0; i < FORK_IDS; i++) cb_uuid_v7(mine[i]);
  for (int i = 0; i < FORK_IDS; i++) {
    size_t got = 0;
    while (got < CB_UUID_LEN) {
      ssize_t n = read(fds[0], theirs[i] + got, CB_UUID_LEN - got);
      assert_true(n > 0);
      got += (size_t)n;
    }
    theirs[i][CB_UUID_LEN] = '\0';
  }
  close(fds[0]);
  int status;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  /* The last 12 hex digits are random bits only. */
  for (int i = 0; i < FORK_IDS; i++)
    for (int j = 0; j < FORK_IDS; j++) assert_string_not_equal(mine[i] + 24, theirs[j] + 24);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(concurrent_sends_share_a_transaction_and_a_refused_one_fails_alone),
      cmocka_unit_test(sends_sharing_a_transaction_keep_ids_and_dedup_keys_apart),
      cmocka_unit_test(a_refused_send_among_duplicates_fails_alone_and_the_others_keep_their_answers),
      cmocka_unit_test(a_groups_rows_are_those_of_lone_sends),
      cmocka_unit_test(a_caller_alone_sends_in_a_transaction_of_its_own),
      cmocka_unit_test(a_lone_send_does_not_wait_behind_the_pools_work),
      cmocka_unit_test(a_send_after_its_connection_ended_makes_a_new_one),
      cmocka_unit_test(a_sends_wake_up_comes_once_its_rows_are_there),
      cmocka_unit_test(with_notify_after_commit_the_wake_up_follows_in_a_transaction_of_its_own),
      cmocka_unit_test(a_single_send_is_one_statement_that_also_wakes_the_queue),
      cmocka_unit_test(one_group_of_sends_is_on_its_way_at_a_time),
      cmocka_unit_test(a_stalled_group_does_not_hold_back_the_next),
      cmocka_unit_test(ids_made_after_a_fork_differ_from_the_parents),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
