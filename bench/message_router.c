/*
 * Benchmark of the in-process message router (no database).
 *
 * Prints, into router-owned lanes with the default batching (100 per batch,
 * 10 ms timeout):
 *   1. messages/s for 1 and 2 producers (route() per message, and 1 producer
 *      with route_many() in batches of 100) into 4 lanes, with the route() ->
 *      on_batch latency p50/p99 under that full load;
 *   2. the average and p99 route() -> on_batch latency at 100,000 msgs/s from
 *      one producer into 1, 4 and 8 lanes; reference: the same router with
 *      batch_timeout_ms = 0 (hand over as soon as anything waits) at the same
 *      rate in the same run, and the ratio (how much the batching costs);
 *   3. the latency p50/p99 at a light rate of 1,000 msgs/s (with the default
 *      10 ms batch timeout, and with 0).
 * Ends with one JSON line. Takes about 25 s.
 *
 * Latency is end to end: ingress wait + batching + lane queue wait, up to the
 * lane thread's callback. Under full load one message in SAMPLE_EVERY carries
 * a pointer to the time its producer routed it (the others point to a shared
 * "unstamped" marker), so the clock read does not slow the producer being
 * measured; at a fixed rate every message is stamped.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* clock_gettime, clock_nanosleep under -std=c11 */
#endif
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "commandbus/error.h"
#include "commandbus/message_router.h"

#define LOAD_LANES 4
#define MAX_LANES 8
#define KEYS 4096
#define POOL (1u << 20)    /* timestamps per producer, reused round-robin */
#define HIST_US (1u << 17) /* 1 us buckets up to 131 ms, then one overflow */
#define LOAD_SECONDS 3.0
#define RATE 100000
#define RATE_SECONDS 1.5
#define LIGHT_RATE 1000
#define LIGHT_SECONDS 1.5
#define SAMPLE_EVERY 64

static uint64_t unstamped;

static char keys[KEYS][24];
static size_t key_lens[KEYS];

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Per-lane latency histogram: written only by that lane's thread. */
typedef struct lane_hist {
  uint32_t *us;
  uint64_t count;
  uint64_t sum_ns;
} __attribute__((aligned(64))) lane_hist;

typedef struct run {
  lane_hist lanes[MAX_LANES];
  int nlanes;
  atomic_int stop_producers;
  int many; /* producers use route_many */
  cb_message_router *router;
} run;

static void on_batch(void *ctx, int lane, void **items, size_t n) {
  run *r = ctx;
  lane_hist *h = &r->lanes[lane];
  uint64_t now = now_ns();

  for (size_t i = 0; i < n; i++) {
    if (items[i] == &unstamped) continue;
    uint64_t sent = *(volatile uint64_t *)items[i];
    uint64_t ns = now > sent ? now - sent : 0;
    uint64_t us = ns / 1000;
    h->us[us < HIST_US ? us : HIST_US]++;
    h->count++;
    h->sum_ns += ns;
  }
}

typedef struct producer {
  run *run;
  uint64_t *pool;
  uint64_t sent;
  int id;
} producer;

static void *produce_flat_out(void *arg) {
  producer *p = arg;
  cb_message_router *router = p->run->router;
  uint64_t i = (uint64_t)p->id * 7919;
  cb_message_router_entry entries[100];

  while (!atomic_load_explicit(&p->run->stop_producers, memory_order_relaxed)) {
    if (p->run->many) {
      uint64_t *slot = &p->pool[i & (POOL - 1)];
      *slot = now_ns(); /* one stamped message per call */
      for (int e = 0; e < 100; e++, i++)
        entries[e] = (cb_message_router_entry){keys[i % KEYS], key_lens[i % KEYS], e ? &unstamped : slot};
      p->sent += (uint64_t)cb_message_router_route_many(router, entries, 100);
      continue;
    }
    for (int e = 0; e < 1024; e++, i++) {
      void *item = &unstamped;
      if (i % SAMPLE_EVERY == 0) {
        item = &p->pool[i & (POOL - 1)];
        *(uint64_t *)item = now_ns();
      }
      if (cb_message_router_route(router, keys[i % KEYS], key_lens[i % KEYS], item) == CB_OK) p->sent++;
    }
  }
  return NULL;
}

static void sleep_until(uint64_t t) {
  struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ULL), .tv_nsec = (long)(t % 1000000000ULL)};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL))
    ;
}

static double percentile_us(run *r, double q) {
  uint64_t total = 0, seen = 0;
  for (int l = 0; l < r->nlanes; l++) total += r->lanes[l].count;
  uint64_t rank = (uint64_t)(q * (double)total);
  for (uint32_t b = 0; b <= HIST_US; b++) {
    for (int l = 0; l < r->nlanes; l++) seen += r->lanes[l].us[b];
    if (seen > rank) return (double)b;
  }
  return (double)HIST_US;
}

static double average_us(run *r) {
  uint64_t count = 0, sum = 0;
  for (int l = 0; l < r->nlanes; l++) {
    count += r->lanes[l].count;
    sum += r->lanes[l].sum_ns;
  }
  return count ? (double)sum / (double)count / 1e3 : 0;
}

typedef struct result {
  double msgs_per_s, p50_us, p99_us, avg_us;
  cb_message_router_stats stats;
} result;

static cb_message_router *router_for(run *r, int batch_timeout_ms) {
  cb_message_router_config cfg;
  cb_message_router *router;

  cb_message_router_config_init(&cfg);
  cfg.lanes = r->nlanes;
  cfg.policy = CB_MESSAGE_ROUTER_BLOCK; /* measure delivery, not drops */
  cfg.block_timeout_ms = -1;
  cfg.batch_timeout_ms = batch_timeout_ms;
  cfg.on_batch = on_batch;
  cfg.on_batch_ctx = r;
  if (cb_message_router_new(&router, &cfg) != CB_OK) {
    fprintf(stderr, "cb_message_router_new failed\n");
    exit(1);
  }
  return router;
}

static run *run_new(int lanes) {
  run *r = calloc(1, sizeof *r);
  r->nlanes = lanes;
  for (int l = 0; l < lanes; l++) r->lanes[l].us = calloc(HIST_US + 1, sizeof(uint32_t));
  return r;
}

/* Reads the figures of a finished run, then frees it and its router. */
static result run_finish(run *r, double seconds) {
  result res;
  cb_message_router_stats_get(r->router, &res.stats);
  res.msgs_per_s = (double)res.stats.delivered / seconds;
  res.p50_us = percentile_us(r, 0.50);
  res.p99_us = percentile_us(r, 0.99);
  res.avg_us = average_us(r);
  cb_message_router_free(r->router);
  for (int l = 0; l < r->nlanes; l++) free(r->lanes[l].us);
  free(r);
  return res;
}

/* producers route as fast as they can for LOAD_SECONDS; the rate counts
 * messages delivered to lanes up to the end of stop (the drain included). */
static result bench_load(int producers, int many) {
  run *r = run_new(LOAD_LANES);
  producer ps[2];
  pthread_t threads[2];

  r->many = many;
  r->router = router_for(r, CB_MESSAGE_ROUTER_DEFAULT_BATCH_TIMEOUT_MS);
  cb_message_router_start(r->router);
  uint64_t t0 = now_ns();
  for (int i = 0; i < producers; i++) {
    ps[i] = (producer){.run = r, .id = i, .pool = calloc(POOL, sizeof(uint64_t))};
    pthread_create(&threads[i], NULL, produce_flat_out, &ps[i]);
  }
  sleep_until(t0 + (uint64_t)(LOAD_SECONDS * 1e9));
  atomic_store(&r->stop_producers, 1);
  for (int i = 0; i < producers; i++) pthread_join(threads[i], NULL);
  cb_message_router_stop(r->router);
  double seconds = (double)(now_ns() - t0) / 1e9;
  result res = run_finish(r, seconds);
  for (int i = 0; i < producers; i++) free(ps[i].pool);
  return res;
}

/* One producer at `rate` msgs/s for `seconds` on an absolute schedule: it
 * sleeps until the next message is due, then routes every message due by
 * now (a sleep lasts tens of microseconds, so at 100,000/s a few go at once,
 * as from any producer that wakes up to work). Every message carries the
 * time it was routed. */
static result bench_rate(int lanes, int rate, double seconds, int batch_timeout_ms) {
  run *r = run_new(lanes);
  int total = (int)(rate * seconds);
  uint64_t *stamps = calloc((size_t)total, sizeof(uint64_t));
  uint64_t period = 1000000000ULL / (uint64_t)rate;

  r->router = router_for(r, batch_timeout_ms);
  cb_message_router_start(r->router);
  uint64_t t0 = now_ns();
  for (int i = 0; i < total;) {
    sleep_until(t0 + (uint64_t)i * period);
    uint64_t now = now_ns();
    for (; i < total && t0 + (uint64_t)i * period <= now; i++) {
      stamps[i] = now_ns();
      cb_message_router_route(r->router, keys[i % KEYS], key_lens[i % KEYS], &stamps[i]);
    }
  }
  /* let the last partial batch go out on its timeout, not on stop */
  sleep_until(now_ns() + (uint64_t)batch_timeout_ms * 2000000ULL + 5000000ULL);
  cb_message_router_stop(r->router);
  result res = run_finish(r, (double)(now_ns() - t0) / 1e9);
  free(stamps);
  return res;
}

static void print_result(const char *name, result res) {
  printf(
      "%-38s %10.0f msgs/s  avg %7.0f us  p50 %7.0f us  p99 %7.0f us  "
      "(batches %" PRIu64 ", lane full %" PRIu64 ", dropped %" PRIu64 ", max %.1f us)\n",
      name, res.msgs_per_s, res.avg_us, res.p50_us, res.p99_us, res.stats.batches_sent, res.stats.queue_full_events,
      res.stats.dropped, (double)res.stats.latency_max_ns / 1e3);
  fflush(stdout);
}

int main(void) {
  static const int rate_lanes[] = {1, 4, 8};
  result rated[3], rated0[3];
  char name[64];

  for (int i = 0; i < KEYS; i++) key_lens[i] = (size_t)snprintf(keys[i], sizeof keys[i], "asset-%08d", i * 7);

  printf("message router: BLOCK policy, defaults otherwise (ingress 10000, lane 5000, batch 100 / 10 ms)\n");
  result one = bench_load(1, 0);
  print_result("load, 4 lanes, 1 producer, route()", one);
  result two = bench_load(2, 0);
  print_result("load, 4 lanes, 2 producers, route()", two);
  result many = bench_load(1, 1);
  print_result("load, 4 lanes, 1 producer, route_many", many);
  for (int i = 0; i < 3; i++) {
    rated[i] = bench_rate(rate_lanes[i], RATE, RATE_SECONDS, CB_MESSAGE_ROUTER_DEFAULT_BATCH_TIMEOUT_MS);
    snprintf(name, sizeof name, "100000/s, %d lanes, batch timeout 10 ms", rate_lanes[i]);
    print_result(name, rated[i]);
    rated0[i] = bench_rate(rate_lanes[i], RATE, RATE_SECONDS, 0);
    snprintf(name, sizeof name, "100000/s, %d lanes, batch timeout 0", rate_lanes[i]);
    print_result(name, rated0[i]);
    printf("  average latency %.0f us, reference (batch timeout 0) %.0f us, ratio %.2f\n", rated[i].avg_us,
           rated0[i].avg_us, rated[i].avg_us / rated0[i].avg_us);
  }
  result light = bench_rate(LOAD_LANES, LIGHT_RATE, LIGHT_SECONDS, CB_MESSAGE_ROUTER_DEFAULT_BATCH_TIMEOUT_MS);
  print_result("1000/s, 4 lanes, batch timeout 10 ms", light);
  result light0 = bench_rate(LOAD_LANES, LIGHT_RATE, LIGHT_SECONDS, 0);
  print_result("1000/s, 4 lanes, batch timeout 0", light0);

  printf(
      "{\"bench\":\"message_router\",\"lanes\":%d,"
      "\"msgs_per_s_1p\":%.0f,\"msgs_per_s_2p\":%.0f,\"msgs_per_s_1p_route_many\":%.0f,"
      "\"p50_us_load\":%.0f,\"p99_us_load\":%.0f,",
      LOAD_LANES, one.msgs_per_s, two.msgs_per_s, many.msgs_per_s, one.p50_us, one.p99_us);
  for (int i = 0; i < 3; i++)
    printf(
        "\"latency_avg_us_%d_lanes\":%.0f,\"latency_p99_us_%d_lanes\":%.0f,"
        "\"latency_avg_us_%d_lanes_no_batch_wait\":%.0f,\"latency_avg_%d_lanes_ratio\":%.2f,",
        rate_lanes[i], rated[i].avg_us, rate_lanes[i], rated[i].p99_us, rate_lanes[i], rated0[i].avg_us, rate_lanes[i],
        rated[i].avg_us / rated0[i].avg_us);
  printf(
      "\"p50_us_light\":%.0f,\"p99_us_light\":%.0f,"
      "\"p50_us_light_no_batch_wait\":%.0f,\"p99_us_light_no_batch_wait\":%.0f}\n",
      light.p50_us, light.p99_us, light0.p50_us, light0.p99_us);
  return 0;
}
