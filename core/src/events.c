/* commandbus: collecting the process events a transaction appended, and the
 * sink (see events.h). The queue itself is the runtime's event feed. */
#include "commandbus/events.h"

#include <stddef.h>
#include <string.h>

#include "commandbus/event_feed.h"
#include "commandbus/hub.h"

static const char *TERMINAL[] = {"COMPLETED", "COMPENSATED", "FAILED", "CANCELED", NULL};

int cb_event_is_terminal(const char *event_type) {
  for (int i = 0; TERMINAL[i]; i++)
    if (strcmp(TERMINAL[i], event_type) == 0) return 1;
  return 0;
}

/* ---- the sink ------------------------------------------------------------------ */

int cb_events_sink_on(cb_runtime *rt, int capacity) { return cb_event_feed_on(cb_runtime_event_feed(rt), capacity); }
void cb_events_sink_off(cb_runtime *rt) { cb_event_feed_off(cb_runtime_event_feed(rt)); }
int cb_events_sink_is_on(cb_runtime *rt) { return cb_event_feed_is_on(cb_runtime_event_feed(rt)); }

int cb_events_take(cb_runtime *rt, cb_process_event **out, int max) {
  return cb_event_feed_take(cb_runtime_event_feed(rt), out, max);
}

void cb_events_stats_get(cb_runtime *rt, cb_events_stats *s) { cb_event_feed_stats(cb_runtime_event_feed(rt), s); }

/* ---- collecting what a transaction appended --------------------------------------- */

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
  cb_process_event *e = cb_result_pack(r, row, sizeof(cb_process_event), cols, offsets,
                                       (int)(sizeof cols / sizeof cols[0]));
  if (e) e->sequence = cb_result_int(r, row, 2);
  return e;
}

void cb_events_published(cb_runtime *rt, const cb_unit *u, int index) {
  const cb_result *r = index >= 0 ? cb_unit_result(u, index) : NULL;
  if (r == NULL) return;
  cb_event_feed *feed = cb_runtime_event_feed(rt);
  int on = cb_event_feed_is_on(feed);
  const char *last_domain = "", *last_process = "";
  for (int row = 0; row < cb_result_rows(r); row++) {
    const char *domain = cb_result_value(r, row, 0), *process = cb_result_value(r, row, 1);
    if (strcmp(domain, last_domain) || strcmp(process, last_process)) /* once per process in a row */
      cb_hub_changed(cb_runtime_hub(rt), domain, process);
    last_domain = domain;
    last_process = process;
    if (on && !cb_event_is_terminal(cb_result_value(r, row, 3))) {
      cb_process_event *e = event_from_row(r, row);
      if (e) cb_event_feed_push(feed, e);
    }
  }
}
