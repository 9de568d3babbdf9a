/* commandbus: process events and the event sink (see events.h). */
#include "commandbus/events.h"

#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commandbus/bus.h"
#include "commandbus/uuid.h"
#include "internal.h"

#define DEFAULT_CAPACITY 1024
#define EVENT_TYPE_MAX 100

/* A ring of events waiting for the host. Writers on any thread push; the
 * host takes. Full: the new event is dropped and counted (best effort). */
struct cb_event_feed {
  pthread_mutex_t lock;
  int on;
  cb_process_event **ring;
  size_t capacity, head, count;
  uint64_t pushed, dropped;
};

struct cb_event_feed *cb_event_feed_new(void) {
  struct cb_event_feed *f = calloc(1, sizeof *f);
  if (f) pthread_mutex_init(&f->lock, NULL);
  return f;
}

static void drain(struct cb_event_feed *f) {
  for (; f->count; f->count--) {
    free(f->ring[f->head]);
    f->head = (f->head + 1) % f->capacity;
  }
  f->head = 0;
}

void cb_event_feed_free(struct cb_event_feed *f) {
  if (f == NULL) return;
  if (f->ring) drain(f);
  free(f->ring);
  pthread_mutex_destroy(&f->lock);
  free(f);
}

static const char *TERMINAL[] = {"COMPLETED", "COMPENSATED", "FAILED", "CANCELED", NULL};
/* Names the trigger gives events (see core/sql/003_process_events.sql). */
static const char *RESERVED[] = {"STARTED", "STEP_STARTED", "RESUMED", "WAITING_FOR_TSQ", "COMPENSATING", NULL};

static int listed(const char *const *names, const char *s) {
  for (int i = 0; names[i]; i++)
    if (strcmp(names[i], s) == 0) return 1;
  return 0;
}

int cb_event_is_terminal(const char *event_type) { return listed(TERMINAL, event_type); }

/* ---- the sink ------------------------------------------------------------------ */

int cb_events_sink_on(cb_runtime *rt, int capacity) {
  struct cb_event_feed *f = rt->events;
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

void cb_events_sink_off(cb_runtime *rt) {
  struct cb_event_feed *f = rt->events;
  pthread_mutex_lock(&f->lock);
  f->on = 0;
  if (f->ring) drain(f);
  pthread_mutex_unlock(&f->lock);
}

int cb_events_sink_is_on(cb_runtime *rt) {
  struct cb_event_feed *f = rt->events;
  pthread_mutex_lock(&f->lock);
  int on = f->on;
  pthread_mutex_unlock(&f->lock);
  return on;
}

int cb_events_take(cb_runtime *rt, cb_process_event **out, int max) {
  struct cb_event_feed *f = rt->events;
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

void cb_events_stats_get(cb_runtime *rt, cb_events_stats *s) {
  struct cb_event_feed *f = rt->events;
  pthread_mutex_lock(&f->lock);
  s->pushed = f->pushed;
  s->dropped = f->dropped;
  s->queued = f->count;
  s->capacity = f->capacity;
  pthread_mutex_unlock(&f->lock);
}

static void push(struct cb_event_feed *f, cb_process_event *e) {
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

/* ---- collecting what a transaction appended --------------------------------------- */

#define EVENT_COLUMNS \
  "domain, process_id::text AS process_id, sequence, event_type, step, status, data, created_at::text AS created_at"

int cb_events_add_begin(cb_unit *u) {
  return cb_unit_add(u, "SELECT set_config('commandbus.collect_events', 'on', true)", 0, NULL);
}

int cb_events_add_read(cb_unit *u) {
  return cb_unit_add(u,
                     "SELECT e->>'domain' AS domain, e->>'process_id' AS process_id, (e->>'sequence')::bigint"
                     " AS sequence, e->>'event_type' AS event_type, e->>'step' AS step, e->>'status' AS status,"
                     " e->'data' AS data, e->>'created_at' AS created_at FROM jsonb_array_elements(('['"
                     " || ltrim(coalesce(current_setting('commandbus.events', true), ''), ',') || ']')::jsonb) e",
                     0, NULL);
}

static cb_process_event *event_from_row(const cb_result *r, int row) {
  static const int cols[] = {0, 1, 3, 4, 5, 6, 7};
  static const size_t offsets[] = {offsetof(cb_process_event, domain),     offsetof(cb_process_event, process_id),
                                   offsetof(cb_process_event, event_type), offsetof(cb_process_event, step),
                                   offsetof(cb_process_event, status),     offsetof(cb_process_event, data_json),
                                   offsetof(cb_process_event, created_at)};
  cb_process_event *e =
      cb_result_pack(r, row, sizeof(cb_process_event), cols, offsets, (int)(sizeof cols / sizeof cols[0]));
  if (e) e->sequence = cb_result_int(r, row, 2);
  return e;
}

void cb_events_published(cb_runtime *rt, const cb_unit *u, int index) {
  const cb_result *r = index >= 0 ? cb_unit_result(u, index) : NULL;
  if (r == NULL) return;
  int on = cb_events_sink_is_on(rt);
  const char *last_domain = "", *last_process = "";
  for (int row = 0; row < cb_result_rows(r); row++) {
    const char *domain = cb_result_value(r, row, 0), *process = cb_result_value(r, row, 1);
    if (strcmp(domain, last_domain) || strcmp(process, last_process)) /* once per process in a row */
      cb_hub_changed(cb_runtime_hub(rt), domain, process);
    last_domain = domain;
    last_process = process;
    if (on && !cb_event_is_terminal(cb_result_value(r, row, 3))) {
      cb_process_event *e = event_from_row(r, row);
      if (e) push(rt->events, e);
    }
  }
}

/* ---- the log -------------------------------------------------------------------- */

static int check_process(const char *domain, const char *process_id, char *id, cb_err *err) {
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (!cb_uuid_parse(process_id, id))
    return cb_err_set(err, CB_EINVAL, "process id `%.60s` is not a UUID", process_id ? process_id : "");
  return CB_OK;
}

int cb_process_append_event(cb_runtime *rt, const char *domain, const char *process_id, const char *event_type,
                            const char *data_json, int64_t *sequence, cb_err *err) {
  char id[CB_UUID_LEN + 1];
  *sequence = 0;
  int rc = check_process(domain, process_id, id, err);
  if (rc != CB_OK) return rc;
  if (event_type == NULL || event_type[0] == '\0' || strlen(event_type) > EVENT_TYPE_MAX)
    return cb_err_set(err, CB_EINVAL, "event_type must be 1 to %d bytes", EVENT_TYPE_MAX);
  if (listed(RESERVED, event_type) || listed(TERMINAL, event_type))
    return cb_err_set(err, CB_EINVAL, "event_type `%s` is reserved for process changes", event_type);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {domain, id, event_type, data_json};
  cb_events_add_begin(u);
  int at = cb_unit_add(u, "SELECT commandbus.append_process_event($1, $2::uuid, $3, $4::jsonb)", 4,
                       params);
  int read = cb_events_add_read(u);
  rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22P02") == 0)
    rc = cb_err_set(err, CB_EINVAL, "event data is not valid JSON: %s", err->message);
  if (rc == CB_OK) {
    const cb_result *r = cb_unit_result(u, at);
    if (cb_result_is_null(r, 0, 0)) rc = cb_err_set(err, CB_ENOTFOUND, "unknown process `%s`", id);
    else if ((*sequence = cb_result_int(r, 0, 0)) < 0) {
      *sequence = 0;
      rc = cb_err_set(err, CB_ESTATE, "process %s has finished; it takes no more events", id);
    } else cb_events_published(rt, u, read);
  }
  cb_unit_free(u);
  return rc;
}

int cb_process_events(cb_runtime *rt, const char *domain, const char *process_id, int64_t after_sequence,
                      cb_unit **rows, cb_err *err) {
  char id[CB_UUID_LEN + 1], after[24];
  *rows = NULL;
  int rc = check_process(domain, process_id, id, err);
  if (rc != CB_OK) return rc;
  snprintf(after, sizeof after, "%lld", (long long)after_sequence);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {domain, id, after};
  cb_unit_add(u, "SELECT 1 FROM commandbus.process WHERE domain = $1 AND process_id = $2::uuid", 2, params);
  cb_unit_add(u,
              "SELECT " EVENT_COLUMNS " FROM commandbus.process_event"
              " WHERE domain = $1 AND process_id = $2::uuid AND sequence > $3::bigint ORDER BY sequence",
              3, params);
  rc = cb_bus_run_query(rt, u, rows, err);
  if (rc == CB_OK && cb_result_rows(cb_unit_result(*rows, 0)) == 0) {
    cb_unit_free(*rows);
    *rows = NULL;
    return cb_err_set(err, CB_ENOTFOUND, "unknown process `%s`", id);
  }
  return rc;
}

int cb_process_add_purge(cb_unit *u, const char *domain, const char *older_than, const char *limit) {
  const char *params[] = {domain, older_than, limit};
  /* Their events and process_audit rows go alongside (neither table has a
   * foreign key: rcmd's schema, and a cheaper append). SKIP LOCKED: two
   * purges at once take different processes. */
  return cb_unit_add(u,
                     "WITH p AS (DELETE FROM commandbus.process x WHERE x.domain = $1 AND x.process_id = ANY(ARRAY("
                     " SELECT process_id FROM commandbus.process WHERE domain = $1"
                     " AND status IN ('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELED')"
                     " AND completed_at < now() - coalesce(make_interval(secs => $2::float8),"
                     " (SELECT r.processes FROM commandbus.retention_of($1) r))"
                     " ORDER BY completed_at LIMIT $3::int FOR UPDATE SKIP LOCKED)) RETURNING process_id),"
                     " a AS (DELETE FROM commandbus.process_audit x USING p WHERE x.domain = $1"
                     " AND x.process_id = p.process_id),"
                     " e AS (DELETE FROM commandbus.process_event x USING p WHERE x.domain = $1"
                     " AND x.process_id = p.process_id)"
                     " SELECT count(*) FROM p",
                     3, params);
}

int cb_process_purge(cb_runtime *rt, const char *domain, double older_than, int64_t *count, cb_err *err) {
  *count = 0;
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (!(older_than >= 0)) return cb_err_set(err, CB_EINVAL, "older_than must be a number of seconds >= 0");
  char secs[32];
  snprintf(secs, sizeof secs, "%.3f", older_than);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  int at = cb_process_add_purge(u, domain, secs, NULL);
  rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_OK) *count = cb_result_int(cb_unit_result(u, at), 0, 0);
  cb_unit_free(u);
  return rc;
}
