/* Tests of the in-process message router (no database). They assert
 * behaviour only; the few waits have generous bounds (1-10 s) that a correct
 * router meets in microseconds. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* clock_gettime, condattr_setclock, nanosleep under -std=c11 */
#endif
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "commandbus/message_router.h"

/* ------------------------------------------------------------ helpers */

static cb_message_router_config config(int lanes) {
  cb_message_router_config cfg;
  cb_message_router_config_init(&cfg);
  cfg.lanes = lanes;
  return cfg;
}

static cb_message_router *router_new(const cb_message_router_config *cfg) {
  cb_message_router *r = NULL;
  assert_int_equal(cb_message_router_new(&r, cfg), CB_OK);
  assert_non_null(r);
  return r;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* Deterministic xorshift so key sets are the same on every run. */
static uint64_t next_random(uint64_t *state) {
  uint64_t x = *state;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *state = x;
}

static void *item_of(uintptr_t n) { return (void *)(n + 1); }
static uintptr_t number_of(void *item) { return (uintptr_t)item - 1; }

/* Polls until the router has handed `expected` items to lanes or dropped
 * them; fails after 10 s. */
static void wait_until_dispatched(cb_message_router *r, uint64_t expected) {
  cb_message_router_stats s;
  for (int i = 0; i < 10000; i++) {
    cb_message_router_stats_get(r, &s);
    if (s.routed + s.dropped >= expected) return;
    sleep_ms(1);
  }
  fail_msg("router did not dispatch %llu items", (unsigned long long)expected);
}

/* ------------------------------------------------------------ hashing */

static void same_key_always_maps_to_the_same_lane(void **state) {
  (void)state;
  cb_message_router_config cfg = config(4);
  cfg.batch_timeout_ms = 0;
  cb_message_router *r = router_new(&cfg);
  const char *key = "asset-0x1234";
  int lane = cb_message_router_lane_for(r, key, strlen(key));
  void *items[8];

  assert_in_range(lane, 0, 3);
  for (int i = 0; i < 100; i++) assert_int_equal(cb_message_router_lane_for(r, key, strlen(key)), lane);
  assert_int_equal(lane, cb_jump_hash(cb_message_router_hash(key, strlen(key)), 4));

  assert_int_equal(cb_message_router_start(r), CB_OK);
  for (int i = 0; i < 5; i++) assert_int_equal(cb_message_router_route(r, key, strlen(key), item_of(i)), CB_OK);
  cb_message_router_stop(r);
  int got = 0, n;
  while ((n = cb_message_router_take(r, lane, items, 8, 0)) > 0) got += n;
  assert_int_equal(got, 5);
  for (int l = 0; l < 4; l++)
    if (l != lane) assert_int_equal(cb_message_router_take(r, l, items, 8, 0), CB_MESSAGE_ROUTER_END);
  cb_message_router_free(r);
}

static void random_keys_spread_evenly_over_four_lanes(void **state) {
  (void)state;
  uint64_t seed = 0x1234567887654321ULL;
  long counts[4] = {0};
  const int keys = 100000;

  for (int i = 0; i < keys; i++) {
    unsigned char key[16];
    uint64_t a = next_random(&seed), b = next_random(&seed);
    memcpy(key, &a, 8);
    memcpy(key + 8, &b, 8);
    counts[cb_jump_hash(cb_message_router_hash(key, 1 + a % 16), 4)]++;
  }
  for (int l = 0; l < 4; l++) assert_in_range(counts[l], keys * 20 / 100, keys * 30 / 100);
}

static void textual_keys_spread_evenly_too(void **state) {
  (void)state;
  long counts[4] = {0};
  char key[32];

  /* Sequential ids differ only in their last bytes: the mixer must still
   * scatter them. */
  for (int i = 0; i < 100000; i++) {
    int len = snprintf(key, sizeof key, "order-%d", i);
    counts[cb_jump_hash(cb_message_router_hash(key, (size_t)len), 4)]++;
  }
  for (int l = 0; l < 4; l++) assert_in_range(counts[l], 20000, 30000);
}

static void growing_from_eight_to_nine_lanes_moves_few_keys(void **state) {
  (void)state;
  uint64_t seed = 42;
  long moved = 0;
  const int keys = 100000;

  for (int i = 0; i < keys; i++) {
    uint64_t key = next_random(&seed);
    uint64_t h = cb_message_router_hash(&key, sizeof key);
    int32_t before = cb_jump_hash(h, 8), after = cb_jump_hash(h, 9);
    if (before != after) {
      moved++;
      assert_int_equal(after, 8); /* keys only ever move to the new lane */
    }
  }
  assert_true(moved <= (long)(keys * 1.2 / 9));
  assert_true(moved > 0);
}

static void jump_hash_rejects_no_buckets_and_uses_the_only_one(void **state) {
  (void)state;
  assert_int_equal(cb_jump_hash(123, 0), -1);
  assert_int_equal(cb_jump_hash(123, -5), -1);
  for (uint64_t k = 0; k < 1000; k++) assert_int_equal(cb_jump_hash(k, 1), 0);
  /* empty keys are keys too */
  assert_int_equal(cb_message_router_hash(NULL, 0), cb_message_router_hash("", 0));
}

/* ------------------------------------------------------------ batching */

static void a_batch_is_handed_over_when_it_reaches_batch_size(void **state) {
  (void)state;
  cb_message_router_config cfg = config(1);
  cfg.batch_size = 10;
  cfg.batch_timeout_ms = 60000; /* only size can trigger within the test */
  cb_message_router *r = router_new(&cfg);
  void *items[32];
  cb_message_router_stats s;

  assert_int_equal(cb_message_router_start(r), CB_OK);
  for (int i = 0; i < 9; i++) assert_int_equal(cb_message_router_route(r, "k", 1, item_of(i)), CB_OK);
  /* one short of a batch: it stays in the ingress */
  assert_int_equal(cb_message_router_take(r, 0, items, 32, 100), 0);
  assert_int_equal(cb_message_router_ingress_depth(r), 9);

  assert_int_equal(cb_message_router_route(r, "k", 1, item_of(9)), CB_OK);
  int got = 0;
  while (got < 10) {
    int n = cb_message_router_take(r, 0, items + got, 32 - (size_t)got, 1000);
    assert_true(n > 0);
    got += n;
  }
  for (int i = 0; i < 10; i++) assert_int_equal(number_of(items[i]), i);
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.batches_sent, 1);
  assert_int_equal(s.routed, 10);
  assert_int_equal(s.delivered, 10);
  cb_message_router_free(r);
}

static void a_single_message_is_handed_over_on_the_batch_timeout(void **state) {
  (void)state;
  cb_message_router_config cfg = config(2);
  cfg.batch_timeout_ms = 20;
  cb_message_router *r = router_new(&cfg);
  void *items[4];
  int lane = cb_message_router_lane_for(r, "solo", 4);

  assert_int_equal(cb_message_router_start(r), CB_OK);
  assert_int_equal(cb_message_router_route(r, "solo", 4, item_of(7)), CB_OK);
  assert_int_equal(cb_message_router_take(r, lane, items, 4, 1000), 1);
  assert_int_equal(number_of(items[0]), 7);
  cb_message_router_free(r);
}

/* A consumer that takes once, waiting as long as it takes. */
typedef struct patient_consumer {
  cb_message_router *router;
  int lane;
  int rc;
  atomic_int returned;
} patient_consumer;

static void *take_once_waiting_forever(void *arg) {
  patient_consumer *c = arg;
  void *items[16];
  c->rc = cb_message_router_take(c->router, c->lane, items, 16, -1);
  atomic_store(&c->returned, 1);
  return NULL;
}

/* Polls up to 10 s for flag to be set; false if it never was. */
static bool became_set(atomic_int *flag) {
  for (int i = 0; i < 10000 && !atomic_load(flag); i++) sleep_ms(1);
  return atomic_load(flag) != 0;
}

/* The batch timeout is an hour: only a full ingress batch (or stop) moves
 * items in this test. */
#define AN_HOUR_MS (3600 * 1000)

/* A full ingress batch split over lanes leaves each lane short of a batch;
 * a sleeping consumer gets its share as soon as it is handed over, and does
 * not wait for its lane to hold a batch of its own or for the batch timeout
 * (it would sleep for an hour here). */
static void a_short_share_of_a_batch_wakes_a_sleeping_consumer_at_once(void **state) {
  (void)state;
  cb_message_router_config cfg = config(2);
  cfg.batch_size = 10;
  cfg.batch_timeout_ms = AN_HOUR_MS;
  cb_message_router *r = router_new(&cfg);
  patient_consumer consumers[2] = {{.router = r, .lane = 0}, {.router = r, .lane = 1}};
  pthread_t threads[2];
  int per_lane[2] = {0}, k = 0;
  bool woken[2];

  assert_int_equal(cb_message_router_start(r), CB_OK);
  for (int c = 0; c < 2; c++)
    assert_int_equal(pthread_create(&threads[c], NULL, take_once_waiting_forever, &consumers[c]), 0);
  sleep_ms(20); /* let both consumers fall asleep (if not, they take at once) */
  while (per_lane[0] + per_lane[1] < 10) {
    int lane = cb_message_router_lane_for(r, &k, sizeof k);
    if (per_lane[lane] < 5) {
      assert_int_equal(cb_message_router_route(r, &k, sizeof k, item_of(k)), CB_OK);
      per_lane[lane]++;
    }
    k++;
  }
  for (int c = 0; c < 2; c++) woken[c] = became_set(&consumers[c].returned);
  cb_message_router_stop(r); /* ends the lanes: a consumer still asleep returns */
  for (int c = 0; c < 2; c++) {
    pthread_join(threads[c], NULL);
    assert_true(woken[c]);
    assert_int_equal(consumers[c].rc, 5);
  }
  cb_message_router_free(r);
}

typedef struct first_batches {
  atomic_int items[2];
  atomic_int batches[2];
} first_batches;

static void count_first_batches(void *ctx, int lane, void **items, size_t n) {
  first_batches *seen = ctx;
  if (!items) return; /* the end marker */
  atomic_fetch_add(&seen->items[lane], (int)n);
  atomic_fetch_add(&seen->batches[lane], 1);
}

/* The router's own lane threads: a batch of two split over two lanes gives
 * each handler a single message, at once. */
static void a_handler_gets_a_single_message_of_a_split_batch_at_once(void **state) {
  (void)state;
  first_batches seen = {0};
  cb_message_router_config cfg = config(2);
  cfg.batch_size = 2;
  cfg.batch_timeout_ms = AN_HOUR_MS;
  cfg.on_batch = count_first_batches;
  cfg.on_batch_ctx = &seen;
  cb_message_router *r = router_new(&cfg);
  char keys[2][16] = {"", ""};
  bool both_delivered = false;

  /* one key for each lane */
  for (int k = 0; !keys[0][0] || !keys[1][0]; k++) {
    char key[16];
    snprintf(key, sizeof key, "key-%d", k);
    snprintf(keys[cb_message_router_lane_for(r, key, strlen(key))], sizeof key, "%s", key);
  }
  assert_int_equal(cb_message_router_start(r), CB_OK);
  for (int l = 0; l < 2; l++) assert_int_equal(cb_message_router_route(r, keys[l], strlen(keys[l]), item_of(l)), CB_OK);
  for (int i = 0; i < 10000 && !both_delivered; i++) {
    if (atomic_load(&seen.items[0]) && atomic_load(&seen.items[1])) both_delivered = true;
    else sleep_ms(1);
  }
  cb_message_router_stop(r);
  assert_true(both_delivered);
  for (int l = 0; l < 2; l++) {
    assert_int_equal(atomic_load(&seen.items[l]), 1);
    assert_int_equal(atomic_load(&seen.batches[l]), 1);
  }
  cb_message_router_free(r);
}

/* ------------------------------------------------------------ backpressure */

static void drop_policy_refuses_and_counts_when_the_ingress_is_full(void **state) {
  (void)state;
  cb_message_router_config cfg = config(2);
  cfg.ingress_capacity = 10;
  cfg.batch_size = 5;
  cfg.policy = CB_MESSAGE_ROUTER_DROP;
  cb_message_router *r = router_new(&cfg); /* not started: nothing drains */
  cb_message_router_stats s;

  for (int i = 0; i < 10; i++) assert_int_equal(cb_message_router_route(r, &i, sizeof i, item_of(i)), CB_OK);
  assert_int_equal(cb_message_router_route(r, "x", 1, item_of(10)), CB_ETIMEOUT);

  cb_message_router_entry more[3] = {{"a", 1, item_of(11)}, {"b", 1, item_of(12)}, {"c", 1, item_of(13)}};
  assert_int_equal(cb_message_router_route_many(r, more, 3), 0);
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.dropped, 4);
  assert_int_equal(cb_message_router_ingress_depth(r), 10);
  cb_message_router_free(r);
}

static void drop_policy_counts_a_full_lane(void **state) {
  (void)state;
  cb_message_router_config cfg = config(1);
  cfg.lane_capacity = 5;
  cfg.batch_size = 8;
  cfg.policy = CB_MESSAGE_ROUTER_DROP;
  cb_message_router *r = router_new(&cfg);
  cb_message_router_stats s;

  assert_int_equal(cb_message_router_start(r), CB_OK);
  for (int i = 0; i < 8; i++) assert_int_equal(cb_message_router_route(r, "k", 1, item_of(i)), CB_OK);
  wait_until_dispatched(r, 8);
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.routed, 5);
  assert_int_equal(s.dropped, 3);
  assert_int_equal(s.queue_full_events, 1);
  assert_int_equal(cb_message_router_lane_depth(r, 0), 5);
  cb_message_router_free(r);
}

static void block_policy_times_out_and_counts(void **state) {
  (void)state;
  cb_message_router_config cfg = config(1);
  cfg.ingress_capacity = 2;
  cfg.batch_size = 2;
  cfg.policy = CB_MESSAGE_ROUTER_BLOCK;
  cfg.block_timeout_ms = 30;
  cb_message_router *r = router_new(&cfg); /* not started */
  cb_message_router_stats s;

  assert_int_equal(cb_message_router_route(r, "k", 1, item_of(0)), CB_OK);
  assert_int_equal(cb_message_router_route(r, "k", 1, item_of(1)), CB_OK);
  assert_int_equal(cb_message_router_route(r, "k", 1, item_of(2)), CB_ETIMEOUT);
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.dropped, 1);
  cb_message_router_free(r);
}

#define BLOCKED_ITEMS 20

typedef struct blocked_producer {
  cb_message_router *router;
  atomic_int done;
  int failures;
} blocked_producer;

static void *route_more_than_fits(void *arg) {
  blocked_producer *p = arg;
  for (int i = 0; i < BLOCKED_ITEMS; i++)
    if (cb_message_router_route(p->router, "k", 1, item_of(i)) != CB_OK) p->failures++;
  atomic_store(&p->done, 1);
  return NULL;
}

static void block_policy_waits_then_succeeds_when_a_lane_drains(void **state) {
  (void)state;
  cb_message_router_config cfg = config(1);
  cfg.ingress_capacity = 4;
  cfg.lane_capacity = 4;
  cfg.batch_size = 1;
  cfg.batch_timeout_ms = 0;
  cfg.policy = CB_MESSAGE_ROUTER_BLOCK;
  cfg.block_timeout_ms = 10000;
  cb_message_router *r = router_new(&cfg);
  blocked_producer p = {.router = r};
  cb_message_router_stats s;
  pthread_t thread;
  void *items[BLOCKED_ITEMS];

  assert_int_equal(cb_message_router_start(r), CB_OK);
  /* The router holds at most 12 (lane 4, ingress 4, dispatcher's hand
   * 4) and nobody takes yet, so the producer must be waiting. */
  assert_int_equal(pthread_create(&thread, NULL, route_more_than_fits, &p), 0);
  sleep_ms(100);
  assert_int_equal(atomic_load(&p.done), 0);
  assert_int_equal(cb_message_router_lane_depth(r, 0), 4);

  int got = 0;
  while (got < BLOCKED_ITEMS) {
    int n = cb_message_router_take(r, 0, items + got, BLOCKED_ITEMS - (size_t)got, 5000);
    assert_true(n > 0);
    got += n;
  }
  pthread_join(thread, NULL);
  assert_int_equal(p.failures, 0);
  for (int i = 0; i < BLOCKED_ITEMS; i++) assert_int_equal(number_of(items[i]), i);
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.dropped, 0);
  assert_true(s.queue_full_events >= 1);
  cb_message_router_free(r);
}

/* ------------------------------------------------------------ stop */

#define STOP_LANES 4

typedef struct lane_log {
  long items[STOP_LANES];
  int end_markers[STOP_LANES];
  int batches_after_end[STOP_LANES];
  long sum; /* of item numbers, to see each arrived once */
  pthread_mutex_t lock;
} lane_log;

static void log_batch(void *ctx, int lane, void **items, size_t n) {
  lane_log *log = ctx;
  pthread_mutex_lock(&log->lock);
  if (!items && n == 0) {
    log->end_markers[lane]++;
  } else {
    if (log->end_markers[lane]) log->batches_after_end[lane]++;
    log->items[lane] += (long)n;
    for (size_t i = 0; i < n; i++) log->sum += (long)number_of(items[i]);
  }
  pthread_mutex_unlock(&log->lock);
}

static void stop_delivers_what_was_accepted_and_one_end_marker_per_lane(void **state) {
  (void)state;
  lane_log log = {.lock = PTHREAD_MUTEX_INITIALIZER};
  cb_message_router_config cfg = config(STOP_LANES);
  cfg.batch_timeout_ms = 60000; /* a partial batch is only moved by stop */
  cfg.on_batch = log_batch;
  cfg.on_batch_ctx = &log;
  cb_message_router *r = router_new(&cfg);
  cb_message_router_stats s;
  const int n = 1050;
  char key[16];

  assert_int_equal(cb_message_router_start(r), CB_OK);
  for (int i = 0; i < n; i++) {
    int len = snprintf(key, sizeof key, "k%d", i % 37);
    assert_int_equal(cb_message_router_route(r, key, (size_t)len, item_of(i)), CB_OK);
  }
  assert_int_equal(cb_message_router_stop(r), CB_OK);

  long total = 0;
  for (int l = 0; l < STOP_LANES; l++) {
    total += log.items[l];
    assert_int_equal(log.end_markers[l], 1);
    assert_int_equal(log.batches_after_end[l], 0);
  }
  assert_int_equal(total, n);
  assert_int_equal(log.sum, (long)n * (n - 1) / 2);
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.routed, n);
  assert_int_equal(s.dropped, 0);
  assert_int_equal(s.delivered, n);

  /* after stop nothing is accepted, and a second stop is harmless */
  assert_int_equal(cb_message_router_route(r, "k", 1, item_of(0)), CB_ECLOSED);
  cb_message_router_entry late[2] = {{"a", 1, item_of(1)}, {"b", 1, item_of(2)}};
  assert_int_equal(cb_message_router_route_many(r, late, 2), CB_ECLOSED);
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.routing_errors, 3);
  assert_int_equal(cb_message_router_stop(r), CB_OK);
  assert_int_equal(cb_message_router_start(r), CB_ESTATE);
  cb_message_router_free(r);
}

static void stop_without_start_still_hands_everything_to_the_lanes(void **state) {
  (void)state;
  cb_message_router_config cfg = config(2);
  cb_message_router *r = router_new(&cfg);
  void *items[16];
  int got = 0;

  for (int i = 0; i < 10; i++) assert_int_equal(cb_message_router_route(r, &i, sizeof i, item_of(i)), CB_OK);
  cb_message_router_stop(r);
  for (int l = 0; l < 2; l++) {
    int n;
    while ((n = cb_message_router_take(r, l, items, 16, 0)) > 0) got += n;
    assert_int_equal(n, CB_MESSAGE_ROUTER_END);
    /* the end marker stays: every later take says the same */
    assert_int_equal(cb_message_router_take(r, l, items, 16, 1000), CB_MESSAGE_ROUTER_END);
  }
  assert_int_equal(got, 10);
  cb_message_router_free(r);
}

/* The dispatcher is never started here: what a consumer takes, route()
 * put in the lane itself. */
static void a_lone_item_goes_straight_to_its_lane_when_nothing_is_batched(void **state) {
  (void)state;
  cb_message_router_config cfg = config(1);
  cfg.batch_timeout_ms = 0;
  cb_message_router *r = router_new(&cfg);
  void *items[4];
  cb_message_router_stats s;

  assert_int_equal(cb_message_router_route(r, "k", 1, item_of(7)), CB_OK);
  assert_int_equal(cb_message_router_ingress_depth(r), 0);
  assert_int_equal(cb_message_router_take(r, 0, items, 4, 0), 1);
  assert_int_equal(number_of(items[0]), 7);
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.direct, 1);
  assert_int_equal(s.routed, 1);
  assert_int_equal(s.delivered, 1);
  cb_message_router_free(r);
}

/* A full lane sends the rest through the ingress; what follows queues
 * behind it rather than overtaking it, and the order holds. */
static void items_queue_behind_the_ingress_rather_than_overtake_it(void **state) {
  (void)state;
  cb_message_router_config cfg = config(1);
  cfg.batch_timeout_ms = 0;
  cfg.batch_size = 1;
  cfg.lane_capacity = 1;
  cfg.policy = CB_MESSAGE_ROUTER_BLOCK;
  cfg.block_timeout_ms = 10000;
  cb_message_router *r = router_new(&cfg);
  void *items[4];
  cb_message_router_stats s;

  for (int i = 0; i < 3; i++) assert_int_equal(cb_message_router_route(r, "k", 1, item_of(i)), CB_OK);
  assert_int_equal(cb_message_router_lane_depth(r, 0), 1);
  assert_int_equal(cb_message_router_ingress_depth(r), 2);
  assert_int_equal(cb_message_router_take(r, 0, items, 4, 0), 1);
  assert_int_equal(number_of(items[0]), 0);
  /* The lane has room again, but the ingress holds items: they go first. */
  assert_int_equal(cb_message_router_route(r, "k", 1, item_of(3)), CB_OK);
  assert_int_equal(cb_message_router_ingress_depth(r), 3);
  assert_int_equal(cb_message_router_start(r), CB_OK);
  for (int i = 1; i < 4; i++) {
    assert_int_equal(cb_message_router_take(r, 0, items, 4, 5000), 1);
    assert_int_equal(number_of(items[0]), (uintptr_t)i);
  }
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.direct, 1);
  assert_int_equal(s.routed, 4);
  cb_message_router_free(r);
}

typedef struct waiting_consumer {
  cb_message_router *router;
  int rc;
} waiting_consumer;

static void *take_forever(void *arg) {
  waiting_consumer *c = arg;
  void *items[4];
  c->rc = cb_message_router_take(c->router, 0, items, 4, -1);
  return NULL;
}

static void stop_wakes_a_consumer_waiting_on_an_empty_lane(void **state) {
  (void)state;
  cb_message_router_config cfg = config(1);
  cb_message_router *r = router_new(&cfg);
  waiting_consumer c = {.router = r};
  pthread_t thread;

  assert_int_equal(cb_message_router_start(r), CB_OK);
  assert_int_equal(pthread_create(&thread, NULL, take_forever, &c), 0);
  sleep_ms(20);
  cb_message_router_stop(r);
  pthread_join(thread, NULL);
  assert_int_equal(c.rc, CB_MESSAGE_ROUTER_END);
  cb_message_router_free(r);
}

/* ------------------------------------------------------------ ordering */

#define PRODUCERS 4
#define KEYS_PER_PRODUCER 64
#define ITEMS_PER_PRODUCER 50000
#define ORDER_LANES 4

typedef struct order_check {
  cb_message_router *router;
  /* next expected sequence per (producer, key); each key has one lane, so
   * each counter is only touched by that lane's thread */
  long next_seq[PRODUCERS][KEYS_PER_PRODUCER];
  atomic_long out_of_order;
  atomic_long wrong_lane;
  atomic_long received;
} order_check;

/* item = producer | key | sequence, packed in the pointer value */
static void *order_item(int producer, int key, long seq) {
  return item_of(((uintptr_t)seq << 16) | ((uintptr_t)key << 4) | (uintptr_t)producer);
}

static int order_key(char *buf, size_t size, int producer, int key) {
  return snprintf(buf, size, "producer-%d/key-%d", producer, key);
}

static void check_order(void *ctx, int lane, void **items, size_t n) {
  order_check *check = ctx;
  char key[48];
  for (size_t i = 0; i < n; i++) {
    uintptr_t v = number_of(items[i]);
    int producer = (int)(v & 0xf), k = (int)((v >> 4) & 0xfff);
    long seq = (long)(v >> 16);
    int len = order_key(key, sizeof key, producer, k);
    if (cb_message_router_lane_for(check->router, key, (size_t)len) != lane) atomic_fetch_add(&check->wrong_lane, 1);
    if (check->next_seq[producer][k] != seq) atomic_fetch_add(&check->out_of_order, 1);
    check->next_seq[producer][k] = seq + 1;
  }
  atomic_fetch_add(&check->received, (long)n);
}

typedef struct producer_arg {
  cb_message_router *router;
  int id;
  long failures;
} producer_arg;

static void *produce_in_sequence(void *arg) {
  producer_arg *p = arg;
  long seq[KEYS_PER_PRODUCER] = {0};
  char key[48];
  uint64_t rnd = 0x9e3779b97f4a7c15ULL * (uint64_t)(p->id + 1);

  for (long i = 0; i < ITEMS_PER_PRODUCER; i++) {
    int k = (int)(next_random(&rnd) % KEYS_PER_PRODUCER);
    int len = order_key(key, sizeof key, p->id, k);
    if (cb_message_router_route(p->router, key, (size_t)len, order_item(p->id, k, seq[k])) == CB_OK) seq[k]++;
    else p->failures++;
  }
  return NULL;
}

static void per_key_order_holds_with_four_producer_threads(void **state) {
  (void)state;
  order_check *check = calloc(1, sizeof *check);
  cb_message_router_config cfg = config(ORDER_LANES);
  cfg.policy = CB_MESSAGE_ROUTER_BLOCK;
  cfg.block_timeout_ms = -1;
  cfg.lane_capacity = 500; /* small, so lanes fill and the dispatcher waits */
  cfg.on_batch = check_order;
  cfg.on_batch_ctx = check;
  cb_message_router *r = router_new(&cfg);
  producer_arg producers[PRODUCERS];
  pthread_t threads[PRODUCERS];
  cb_message_router_stats s;

  check->router = r;
  assert_int_equal(cb_message_router_start(r), CB_OK);
  for (int i = 0; i < PRODUCERS; i++) {
    producers[i] = (producer_arg){.router = r, .id = i};
    assert_int_equal(pthread_create(&threads[i], NULL, produce_in_sequence, &producers[i]), 0);
  }
  for (int i = 0; i < PRODUCERS; i++) {
    pthread_join(threads[i], NULL);
    assert_int_equal(producers[i].failures, 0);
  }
  cb_message_router_stop(r);

  assert_int_equal(atomic_load(&check->out_of_order), 0);
  assert_int_equal(atomic_load(&check->wrong_lane), 0);
  assert_int_equal(atomic_load(&check->received), PRODUCERS * ITEMS_PER_PRODUCER);
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.dropped, 0);
  assert_int_equal(s.routed, PRODUCERS * ITEMS_PER_PRODUCER);
  assert_true(s.batches_sent >= PRODUCERS * ITEMS_PER_PRODUCER / cfg.batch_size);
  assert_true(s.latency_max_ns >= s.latency_avg_ns);
  cb_message_router_free(r);
  free(check);
}

/* ------------------------------------------------------------ API edges */

static void route_many_keeps_order_and_lane_choice(void **state) {
  (void)state;
  cb_message_router_config cfg = config(3);
  cb_message_router *r = router_new(&cfg);
  cb_message_router_entry entries[200];
  char keys[200][8];
  void *items[256];

  for (int i = 0; i < 200; i++) {
    int len = snprintf(keys[i], sizeof keys[i], "k%d", i % 5);
    entries[i] = (cb_message_router_entry){keys[i], (size_t)len, item_of(i)};
  }
  assert_int_equal(cb_message_router_route_many(r, entries, 200), 200);
  cb_message_router_stop(r);
  for (int l = 0; l < 3; l++) {
    int n = cb_message_router_take(r, l, items, 256, 0);
    long last = -1;
    for (int i = 0; i < n; i++) {
      long v = (long)number_of(items[i]);
      assert_true(v > last);
      assert_int_equal(cb_message_router_lane_for(r, keys[v], strlen(keys[v])), l);
      last = v;
    }
  }
  cb_message_router_free(r);
}

static void bad_arguments_are_refused(void **state) {
  (void)state;
  cb_message_router_config cfg = config(2);
  cb_message_router *r = NULL;
  cb_message_router_stats s;
  void *items[2];

  cfg.lanes = 0;
  assert_int_equal(cb_message_router_new(&r, &cfg), CB_EINVAL);
  cfg = config(2);
  cfg.ingress_capacity = cfg.batch_size - 1;
  assert_int_equal(cb_message_router_new(&r, &cfg), CB_EINVAL);
  assert_null(r);

  assert_int_equal(cb_message_router_new(&r, NULL), CB_OK); /* defaults */
  assert_int_equal(cb_message_router_route(r, NULL, 3, item_of(0)), CB_EINVAL);
  cb_message_router_stats_get(r, &s);
  assert_int_equal(s.routing_errors, 1);
  assert_int_equal(cb_message_router_take(r, -1, items, 2, 0), CB_EINVAL);
  assert_int_equal(cb_message_router_take(r, cb_message_router_lanes(r), items, 2, 0), CB_EINVAL);
  assert_int_equal(cb_message_router_take(r, 0, items, 0, 0), CB_EINVAL);
  assert_int_equal(cb_message_router_take(r, 0, items, 2, 0), 0);
  assert_int_equal(cb_message_router_take(r, 0, items, 2, 20), 0); /* timeout */
  assert_int_equal(cb_message_router_lane_for(NULL, "k", 1), CB_EINVAL);
  assert_int_equal(cb_message_router_lanes(NULL), CB_EINVAL);
  assert_int_equal(cb_message_router_start(NULL), CB_EINVAL);
  assert_int_equal(cb_message_router_stop(NULL), CB_EINVAL);
  cb_message_router_free(r);
  cb_message_router_free(NULL);
}

static void a_name_is_unique_among_live_routers(void **state) {
  (void)state;
  cb_message_router_config cfg = config(1);
  cb_message_router *first = NULL, *second = NULL;

  cfg.name = "orders";
  assert_int_equal(cb_message_router_new(&first, &cfg), CB_OK);
  assert_int_equal(cb_message_router_new(&second, &cfg), CB_EDUPLICATE);
  assert_null(second);
  cb_message_router_free(first);
  /* freed, its name is free again */
  assert_int_equal(cb_message_router_new(&second, &cfg), CB_OK);
  cb_message_router_free(second);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(same_key_always_maps_to_the_same_lane),
      cmocka_unit_test(random_keys_spread_evenly_over_four_lanes),
      cmocka_unit_test(textual_keys_spread_evenly_too),
      cmocka_unit_test(growing_from_eight_to_nine_lanes_moves_few_keys),
      cmocka_unit_test(jump_hash_rejects_no_buckets_and_uses_the_only_one),
      cmocka_unit_test(a_batch_is_handed_over_when_it_reaches_batch_size),
      cmocka_unit_test(a_single_message_is_handed_over_on_the_batch_timeout),
      cmocka_unit_test(a_short_share_of_a_batch_wakes_a_sleeping_consumer_at_once),
      cmocka_unit_test(a_handler_gets_a_single_message_of_a_split_batch_at_once),
      cmocka_unit_test(drop_policy_refuses_and_counts_when_the_ingress_is_full),
      cmocka_unit_test(drop_policy_counts_a_full_lane),
      cmocka_unit_test(block_policy_times_out_and_counts),
      cmocka_unit_test(block_policy_waits_then_succeeds_when_a_lane_drains),
      cmocka_unit_test(stop_delivers_what_was_accepted_and_one_end_marker_per_lane),
      cmocka_unit_test(stop_without_start_still_hands_everything_to_the_lanes),
      cmocka_unit_test(a_lone_item_goes_straight_to_its_lane_when_nothing_is_batched),
      cmocka_unit_test(items_queue_behind_the_ingress_rather_than_overtake_it),
      cmocka_unit_test(stop_wakes_a_consumer_waiting_on_an_empty_lane),
      cmocka_unit_test(per_key_order_holds_with_four_producer_threads),
      cmocka_unit_test(route_many_keeps_order_and_lane_choice),
      cmocka_unit_test(bad_arguments_are_refused),
      cmocka_unit_test(a_name_is_unique_among_live_routers),
  };
  return cmocka_run_group_tests_name("message_router", tests, NULL, NULL);
}
