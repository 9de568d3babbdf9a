/* commandbus: the event feed, a bounded queue of process events waiting for
 * the host.
 *
 * Each runtime owns one (cb_runtime_event_feed), as it owns its hub; events.h
 * pushes the events that writers committed and hands them to the host. The
 * feed knows nothing of PostgreSQL: writers on any thread push, the host
 * takes, under the feed's own lock. It is off (and empty) until turned on.
 * When full, a new event is dropped and counted: best effort, so that a slow
 * host never holds a writer back. */
#ifndef COMMANDBUS_EVENT_FEED_H
#define COMMANDBUS_EVENT_FEED_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cb_process_event {
  int64_t sequence;
  const char *domain;
  const char *process_id;
  const char *event_type;
  const char *step;       /* NULL when the process has no step */
  const char *status;     /* the process's status when the event was appended */
  const char *data_json;  /* a JSON object */
  const char *created_at; /* PostgreSQL's text form */
} cb_process_event;       /* one allocation: free() releases it */

typedef struct cb_events_stats {
  uint64_t pushed;  /* queued for the host */
  uint64_t dropped; /* did not fit */
  size_t queued;    /* waiting now */
  size_t capacity;
} cb_events_stats;

typedef struct cb_event_feed cb_event_feed;

/* NULL when out of memory. */
cb_event_feed *cb_event_feed_new(void);
void cb_event_feed_free(cb_event_feed *f); /* frees what is queued */

/* Turns the feed on with room for `capacity` events (<= 0: 1024), or
 * changes its capacity (events already queued stay, as many as fit; the
 * rest are dropped and counted). CB_ENOMEM when the queue cannot be made
 * (the capacity stays as it was). */
int cb_event_feed_on(cb_event_feed *f, int capacity);
void cb_event_feed_off(cb_event_feed *f); /* drops what is queued */
int cb_event_feed_is_on(cb_event_feed *f);
/* Takes e (frees it when the feed is off or full). */
void cb_event_feed_push(cb_event_feed *f, cb_process_event *e);
/* Moves up to max queued events to out (oldest first; caller frees each);
 * returns how many. Never blocks on anything but the feed's lock. */
int cb_event_feed_take(cb_event_feed *f, cb_process_event **out, int max);
void cb_event_feed_stats(cb_event_feed *f, cb_events_stats *stats);

#ifdef __cplusplus
}
#endif
#endif
