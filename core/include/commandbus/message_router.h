/*
 * commandbus message router: in-process, bounded, batching fan-out of opaque
 * items to N lanes, chosen by a consistent hash of a byte-string key.
 *
 *   producers --route()--> ingress ring --dispatcher thread--> lane rings
 *                                                     lane consumers --take()
 *
 *   With batch_timeout_ms 0, an item routed while the ingress is empty and
 *   the dispatcher holds nothing goes straight to its lane (one thread's
 *   wake-up less between a lone item and its consumer).
 *
 * - Same key, same lane: keys are hashed (64-bit, unseeded, so stable across
 *   runs) and mapped with jump consistent hash, so growing N -> N+1 lanes
 *   moves only ~1/(N+1) of the keys.
 * - Order: items routed with the same key from one producer thread are taken
 *   from their lane in the order they were routed (per-producer, per-key FIFO),
 *   provided each lane has a single consumer.
 * - Bounded everywhere, no allocation per item: the ingress and every lane are
 *   rings allocated by cb_message_router_new().
 * - Items are never copied, inspected or freed: the caller owns them. Keys are
 *   only read during the route call (they are hashed at once).
 *
 * Consumers come in two shapes, one mechanism (take):
 *   a) threads owned by someone else (e.g. lane threads with their own Lua
 *      state) call cb_message_router_take(router, lane, ...) in a loop until it
 *      returns CB_MESSAGE_ROUTER_END;
 *   b) set config.on_batch and the router starts one thread per lane that
 *      does exactly that loop and calls on_batch for each batch.
 *
 * Errors are cb_code values (commandbus/error.h; CB_OK = 0), documented per
 * function; functions that return a count return a negative cb_code on error.
 * Threads: every function may be called from any thread except where noted;
 * new/free are not concurrent with anything else on the same router.
 */
#ifndef COMMANDBUS_MESSAGE_ROUTER_H
#define COMMANDBUS_MESSAGE_ROUTER_H

#include <stddef.h>
#include <stdint.h>

#include "commandbus/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Returned by cb_message_router_take() once the lane is empty and the router
 * has been stopped: the lane is finished, its consumer should exit. It is
 * returned again on every later call. */
#define CB_MESSAGE_ROUTER_END CB_ECLOSED

#define CB_MESSAGE_ROUTER_DEFAULT_INGRESS_CAPACITY 10000
#define CB_MESSAGE_ROUTER_DEFAULT_LANE_CAPACITY 5000
#define CB_MESSAGE_ROUTER_DEFAULT_BATCH_SIZE 100
#define CB_MESSAGE_ROUTER_DEFAULT_BATCH_TIMEOUT_MS 10
#define CB_MESSAGE_ROUTER_DEFAULT_BLOCK_TIMEOUT_MS 1000
#define CB_MESSAGE_ROUTER_MAX_LANES 1024
#define CB_MESSAGE_ROUTER_NAME_MAX 63

/* What happens when the ingress (in route) or a lane (in the dispatcher) is
 * full: how long to wait for room. Either way the item is counted in
 * `dropped` if it finally fails. */
typedef enum cb_message_router_policy {
  CB_MESSAGE_ROUTER_DROP = 0, /* wait not at all: fail at once */
  CB_MESSAGE_ROUTER_BLOCK = 1 /* wait up to block_timeout_ms, then fail */
} cb_message_router_policy;

/* Called on a router-owned lane thread with up to batch_size items, in lane
 * order. After the last batch it is called once more with items == NULL and
 * n == 0 (the end marker), on the same thread, so per-lane state (a
 * lua_State, say) can be closed where it was used. Must not call
 * cb_message_router_stop/free on its own router. */
typedef void (*cb_message_router_batch_cb)(void *ctx, int lane, void **items, size_t n);

typedef struct cb_message_router_config {
  int lanes;               /* 1..CB_MESSAGE_ROUTER_MAX_LANES */
  size_t ingress_capacity; /* items the ingress holds (>= batch_size) */
  size_t lane_capacity;    /* items each lane holds (>= 1) */
  size_t batch_size;       /* ingress hands over when this many wait */
  int batch_timeout_ms;    /* ...or when the oldest waited this long;
                                  0 = hand over as soon as anything waits */
  cb_message_router_policy policy;
  int block_timeout_ms;                /* BLOCK only; -1 = wait forever */
  cb_message_router_batch_cb on_batch; /* NULL: consumers call take() */
  void *on_batch_ctx;
  const char *name; /* NULL: unlisted; else (1..NAME_MAX bytes,
                                  copied) listed for cb_message_router_each
                                  while the router lives, and unique there */
} cb_message_router_config;

typedef struct cb_message_router_stats {
  uint64_t routed;            /* items placed in a lane queue */
  uint64_t dropped;           /* refused by a full ingress, or lost to a
                                   full lane after acceptance */
  uint64_t batches_sent;      /* ingress -> lanes hand-overs (a route
                                   call's direct hand-over counts as one) */
  uint64_t direct;            /* items route() put in their lanes itself:
                                   batch_timeout_ms 0, nothing waiting */
  uint64_t queue_full_events; /* times the dispatcher found a lane full */
  uint64_t routing_errors;    /* route calls refused: bad argument or the
                                   router was stopping */
  uint64_t delivered;         /* items handed to lane consumers by take */
  uint64_t latency_avg_ns;    /* route() accepted -> take() returned it, */
  uint64_t latency_max_ns;    /*   over `delivered` items (monotonic)    */
} cb_message_router_stats;

typedef struct cb_message_router cb_message_router;

/* Fills cfg with the defaults: lanes = min(32, online cores), capacities,
 * batching and timeouts from the CB_MESSAGE_ROUTER_DEFAULT_* values, DROP. */
void cb_message_router_config_init(cb_message_router_config *cfg);

/* Allocates a router and all its rings; cfg NULL means the defaults. The
 * router accepts route() at once (items wait in the ingress until start).
 * Returns CB_OK, CB_EINVAL (bad config), CB_EDUPLICATE (a listed router has
 * the name) or CB_ENOMEM; *out is set only on success. */
int cb_message_router_new(cb_message_router **out, const cb_message_router_config *cfg);

/* Stops the router if it is running (see stop) and frees it. Items still held
 * are the caller's; nothing is freed but the router's own memory. NULL ok. */
void cb_message_router_free(cb_message_router *router);

/* Starts the dispatcher thread, and the lane threads when on_batch is set.
 * Returns CB_OK, CB_ESTATE (already started or stopped), CB_ENOMEM (a
 * thread could not start; the router is then stopped) or CB_EINVAL (NULL). */
int cb_message_router_start(cb_message_router *router);

/* Refuses new items, hands everything left in the ingress to the lanes, then
 * marks every lane ended: consumers take what their lane holds and then get
 * CB_MESSAGE_ROUTER_END. Waits for the dispatcher and for router-owned lane
 * threads; does not wait for external consumers. Every accepted item is thus
 * either delivered or counted in `dropped` (a lane still full after
 * block_timeout_ms drops; with -1 stop waits for consumers to make room).
 * Works without start too (the drain then runs on the caller's thread).
 * Idempotent; returns CB_OK (CB_EINVAL for NULL). Not from an on_batch
 * callback. */
int cb_message_router_stop(cb_message_router *router);

/* Accepts item for the lane of key[0..len). The key is only read during the
 * call. Returns CB_OK when accepted; CB_ETIMEOUT when the ingress had no room
 * within the policy's wait (DROP: full, refused at once; BLOCK: still full
 * after block_timeout_ms), counted in `dropped`; CB_ECLOSED after stop, or
 * CB_EINVAL for key NULL with len > 0, both counted in `routing_errors`. On
 * failure the item is untouched and still the caller's. */
int cb_message_router_route(cb_message_router *router, const void *key, size_t len, void *item);

typedef struct cb_message_router_entry {
  const void *key;
  size_t len;
  void *item;
} cb_message_router_entry;

/* route() for n entries under one lock, in order: the fast path for a
 * producer that already holds a batch. Returns how many leading entries were
 * accepted (0..n); the rest failed as route() would have and were counted the
 * same way. Returns CB_ECLOSED or CB_EINVAL if nothing could be tried at
 * all. */
long cb_message_router_route_many(cb_message_router *router, const cb_message_router_entry *entries, size_t n);

/* Takes up to max items from lane into items[], oldest first. Waits up to
 * timeout_ms for the first one (-1 forever, 0 not at all). Returns the count
 * (> 0), 0 on timeout, CB_MESSAGE_ROUTER_END when the lane is ended and
 * empty, or CB_EINVAL. Batching happens in the ingress only (batch_size
 * items, or the oldest has waited batch_timeout_ms): a waiting consumer is
 * woken as soon as the dispatcher hands its lane anything, however few
 * items, and at stop. A call that does not wait takes whatever is there.
 * Keep one consumer per lane if order matters. Any thread; typically the
 * lane's own. */
int cb_message_router_take(cb_message_router *router, int lane, void **items, size_t max, int timeout_ms);

/* Lane that key[0..len) routes to: pure, the same as route() would pick.
 * CB_EINVAL for a NULL router, or key NULL with len > 0. */
int cb_message_router_lane_for(const cb_message_router *router, const void *key, size_t len);
/* The number of lanes; CB_EINVAL for a NULL router. */
int cb_message_router_lanes(const cb_message_router *router);

/* Snapshot of the counters (each is exact; they are read one by one). */
void cb_message_router_stats_get(cb_message_router *router, cb_message_router_stats *out);
size_t cb_message_router_ingress_depth(cb_message_router *router);
size_t cb_message_router_lane_depth(cb_message_router *router, int lane);

/* Calls visit for every named router of the process (what metrics report),
 * under a lock that cb_message_router_new and _free of named routers take:
 * visit may read the router (stats, depths) but not create or free one. */
typedef void (*cb_message_router_visit)(cb_message_router *router, const char *name, void *arg);
void cb_message_router_each(cb_message_router_visit visit, void *arg);

/* 64-bit hash of key bytes (Murmur3-style 8-byte blocks, fmix64 finish);
 * stable across runs and platforms. */
uint64_t cb_message_router_hash(const void *key, size_t len);

/* Jump consistent hash (Lamping & Veach 2014): bucket in [0, buckets) for a
 * well-mixed 64-bit key; growing buckets by one moves ~1/(buckets) keys.
 * Returns -1 if buckets < 1. */
int32_t cb_jump_hash(uint64_t key, int32_t buckets);

#ifdef __cplusplus
}
#endif

#endif /* COMMANDBUS_MESSAGE_ROUTER_H */
