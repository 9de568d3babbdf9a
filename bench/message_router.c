/*
 * Benchmark of the in-process message router (no database).
 *
 * Prints messages/s for 1 and 2 producers (route() per message, and 1
 * producer with route_many() in batches of 100) into 4 router-owned lanes,
 * and the route() -> on_batch latency p50/p99 under full load and at a light
 * rate of 1,000 msgs/s (with the default 10 ms batch timeout, and with 0).
 * Ends with one JSON line. Takes about 15 s.
 *
 * Latency is end to end: ingress wait + batching + lane queue wait, up to the
 * lane thread's callback. Under load one message in SAMPLE_EVERY carries a
 * pointer to the time its producer routed it (the others point to a shared
 * "unstamped" marker), so the clock read does not slow the producer being
 * measured; at the light rate every message is stamped.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* clock_gettime, condattr_setclock, nanosleep under -std=c11 */
#endif
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "commandbus/message_router.h"

#define LANES 4
#define KEYS 4096
#define POOL (1u << 20) /* timestamps per producer, reused round-robin */
#define HIST_US (1u << 17) /* 1 us buckets up to 131 ms, then one overflow */
#define LOAD_SECONDS 3.0
#define LIGHT_SECONDS 1.5
#define LIGHT_RATE 1000
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
} __attribute__((aligned(64))) lane_hist;

typedef struct run {
    lane_hist lanes[LANES];
    atomic_int stop_producers;
    int many; /* producers use route_many */
    cb_message_router *router;
} run;

static void on_batch(void *ctx, int lane, void **items, size_t n) {
    run *r = ctx;
    lane_hist *h = &r->lanes[lane];
    uint64_t now = now_ns();

    for (size_t i = 0; i < n; i++) {
        if (items[i] == &unstamped)
            continue;
        uint64_t sent = *(volatile uint64_t *)items[i];
        uint64_t us = now > sent ? (now - sent) / 1000 : 0;
        h->us[us < HIST_US ? us : HIST_US]++;
        h->count++;
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
                entries[e] = (cb_message_router_entry){
                    keys[i % KEYS], key_lens[i % KEYS], e ? &unstamped : slot};
            p->sent += (uint64_t)cb_message_router_route_many(router, entries, 100);
            continue;
        }
        for (int e = 0; e < 1024; e++, i++) {
            void *item = &unstamped;
            if (i % SAMPLE_EVERY == 0) {
                item = &p->pool[i & (POOL - 1)];
                *(uint64_t *)item = now_ns();
            }
            if (cb_message_router_route(router, keys[i % KEYS], key_lens[i % KEYS],
                                        item) == 0)
                p->sent++;
        }
    }
    return NULL;
}

static void sleep_until(uint64_t t) {
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ULL),
                          .tv_nsec = (long)(t % 1000000000ULL)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL))
        ;
}

static double percentile_us(run *r, double q) {
    uint64_t total = 0, seen = 0;
    for (int l = 0; l < LANES; l++)
        total += r->lanes[l].count;
    uint64_t rank = (uint64_t)(q * (double)total);
    for (uint32_t b = 0; b <= HIST_US; b++) {
        for (int l = 0; l < LANES; l++)
            seen += r->lanes[l].us[b];
        if (seen > rank)
            return (double)b;
    }
    return (double)HIST_US;
}

typedef struct result {
    double msgs_per_s, p50_us, p99_us;
    cb_message_router_stats stats;
} result;

static cb_message_router *router_for(run *r, int batch_timeout_ms) {
    cb_message_router_config cfg;
    cb_message_router *router;

    cb_message_router_config_init(&cfg);
    cfg.lanes = LANES;
    cfg.policy = CB_MESSAGE_ROUTER_BLOCK; /* measure delivery, not drops */
    cfg.block_timeout_ms = -1;
    cfg.batch_timeout_ms = batch_timeout_ms;
    cfg.on_batch = on_batch;
    cfg.on_batch_ctx = r;
    if (cb_message_router_new(&router, &cfg)) {
        fprintf(stderr, "cb_message_router_new failed\n");
        exit(1);
    }
    return router;
}

static run *run_new(void) {
    run *r = calloc(1, sizeof *r);
    for (int l = 0; l < LANES; l++)
        r->lanes[l].us = calloc(HIST_US + 1, sizeof(uint32_t));
    return r;
}

static void run_free(run *r) {
    for (int l = 0; l < LANES; l++)
        free(r->lanes[l].us);
    free(r);
}

/* producers route as fast as they can for LOAD_SECONDS; the rate counts
 * messages delivered to lanes up to the end of stop (the drain included). */
static result bench_load(int producers, int many) {
    run *r = run_new();
    producer ps[2];
    pthread_t threads[2];
    result res;

    r->many = many;
    r->router = router_for(r, CB_MESSAGE_ROUTER_DEFAULT_BATCH_TIMEOUT_MS);
    cb_message_router_start(r->router);
    uint64_t t0 = now_ns();
    for (int i = 0; i < producers; i++) {
        ps[i] = (producer){.run = r, .id = i,
                           .pool = calloc(POOL, sizeof(uint64_t))};
        pthread_create(&threads[i], NULL, produce_flat_out, &ps[i]);
    }
    sleep_until(t0 + (uint64_t)(LOAD_SECONDS * 1e9));
    atomic_store(&r->stop_producers, 1);
    for (int i = 0; i < producers; i++)
        pthread_join(threads[i], NULL);
    cb_message_router_stop(r->router);
    double seconds = (double)(now_ns() - t0) / 1e9;

    cb_message_router_stats_get(r->router, &res.stats);
    res.msgs_per_s = (double)res.stats.delivered / seconds;
    res.p50_us = percentile_us(r, 0.50);
    res.p99_us = percentile_us(r, 0.99);
    cb_message_router_free(r->router);
    for (int i = 0; i < producers; i++)
        free(ps[i].pool);
    run_free(r);
    return res;
}

/* One producer at LIGHT_RATE msgs/s on an absolute schedule. */
static result bench_light(int batch_timeout_ms) {
    run *r = run_new();
    uint64_t *stamps = calloc(LIGHT_RATE * 2, sizeof(uint64_t));
    uint64_t period = 1000000000ULL / LIGHT_RATE;
    int total = (int)(LIGHT_RATE * LIGHT_SECONDS);
    result res;

    r->router = router_for(r, batch_timeout_ms);
    cb_message_router_start(r->router);
    uint64_t t0 = now_ns();
    for (int i = 0; i < total; i++) {
        sleep_until(t0 + (uint64_t)i * period);
        stamps[i] = now_ns();
        cb_message_router_route(r->router, keys[i % KEYS], key_lens[i % KEYS],
                                &stamps[i]);
    }
    /* let the last partial batch go out on its timeout, not on stop */
    sleep_until(now_ns() + (uint64_t)batch_timeout_ms * 2000000ULL + 5000000ULL);
    cb_message_router_stop(r->router);
    double seconds = (double)(now_ns() - t0) / 1e9;

    cb_message_router_stats_get(r->router, &res.stats);
    res.msgs_per_s = (double)res.stats.delivered / seconds;
    res.p50_us = percentile_us(r, 0.50);
    res.p99_us = percentile_us(r, 0.99);
    cb_message_router_free(r->router);
    free(stamps);
    run_free(r);
    return res;
}

static void print_result(const char *name, result res) {
    printf("%-34s %12.0f msgs/s  p50 %8.0f us  p99 %8.0f us  "
           "(batches %" PRIu64 ", lane full %" PRIu64 ", dropped %" PRIu64
           ", avg %.1f us, max %.1f us)\n",
           name, res.msgs_per_s, res.p50_us, res.p99_us, res.stats.batches_sent,
           res.stats.queue_full_events, res.stats.dropped,
           (double)res.stats.latency_avg_ns / 1e3,
           (double)res.stats.latency_max_ns / 1e3);
    fflush(stdout);
}

int main(void) {
    for (int i = 0; i < KEYS; i++)
        key_lens[i] = (size_t)snprintf(keys[i], sizeof keys[i], "asset-%08d", i * 7);

    printf("message router: %d lanes, BLOCK policy, defaults otherwise "
           "(ingress 10000, lane 5000, batch 100 / 10 ms)\n", LANES);
    result one = bench_load(1, 0);
    print_result("load, 1 producer, route()", one);
    result two = bench_load(2, 0);
    print_result("load, 2 producers, route()", two);
    result many = bench_load(1, 1);
    print_result("load, 1 producer, route_many(100)", many);
    result light = bench_light(CB_MESSAGE_ROUTER_DEFAULT_BATCH_TIMEOUT_MS);
    print_result("light 1000/s, batch timeout 10 ms", light);
    result light0 = bench_light(0);
    print_result("light 1000/s, batch timeout 0", light0);

    printf("{\"bench\":\"message_router\",\"lanes\":%d,"
           "\"msgs_per_s_1p\":%.0f,\"msgs_per_s_2p\":%.0f,"
           "\"msgs_per_s_1p_route_many\":%.0f,"
           "\"p50_us_load\":%.0f,\"p99_us_load\":%.0f,"
           "\"p50_us_light\":%.0f,\"p99_us_light\":%.0f,"
           "\"p50_us_light_no_batch_wait\":%.0f,"
           "\"p99_us_light_no_batch_wait\":%.0f}\n",
           LANES, one.msgs_per_s, two.msgs_per_s, many.msgs_per_s, one.p50_us,
           one.p99_us, light.p50_us, light.p99_us, light0.p50_us, light0.p99_us);
    return 0;
}
