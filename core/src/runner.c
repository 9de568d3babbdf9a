/* commandbus: the runner registry and its heartbeats (see runner.h).
 *
 * Threads: the list of runners is guarded by the registry's lock, which is
 * also held while runners report (so a runner being removed waits for a
 * report in progress). Nothing blocks on the runtime under that lock: rows
 * are built under it and written after. The heartbeat timer lives on the
 * loop thread; fields marked [loop] are touched only there. */
#include "commandbus/runner.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "commandbus/log.h"
#include "strbuf.h"

struct cb_runner_registry {
  cb_runtime *rt; /* [init] */
  char host[64];  /* [init] */
  int pid;        /* [init] */
  pthread_mutex_t lock;
  cb_runner *runners; /* [lock] */
  uv_timer_t timer;   /* [loop] */
  int timer_on;       /* [loop] */
  int beating;        /* [loop] a timer's heartbeat is on its way */
  int failing;        /* [loop] heartbeats fail: logged once */
};

static double now_unix(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The runtime keeps the registry (a part of it, made on first use) and
 * frees it after its loop thread was joined (the timer is closed then). */
static void *registry_new(cb_runtime *rt) {
  struct cb_runner_registry *reg = calloc(1, sizeof *reg);
  if (reg == NULL) return NULL;
  reg->rt = rt;
  if (gethostname(reg->host, sizeof reg->host) != 0) snprintf(reg->host, sizeof reg->host, "unknown");
  reg->host[sizeof reg->host - 1] = '\0';
  reg->pid = (int)getpid();
  pthread_mutex_init(&reg->lock, NULL);
  return reg;
}

static void registry_free(void *state) {
  struct cb_runner_registry *reg = state;
  pthread_mutex_destroy(&reg->lock);
  free(reg);
}

static const cb_runtime_part REGISTRY = {registry_new, registry_free};

static struct cb_runner_registry *registry(cb_runtime *rt) { return cb_runtime_part_of(rt, &REGISTRY); }

/* ---- snapshots and rows --------------------------------------------------------- */

static void snapshot(const struct cb_runner_registry *reg, const cb_runner *r, cb_runner_stat *s) {
  memset(s, 0, sizeof *s);
  s->lanes = r->lanes;
  s->nlane_depths = r->router ? cb_message_router_lanes(r->router) : 0;
  for (int i = 0; i < s->nlane_depths; i++) s->lane_depths[i] = (uint32_t)cb_message_router_lane_depth(r->router, i);
  r->report(r->self, s);
  snprintf(s->kind, sizeof s->kind, "%s", r->kind);
  snprintf(s->domain, sizeof s->domain, "%s", r->domain);
  snprintf(s->runner_id, sizeof s->runner_id, "%s", r->id);
  snprintf(s->host, sizeof s->host, "%s", reg->host);
  s->pid = reg->pid;
  s->started_at = r->started_at;
  s->heartbeat_at = now_unix();
}

static void append_row(cb_strbuf *b, const cb_runner_stat *s) {
  cb_strbuf_putc(b, b->len ? ',' : '[');
  cb_strbuf_printf(b, "{\"id\":\"%s\",\"kind\":", s->runner_id);
  cb_strbuf_json_string(b, s->kind);
  cb_strbuf_puts(b, ",\"domain\":");
  cb_strbuf_json_string(b, s->domain);
  cb_strbuf_puts(b, ",\"host\":");
  cb_strbuf_json_string(b, s->host);
  cb_strbuf_puts(b, ",\"state\":");
  cb_strbuf_json_string(b, s->state[0] ? s->state : "running");
  cb_strbuf_printf(b,
                   ",\"pid\":%d,\"lanes\":%d,\"in_flight\":%d,\"successes\":%llu,\"failures\":%llu,\"retries\":%llu,"
                   "\"consecutive_failures\":%llu,\"stuck\":%llu,\"poison\":%llu,\"applied\":%llu,\"rejected\":%llu,"
                   "\"last_success_at\":%.6f,\"started_at\":%.6f,\"lane_depths\":[",
                   s->pid, s->lanes, s->in_flight, (unsigned long long)s->successes, (unsigned long long)s->failures,
                   (unsigned long long)s->retries, (unsigned long long)s->consecutive_failures,
                   (unsigned long long)s->stuck, (unsigned long long)s->poison, (unsigned long long)s->applied,
                   (unsigned long long)s->rejected, s->last_success_at, s->started_at);
  for (int i = 0; i < s->nlane_depths; i++) cb_strbuf_printf(b, i ? ",%u" : "%u", s->lane_depths[i]);
  cb_strbuf_puts(b, "],\"removed\":[");
  for (int i = 0; i < CB_RUNNER_REMOVED_KINDS; i++) cb_strbuf_printf(b, i ? ",%lld" : "%lld", (long long)s->removed[i]);
  cb_strbuf_printf(b, "],\"scheduled\":%llu}", (unsigned long long)s->scheduled);
}

/* One statement upserts every row of `rows` (a JSON array) and clears rows
 * of runners gone for a day. */
static cb_unit *rows_unit(cb_strbuf *rows) {
  cb_strbuf_putc(rows, ']');
  cb_unit *u = cb_unit_new();
  if (u == NULL || rows->failed) {
    cb_unit_free(u);
    return NULL;
  }
  char interval[32];
  snprintf(interval, sizeof interval, "%g", CB_RUNNER_HEARTBEAT_S);
  const char *params[] = {rows->data, interval};
  int rc = cb_unit_add(
      u,
      "WITH i AS (SELECT * FROM jsonb_to_recordset($1::jsonb) AS x(id uuid, kind text, domain text, host text,"
      " pid int, state text, lanes int, in_flight int, successes bigint, failures bigint, retries bigint,"
      " consecutive_failures bigint, stuck bigint, poison bigint, applied bigint, rejected bigint,"
      " last_success_at float8, started_at float8, lane_depths int[], removed bigint[], scheduled bigint)),"
      " w AS (INSERT INTO commandbus.runner AS r (runner_id, kind, domain, host, pid, state, lanes, in_flight,"
      " successes, failures, retries, consecutive_failures, stuck, poison, applied, rejected, lane_depths,"
      " removed, scheduled, last_success_at, started_at, heartbeat_at, heartbeat_interval)"
      " SELECT id, kind, domain, host, pid, state, lanes, in_flight, successes, failures, retries,"
      " consecutive_failures, stuck, poison, applied, rejected, lane_depths, removed, scheduled,"
      " CASE WHEN last_success_at > 0 THEN to_timestamp(last_success_at) END, to_timestamp(started_at), now(),"
      " $2::float8 FROM i"
      " ON CONFLICT (runner_id) DO UPDATE SET state = excluded.state, lanes = excluded.lanes,"
      " in_flight = excluded.in_flight, successes = excluded.successes, failures = excluded.failures,"
      " retries = excluded.retries, consecutive_failures = excluded.consecutive_failures, stuck = excluded.stuck,"
      " poison = excluded.poison, applied = excluded.applied, rejected = excluded.rejected,"
      " lane_depths = excluded.lane_depths, removed = excluded.removed, scheduled = excluded.scheduled,"
      " last_success_at = excluded.last_success_at,"
      " heartbeat_at = excluded.heartbeat_at, heartbeat_interval = excluded.heartbeat_interval)"
      " DELETE FROM commandbus.runner WHERE heartbeat_at < now() - interval '1 day'",
      2, params);
  if (rc < 0) {
    cb_unit_free(u);
    return NULL;
  }
  return u;
}

/* Loop: heartbeats are news, not duties; a failure is told once per outage. */
static void note_result(struct cb_runner_registry *reg, const cb_unit *u) {
  if (cb_unit_status(u) == CB_OK) {
    if (reg->failing) cb_log(CB_LOG_INFO, "heartbeats of workers and reply routers are recorded again");
    reg->failing = 0;
  } else if (!reg->failing && cb_unit_status(u) != CB_ECLOSED) {
    const cb_err *e = cb_unit_error(u);
    cb_log(CB_LOG_WARN, "cannot record the heartbeats of workers and reply routers (%s: %s)%s; trying again every %g s",
           cb_strerror(e->code), e->message,
           strcmp(e->sqlstate, "42P01") == 0 || strcmp(e->sqlstate, "42703") == 0
               ? " - the schema predates them: run setup"
               : "",
           CB_RUNNER_HEARTBEAT_S);
    reg->failing = 1;
  }
}

static void on_written(cb_unit *u, void *arg) {
  note_result(arg, u);
  cb_unit_free(u);
}

static void on_beat_written(cb_unit *u, void *arg) {
  struct cb_runner_registry *reg = arg;
  reg->beating = 0;
  on_written(u, reg);
}

/* Writes one runner's row (with `state`, unless NULL): from the loop
 * without waiting, else blocking when `wait` (a last row must land before
 * its bus may close). */
static void write_one(cb_runner *r, const char *state, int wait) {
  struct cb_runner_registry *reg = registry(r->rt);
  if (reg == NULL) return; /* a runtime inherited through a fork: not this process's to write */
  cb_runner_stat s;
  snapshot(reg, r, &s);
  if (state) snprintf(s.state, sizeof s.state, "%s", state);
  cb_strbuf rows = {0};
  append_row(&rows, &s);
  cb_unit *u = rows_unit(&rows);
  cb_strbuf_free(&rows);
  if (u == NULL) return;
  if (wait && !cb_runtime_on_loop(r->rt)) {
    cb_err ignored; /* told by the timer's writes, if it lasts */
    cb_runtime_exec(r->rt, u, &ignored);
    cb_unit_free(u);
    return;
  }
  cb_unit_on_done(u, on_written, reg);
  if (cb_runtime_submit(r->rt, &u, 1) != CB_OK) cb_unit_free(u);
}

/* ---- the heartbeat timer (loop) --------------------------------------------------- */

static void on_beat(uv_timer_t *t) {
  struct cb_runner_registry *reg = t->data;
  if (reg->beating) return; /* the database is slow: skip a beat rather than pile them up */
  cb_strbuf rows = {0};
  pthread_mutex_lock(&reg->lock);
  for (cb_runner *r = reg->runners; r; r = r->next) {
    cb_runner_stat s;
    snapshot(reg, r, &s);
    append_row(&rows, &s);
  }
  pthread_mutex_unlock(&reg->lock);
  if (rows.len == 0) return;
  cb_unit *u = rows_unit(&rows);
  cb_strbuf_free(&rows);
  if (u == NULL) return;
  cb_unit_on_done(u, on_beat_written, reg);
  reg->beating = 1;
  if (cb_runtime_submit(reg->rt, &u, 1) != CB_OK) {
    reg->beating = 0;
    cb_unit_free(u);
  }
}

static void start_timer(cb_runtime *rt, void *arg) {
  struct cb_runner_registry *reg = arg;
  if (reg->timer_on || cb_runtime_is_closed(rt)) return; /* closing: the loop's handles are being closed */
  uint64_t ms = (uint64_t)(CB_RUNNER_HEARTBEAT_S * 1000);
  uv_timer_init(cb_runtime_loop(rt), &reg->timer);
  reg->timer.data = reg;
  uv_timer_start(&reg->timer, on_beat, ms, ms);
  reg->timer_on = 1; /* closed with the loop's other handles when the runtime closes */
}

/* ---- runners ---------------------------------------------------------------------- */

static void on_signal(int signum, void *arg) {
  cb_runner *r = arg;
  cb_log(CB_LOG_INFO, "%s %s: %s received; stopping", strcmp(r->kind, "reply_router") == 0 ? "reply router" : r->kind,
         r->domain, signum == SIGINT ? "SIGINT" : "SIGTERM");
  r->stop(r->self);
}

int cb_runner_start(cb_runtime *rt, cb_runner *r, cb_err *err) {
  if (r->registered) return CB_OK;
  struct cb_runner_registry *reg = registry(rt);
  if (reg == NULL) {
    int rc = cb_runtime_check(rt, err);
    return rc != CB_OK ? rc : cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  r->rt = rt;
  cb_uuid_v7(r->id);
  r->started_at = now_unix();
  r->signal_watch = 0;
  if (r->stop_on_signals) {
    int id = cb_runtime_watch_signals(rt, on_signal, r);
    if (id < 0) return cb_err_set(err, id, "cannot watch SIGINT and SIGTERM: %s", cb_strerror(id));
    r->signal_watch = id;
  }
  pthread_mutex_lock(&reg->lock);
  r->next = reg->runners;
  reg->runners = r;
  r->registered = 1;
  pthread_mutex_unlock(&reg->lock);
  if (cb_runtime_on_loop(rt)) start_timer(rt, reg);
  else cb_runtime_call(rt, start_timer, reg);
  write_one(r, NULL, 0);
  return CB_OK;
}

void cb_runner_stopped(cb_runner *r) {
  if (!r->registered) return;
  cb_runtime_unwatch_signals(r->rt, r->signal_watch);
  r->signal_watch = 0;
  write_one(r, "stopped", 0);
}

void cb_runner_remove(cb_runner *r) {
  if (!r->registered) return;
  cb_runtime_unwatch_signals(r->rt, r->signal_watch);
  r->signal_watch = 0;
  struct cb_runner_registry *reg = registry(r->rt);
  if (reg) {
    pthread_mutex_lock(&reg->lock);
    for (cb_runner **p = &reg->runners; *p; p = &(*p)->next)
      if (*p == r) {
        *p = r->next;
        break;
      }
    pthread_mutex_unlock(&reg->lock);
  }
  write_one(r, NULL, 1);
  r->registered = 0;
}

void cb_runner_each(cb_runtime *rt, void (*visit)(const cb_runner_stat *stat, void *arg), void *arg) {
  struct cb_runner_registry *reg = registry(rt);
  if (reg == NULL) return; /* out of memory: none could have registered */
  pthread_mutex_lock(&reg->lock);
  for (cb_runner *r = reg->runners; r; r = r->next) {
    cb_runner_stat s;
    snapshot(reg, r, &s);
    visit(&s, arg);
  }
  pthread_mutex_unlock(&reg->lock);
}

/* ---- reading the rows ------------------------------------------------------------ */

static void copy_field(char *out, size_t size, const cb_result *r, int row, int col) {
  snprintf(out, size, "%s", cb_result_value(r, row, col));
}

static void read_lane_depths(cb_runner_stat *s, const char *list) {
  while (*list && s->nlane_depths < CB_MESSAGE_ROUTER_MAX_LANES) {
    char *end;
    unsigned long v = strtoul(list, &end, 10);
    if (end == list) break;
    s->lane_depths[s->nlane_depths++] = (uint32_t)v;
    list = *end == ',' ? end + 1 : end;
  }
}

static void read_removed(cb_runner_stat *s, const char *list) {
  for (int i = 0; i < CB_RUNNER_REMOVED_KINDS && *list; i++) {
    char *end;
    s->removed[i] = strtoll(list, &end, 10);
    if (end == list) break;
    list = *end == ',' ? end + 1 : end;
  }
}

int cb_runner_list(cb_runtime *rt, const char *domain, cb_runner_stat **out, size_t *count, cb_err *err) {
  *out = NULL;
  *count = 0;
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  char lost[16];
  snprintf(lost, sizeof lost, "%d", CB_RUNNER_LOST_AFTER);
  const char *params[] = {domain, lost};
  cb_unit_add(u,
              "SELECT kind, domain, runner_id::text, host, pid, CASE WHEN state <> 'stopped' AND heartbeat_at <"
              " now() - make_interval(secs => heartbeat_interval * $2::int) THEN 'lost' ELSE state END,"
              " extract(epoch FROM started_at), extract(epoch FROM heartbeat_at), lanes, in_flight, successes,"
              " failures, retries, consecutive_failures, stuck, poison, applied, rejected,"
              " coalesce(extract(epoch FROM last_success_at), 0), array_to_string(lane_depths, ','),"
              " array_to_string(removed, ','), scheduled"
              " FROM commandbus.runner WHERE $1::text IS NULL OR domain = $1"
              " ORDER BY kind, domain, started_at, runner_id",
              2, params);
  int rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "42P01") == 0)
    cb_err_set(err, rc, "there is no table of workers and reply routers: the schema predates it (run setup)");
  else if (rc == CB_EDATABASE && strcmp(err->sqlstate, "42703") == 0)
    cb_err_set(err, rc, "the table of workers and reply routers predates retention counts: run setup");
  const cb_result *r = rc == CB_OK ? cb_unit_result(u, 0) : NULL;
  int rows = cb_result_rows(r);
  if (rc == CB_OK && (*out = calloc((size_t)rows + 1, sizeof **out)) == NULL)
    rc = cb_err_set(err, CB_ENOMEM, "out of memory");
  for (int i = 0; rc == CB_OK && i < rows; i++) {
    cb_runner_stat *s = &(*out)[i];
    copy_field(s->kind, sizeof s->kind, r, i, 0);
    copy_field(s->domain, sizeof s->domain, r, i, 1);
    copy_field(s->runner_id, sizeof s->runner_id, r, i, 2);
    copy_field(s->host, sizeof s->host, r, i, 3);
    s->pid = (int)cb_result_int(r, i, 4);
    copy_field(s->state, sizeof s->state, r, i, 5);
    s->started_at = strtod(cb_result_value(r, i, 6), NULL);
    s->heartbeat_at = strtod(cb_result_value(r, i, 7), NULL);
    s->lanes = (int)cb_result_int(r, i, 8);
    s->in_flight = (int)cb_result_int(r, i, 9);
    uint64_t *counters[] = {&s->successes, &s->failures, &s->retries, &s->consecutive_failures,
                            &s->stuck,     &s->poison,   &s->applied, &s->rejected};
    for (int c = 0; c < 8; c++) *counters[c] = (uint64_t)cb_result_int(r, i, 10 + c);
    s->last_success_at = strtod(cb_result_value(r, i, 18), NULL);
    read_lane_depths(s, cb_result_value(r, i, 19));
    read_removed(s, cb_result_value(r, i, 20));
    s->scheduled = (uint64_t)cb_result_int(r, i, 21);
  }
  if (rc == CB_OK) *count = (size_t)rows;
  else {
    free(*out);
    *out = NULL;
  }
  cb_unit_free(u);
  return rc;
}
