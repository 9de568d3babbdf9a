/* commandbus: the event feed (see event_feed.h). */
#include "commandbus/event_feed.h"

#include <pthread.h>
#include <stdlib.h>

#include "commandbus/error.h"

#define DEFAULT_CAPACITY 1024

/* A ring of events waiting for the host. */
struct cb_event_feed {
  pthread_mutex_t lock;
  int on;
  cb_process_event **ring;
  size_t capacity, head, count;
  uint64_t pushed, dropped;
};

cb_event_feed *cb_event_feed_new(void) {
  cb_event_feed *f = calloc(1, sizeof *f);
  if (f) pthread_mutex_init(&f->lock, NULL);
  return f;
}

static void drain(cb_event_feed *f) {
  for (; f->count; f->count--) {
    free(f->ring[f->head]);
    f->head = (f->head + 1) % f->capacity;
  }
  f->head = 0;
}

void cb_event_feed_free(cb_event_feed *f) {
  if (f == NULL) return;
  if (f->ring) drain(f);
  free(f->ring);
  pthread_mutex_destroy(&f->lock);
  free(f);
}

int cb_event_feed_on(cb_event_feed *f, int capacity) {
  size_t want = capacity > 0 ? (size_t)capacity : DEFAULT_CAPACITY;
  pthread_mutex_lock(&f->lock);
  if (want != f->capacity) {
    cb_process_event **ring = calloc(want, sizeof *ring);
    if (ring) { /* keep the oldest that fit, drop (and count) the rest */
      size_t keep = f->count < want ? f->count : want;
      for (size_t i = 0; i < f->count; i++) {
        cb_process_event *e = f->ring[(f->head + i) % f->capacity];
        if (i < keep) ring[i] = e;
        else {
          free(e);
          f->dropped++;
        }
      }
      free(f->ring);
      f->ring = ring;
      f->capacity = want;
      f->head = 0;
      f->count = keep;
    }
  }
  f->on = f->ring != NULL;
  int rc = f->capacity == want ? CB_OK : CB_ENOMEM;
  pthread_mutex_unlock(&f->lock);
  return rc;
}

void cb_event_feed_off(cb_event_feed *f) {
  pthread_mutex_lock(&f->lock);
  f->on = 0;
  if (f->ring) drain(f);
  pthread_mutex_unlock(&f->lock);
}

int cb_event_feed_is_on(cb_event_feed *f) {
  pthread_mutex_lock(&f->lock);
  int on = f->on;
  pthread_mutex_unlock(&f->lock);
  return on;
}

void cb_event_feed_push(cb_event_feed *f, cb_process_event *e) {
  pthread_mutex_lock(&f->lock);
  if (f->on && f->count < f->capacity) {
    f->ring[(f->head + f->count) % f->capacity] = e;
    f->count++;
    f->pushed++;
    e = NULL;
  } else if (f->on) {
    f->dropped++;
  }
  pthread_mutex_unlock(&f->lock);
  free(e);
}

int cb_event_feed_take(cb_event_feed *f, cb_process_event **out, int max) {
  int n = 0;
  pthread_mutex_lock(&f->lock);
  while (n < max && f->count) {
    out[n++] = f->ring[f->head];
    f->head = (f->head + 1) % f->capacity;
    f->count--;
  }
  pthread_mutex_unlock(&f->lock);
  return n;
}

void cb_event_feed_stats(cb_event_feed *f, cb_events_stats *s) {
  pthread_mutex_lock(&f->lock);
  s->pushed = f->pushed;
  s->dropped = f->dropped;
  s->queued = f->count;
  s->capacity = f->capacity;
  pthread_mutex_unlock(&f->lock);
}
