/* commandbus: the change hub (see hub.h).
 *
 * One mutex guards the whole table; waits use one condition variable per
 * entry, so a notify wakes only that key's waiters, and an entry chains its
 * armed subscriptions, whose callbacks the bumping thread calls after it
 * let go of the mutex. Entries are reference counted by their subscriptions
 * and freed with the last one. */
#include "commandbus/hub.h"

#include "commandbus/error.h"

#include <errno.h>
#include <stdio.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct hub_entry {
  struct hub_entry *next; /* bucket chain */
  uint64_t hash;
  uint64_t version;
  int subscribers;
  int is_record;            /* a record-change key (cb_hub_change_key) */
  struct cb_hub_sub *armed; /* subscriptions armed on this key (cb_hub_arm) */
  pthread_cond_t changed;
  char key[];
} hub_entry;

struct cb_hub {
  pthread_mutex_t lock; /* guards everything below and every entry */
  hub_entry **buckets;
  size_t nbuckets; /* a power of two */
  size_t count;
  size_t record_waiters; /* subscriptions to record-change keys */
  int closed;
};

struct cb_hub_sub {
  cb_hub *hub;
  hub_entry *entry;
  uint64_t seen;
  /* While armed: what the next bump calls, and the entry's chain of armed
   * subscriptions. Guarded by the hub's lock. */
  int armed;
  cb_hub_fire_fn fire;
  void *fire_arg;
  struct cb_hub_sub *next_armed;
};

static uint64_t hash_key(const char *key) {
  uint64_t h = 1469598103934665603ULL; /* FNV-1a, then a final mix */
  for (const unsigned char *p = (const unsigned char *)key; *p; p++) {
    h ^= *p;
    h *= 1099511628211ULL;
  }
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return h;
}

cb_hub *cb_hub_new(void) {
  cb_hub *hub = calloc(1, sizeof *hub);
  if (hub == NULL) return NULL;
  hub->nbuckets = 64;
  hub->buckets = calloc(hub->nbuckets, sizeof *hub->buckets);
  if (hub->buckets == NULL) {
    free(hub);
    return NULL;
  }
  pthread_mutex_init(&hub->lock, NULL);
  return hub;
}

void cb_hub_free(cb_hub *hub) {
  if (hub == NULL) return;
  for (size_t i = 0; i < hub->nbuckets; i++) {
    hub_entry *e = hub->buckets[i];
    while (e) {
      hub_entry *next = e->next;
      pthread_cond_destroy(&e->changed);
      free(e);
      e = next;
    }
  }
  pthread_mutex_destroy(&hub->lock);
  free(hub->buckets);
  free(hub);
}

static hub_entry *find(cb_hub *hub, const char *key, uint64_t h) {
  for (hub_entry *e = hub->buckets[h & (hub->nbuckets - 1)]; e; e = e->next)
    if (e->hash == h && strcmp(e->key, key) == 0) return e;
  return NULL;
}

/* Doubles the bucket array when the table is dense; failure only costs speed. */
static void maybe_grow(cb_hub *hub) {
  if (hub->count < hub->nbuckets * 2) return;
  size_t n = hub->nbuckets * 2;
  hub_entry **b = calloc(n, sizeof *b);
  if (b == NULL) return;
  for (size_t i = 0; i < hub->nbuckets; i++) {
    hub_entry *e = hub->buckets[i];
    while (e) {
      hub_entry *next = e->next;
      e->next = b[e->hash & (n - 1)];
      b[e->hash & (n - 1)] = e;
      e = next;
    }
  }
  free(hub->buckets);
  hub->buckets = b;
  hub->nbuckets = n;
}

cb_hub_sub *cb_hub_subscribe(cb_hub *hub, const char *key) {
  cb_hub_sub *sub = malloc(sizeof *sub);
  if (sub == NULL) return NULL;
  uint64_t h = hash_key(key);
  pthread_mutex_lock(&hub->lock);
  hub_entry *e = find(hub, key, h);
  if (e == NULL) {
    size_t len = strlen(key);
    e = calloc(1, sizeof *e + len + 1);
    if (e == NULL) {
      pthread_mutex_unlock(&hub->lock);
      free(sub);
      return NULL;
    }
    memcpy(e->key, key, len + 1);
    e->hash = h;
    e->is_record = strncmp(key, CB_HUB_CHANGE_CHANNEL ":", sizeof CB_HUB_CHANGE_CHANNEL) == 0;
    pthread_cond_init(&e->changed, NULL);
    maybe_grow(hub);
    size_t b = h & (hub->nbuckets - 1);
    e->next = hub->buckets[b];
    hub->buckets[b] = e;
    hub->count++;
  }
  e->subscribers++;
  hub->record_waiters += (size_t)e->is_record;
  sub->hub = hub;
  sub->entry = e;
  sub->seen = e->version;
  sub->armed = 0;
  sub->fire = NULL;
  sub->fire_arg = NULL;
  sub->next_armed = NULL;
  pthread_mutex_unlock(&hub->lock);
  return sub;
}

/* Takes sub out of its entry's chain of armed subscriptions. Under the lock. */
static void unlink_armed(cb_hub_sub *sub) {
  cb_hub_sub **pp = &sub->entry->armed;
  while (*pp != sub) pp = &(*pp)->next_armed;
  *pp = sub->next_armed;
  sub->next_armed = NULL;
  sub->armed = 0;
}

/* What a bump calls for one armed subscription, copied under the lock: the
 * subscription itself is not touched once the lock is let go, as its owner
 * may then arm it again (a disarm that found it taken tells the owner its
 * callback is coming, not that it has run) or unsubscribe it. */
typedef struct hub_fire {
  cb_hub_fire_fn fn;
  void *arg;
} hub_fire;

#define FIRE_BATCH 16 /* callbacks taken at a time; more wait for the next turn of the lock */

/* Takes, into out (room at most), the entry's armed subscriptions that a
 * bump has passed: each was armed when its version was the entry's (see
 * cb_hub_arm), so one that has not seen the entry's version was armed
 * before a bump whose callback is still owed, and one armed since has.
 * They count the change as seen. Returns how many. Under the lock. */
static int take_armed(hub_entry *e, hub_fire *out, int room) {
  int n = 0;
  cb_hub_sub **pp = &e->armed;
  while (*pp && n < room) {
    cb_hub_sub *sub = *pp;
    if (sub->seen == e->version) {
      pp = &sub->next_armed;
      continue;
    }
    *pp = sub->next_armed;
    sub->next_armed = NULL;
    sub->armed = 0;
    sub->seen = e->version;
    out[n++] = (hub_fire){sub->fire, sub->fire_arg};
  }
  return n;
}

/* Outside the lock. */
static void call_fired(const hub_fire *fired, int n) {
  for (int i = 0; i < n; i++) fired[i].fn(fired[i].arg);
}

void cb_hub_unsubscribe(cb_hub_sub *sub) {
  if (sub == NULL) return;
  cb_hub *hub = sub->hub;
  hub_entry *e = sub->entry;
  pthread_mutex_lock(&hub->lock);
  if (sub->armed) unlink_armed(sub);
  hub->record_waiters -= (size_t)e->is_record;
  if (--e->subscribers == 0) {
    hub_entry **pp = &hub->buckets[e->hash & (hub->nbuckets - 1)];
    while (*pp != e) pp = &(*pp)->next;
    *pp = e->next;
    hub->count--;
    pthread_cond_destroy(&e->changed);
    free(e);
  }
  pthread_mutex_unlock(&hub->lock);
  free(sub);
}

uint64_t cb_hub_sub_version(const cb_hub_sub *sub) { return sub->seen; }

int cb_hub_wait(cb_hub_sub *sub, int timeout_ms) {
  cb_hub *hub = sub->hub;
  hub_entry *e = sub->entry;
  struct timespec deadline;
  if (timeout_ms >= 0) {
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
      deadline.tv_sec++;
      deadline.tv_nsec -= 1000000000L;
    }
  }
  int rc = 0;
  pthread_mutex_lock(&hub->lock);
  for (;;) {
    if (hub->closed) {
      rc = CB_ECLOSED;
      break;
    }
    if (e->version != sub->seen) {
      sub->seen = e->version;
      rc = 1;
      break;
    }
    if (timeout_ms < 0) {
      pthread_cond_wait(&e->changed, &hub->lock);
    } else if (pthread_cond_timedwait(&e->changed, &hub->lock, &deadline) == ETIMEDOUT) {
      if (e->version != sub->seen) continue; /* changed just as time ran out */
      rc = hub->closed ? CB_ECLOSED : 0;
      break;
    }
  }
  pthread_mutex_unlock(&hub->lock);
  return rc;
}

int cb_hub_arm(cb_hub_sub *sub, cb_hub_fire_fn fn, void *arg) {
  cb_hub *hub = sub->hub;
  hub_entry *e = sub->entry;
  int rc = 0;
  pthread_mutex_lock(&hub->lock);
  if (hub->closed) {
    rc = CB_ECLOSED;
  } else if (e->version != sub->seen) {
    sub->seen = e->version;
    rc = 1;
  } else if (!sub->armed) {
    sub->armed = 1;
    sub->fire = fn;
    sub->fire_arg = arg;
    sub->next_armed = e->armed;
    e->armed = sub;
  }
  pthread_mutex_unlock(&hub->lock);
  return rc;
}

int cb_hub_disarm(cb_hub_sub *sub) {
  cb_hub *hub = sub->hub;
  pthread_mutex_lock(&hub->lock);
  int was_armed = sub->armed;
  if (was_armed) unlink_armed(sub);
  pthread_mutex_unlock(&hub->lock);
  return was_armed ? 0 : 1;
}

void cb_hub_notify(cb_hub *hub, const char *key) {
  uint64_t h = hash_key(key);
  hub_fire fired[FIRE_BATCH];
  int n, bumped = 0;
  do { /* once, unless more than a batch are armed on the key */
    n = 0;
    pthread_mutex_lock(&hub->lock);
    hub_entry *e = find(hub, key, h);
    if (e && !bumped) {
      e->version++;
      pthread_cond_broadcast(&e->changed);
    }
    bumped = 1;
    if (e) n = take_armed(e, fired, FIRE_BATCH);
    pthread_mutex_unlock(&hub->lock);
    call_fired(fired, n);
  } while (n == FIRE_BATCH);
}

/* Bumps every key (and closes the hub first, with `close`), then calls the
 * armed subscriptions' callbacks a batch at a time, letting go of the lock
 * for each batch. */
static void bump_all(cb_hub *hub, int close) {
  hub_fire fired[FIRE_BATCH];
  pthread_mutex_lock(&hub->lock);
  if (close) hub->closed = 1;
  for (size_t i = 0; i < hub->nbuckets; i++)
    for (hub_entry *e = hub->buckets[i]; e; e = e->next) {
      e->version++;
      pthread_cond_broadcast(&e->changed);
    }
  for (;;) {
    int n = 0;
    for (size_t i = 0; i < hub->nbuckets && n < FIRE_BATCH; i++)
      for (hub_entry *e = hub->buckets[i]; e && n < FIRE_BATCH; e = e->next)
        n += take_armed(e, fired + n, FIRE_BATCH - n);
    pthread_mutex_unlock(&hub->lock);
    call_fired(fired, n);
    if (n < FIRE_BATCH) return;
    pthread_mutex_lock(&hub->lock);
  }
}

void cb_hub_notify_all(cb_hub *hub) { bump_all(hub, 0); }

void cb_hub_close(cb_hub *hub) { bump_all(hub, 1); }

size_t cb_hub_size(cb_hub *hub) {
  pthread_mutex_lock(&hub->lock);
  size_t n = hub->count;
  pthread_mutex_unlock(&hub->lock);
  return n;
}

size_t cb_hub_record_waiters(cb_hub *hub) {
  pthread_mutex_lock(&hub->lock);
  size_t n = hub->record_waiters;
  pthread_mutex_unlock(&hub->lock);
  return n;
}

void cb_hub_change_key(const char *domain, const char *id, char *out) {
  snprintf(out, CB_HUB_KEY_MAX, CB_HUB_CHANGE_CHANNEL ":%s:%s", domain, id);
}

void cb_hub_changed(cb_hub *hub, const char *domain, const char *id) {
  char key[CB_HUB_KEY_MAX];
  cb_hub_change_key(domain, id, key);
  cb_hub_notify(hub, key);
}
