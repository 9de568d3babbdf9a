/* commandbus: the process reply router (see reply_router.h). */
#include "commandbus/reply_router.h"

#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "commandbus/events.h"
#include "commandbus/log.h"
#include "keyed.h"
#include "commandbus/message_router.h"
#include "commandbus/queue.h"
#include "commandbus/runner.h"
#include "commandbus/thread.h"
#include "commandbus/uuid.h"
#include "strbuf.h"

/* Replies fetched at once, at most: a lane's two batches' worth. */
#define FETCH_MAX (2 * CB_REPLY_ROUTER_BATCH_MAX)
#define UUID_RE "'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'"

struct cb_reply_router {
  cb_runtime *rt;
  cb_reply_router_options o;
  char domain[CB_QUEUE_NAME_MAX + 1];
  char queue[CB_QUEUE_NAME_MAX + 1];
  char channel[80];
  char fetch_sql[2048];
  char apply_sql[2048];
  int lanes;
  int capacity;
  cb_message_router *router;
  pthread_t fetcher;
  int fetcher_started;
  cb_runner runner; /* seen by metrics and heartbeats while it runs */

  pthread_mutex_t lock; /* guards what follows */
  pthread_cond_t changed;
  int stop_requested;
  int fetcher_done;
  int lanes_ending; /* one thread ends the lanes... */
  int lanes_ended;  /* ...and says so when done */
  int in_flight; /* routed, not yet applied, rejected or released */
  cb_reply_router_health health;
};

static const char *TERMINAL[] = {"COMPLETED", "COMPENSATED", "FAILED", "CANCELED", NULL};

static int is_terminal(const char *status) {
  for (int i = 0; TERMINAL[i]; i++)
    if (strcmp(status, TERMINAL[i]) == 0) return 1;
  return 0;
}

void cb_reply_router_options_init(cb_reply_router_options *o) {
  memset(o, 0, sizeof *o);
  o->visibility_timeout = 30;
  o->statement_timeout = 25;
  o->poll_interval = 1;
}

int cb_reply_router_lanes(const cb_reply_router *r) { return r->lanes; }
const char *cb_reply_router_domain(const cb_reply_router *r) { return r->domain; }
const char *cb_reply_router_queue(const cb_reply_router *r) { return r->queue; }

static void add_timeout(cb_unit *u, const cb_reply_router *r) { cb_add_keyed_begin(u, r->o.statement_timeout); }

/* What metrics and heartbeats see of the router (any thread). */
static void report(void *self, cb_runner_stat *s) {
  cb_reply_router *r = self;
  cb_reply_router_health h;
  cb_reply_router_health_get(r, &h);
  snprintf(s->state, sizeof s->state, "%s", h.state);
  s->in_flight = h.in_flight;
  s->applied = h.applied;
  s->rejected = h.rejected;
  s->failures = h.failures;
}

static void stop_runner(void *self) { cb_reply_router_stop(self); }

void cb_reply_router_watch_signals(cb_reply_router *r) { r->runner.stop_on_signals = 1; }

int cb_reply_router_new(cb_runtime *rt, const cb_reply_router_options *o, cb_reply_router **out, cb_err *err) {
  *out = NULL;
  int rc = cb_domain_valid(o->domain, err);
  if (rc != CB_OK) return rc;
  if (o->visibility_timeout <= 0 || o->poll_interval <= 0 || o->statement_timeout <= 0)
    return cb_err_set(err, CB_EINVAL, "visibility_timeout, statement_timeout and poll_interval must be positive");
  if (o->statement_timeout >= o->visibility_timeout)
    return cb_err_set(err, CB_EINVAL, "statement_timeout (%g s) must be shorter than visibility_timeout (%g s)",
                      o->statement_timeout, o->visibility_timeout);
  char queue[CB_QUEUE_NAME_MAX + 16];
  if (o->reply_queue) snprintf(queue, sizeof queue, "%s", o->reply_queue);
  else snprintf(queue, sizeof queue, "%s__process_replies", o->domain);
  if ((rc = cb_queue_name_valid(queue, err)) != CB_OK) return rc;

  cb_reply_router *r = calloc(1, sizeof *r);
  if (r == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  r->rt = rt;
  r->o = *o;
  snprintf(r->domain, sizeof r->domain, "%s", o->domain);
  snprintf(r->queue, sizeof r->queue, "%.47s", queue);
  r->o.domain = r->domain;
  r->o.reply_queue = r->queue;
  snprintf(r->channel, sizeof r->channel, "pgmq_notify_%s", r->queue);
  r->lanes = o->lanes > 0 ? o->lanes : cb_default_threads();
  if (r->lanes > CB_MESSAGE_ROUTER_MAX_LANES) r->lanes = CB_MESSAGE_ROUTER_MAX_LANES;
  /* Two full batches per lane: one being applied, the next one waiting. */
  r->capacity = r->lanes * 2 * CB_REPLY_ROUTER_BATCH_MAX;
  snprintf(r->fetch_sql, sizeof r->fetch_sql,
           "WITH m AS (UPDATE pgmq.q_%s q SET vt = clock_timestamp() + make_interval(secs => $2::float8),"
           " read_ct = q.read_ct + 1 WHERE q.msg_id = ANY(ARRAY(SELECT msg_id FROM pgmq.q_%s"
           " WHERE vt <= clock_timestamp() ORDER BY msg_id LIMIT $1::int FOR UPDATE SKIP LOCKED))"
           " RETURNING q.msg_id, q.message,"
           " CASE WHEN jsonb_typeof(q.message) = 'object' AND (q.message->>'correlation_id') ~* " UUID_RE
           " THEN (q.message->>'correlation_id')::uuid END AS process_id,"
           " CASE WHEN jsonb_typeof(q.message) = 'object' AND (q.message->>'command_id') ~* " UUID_RE
           " THEN (q.message->>'command_id')::uuid END AS command_id)"
           " SELECT m.msg_id, m.message::text, coalesce(m.message->>'outcome', ''), m.command_id::text,"
           " m.process_id::text, p.process_type, p.status, p.current_step, p.state::text, pa.step_name,"
           " pa.reply_outcome, (SELECT coalesce(jsonb_agg(x.step_name ORDER BY x.id), '[]'::jsonb)::text"
           " FROM commandbus.process_audit x WHERE x.domain = $3 AND x.process_id = m.process_id"
           " AND x.reply_outcome = 'SUCCESS')"
           /* Each reply's process and step looked up by key (LIMIT keeps the
            * lookups per reply: joined whole, a plan made while the tables
            * were small reads every process of the domain). */
           " FROM m LEFT JOIN LATERAL (SELECT process_type, status, current_step, state FROM commandbus.process"
           " WHERE domain = $3 AND process_id = m.process_id LIMIT 1) p ON true"
           " LEFT JOIN LATERAL (SELECT step_name, reply_outcome FROM commandbus.process_audit"
           " WHERE domain = $3 AND process_id = m.process_id AND command_id = m.command_id LIMIT 1) pa ON true"
           " ORDER BY m.msg_id",
           r->queue, r->queue);
  /* Applies a batch of replies, one per process. Each reply is recorded once
   * (reply_outcome IS NULL) and only a process still waiting moves; unless
   * every reply of the batch did, 1/0 aborts the whole transaction (next
   * commands included). The probes by ANY(ARRAY(...)) keep the plans on the
   * indexes whatever the row estimate of the input. */
  snprintf(r->apply_sql, sizeof r->apply_sql,
           "WITH i AS (SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(msg bigint, pid uuid, cid uuid, outcome text,"
           " reply text, status text, step text, state text, ecode text, emsg text, next_id uuid, next_type text,"
           " next_data text)),"
           " a AS (UPDATE commandbus.process_audit pa SET reply_outcome = i.outcome, reply_data = i.reply::jsonb,"
           " received_at = now() FROM i WHERE pa.domain = $1::text AND pa.command_id = ANY(ARRAY(SELECT cid FROM i))"
           " AND pa.command_id = i.cid AND pa.process_id = i.pid AND pa.reply_outcome IS NULL"
           " RETURNING pa.process_id),"
           " p AS (UPDATE commandbus.process pr SET status = i.status, current_step = i.step,"
           " state = i.state::jsonb, error_code = i.ecode, error_message = i.emsg, updated_at = now(),"
           " completed_at = CASE WHEN i.status IN ('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELED') THEN now() END"
           " FROM i WHERE pr.domain = $1::text AND pr.process_id = ANY(ARRAY(SELECT process_id FROM a))"
           " AND pr.process_id = i.pid AND " CB_STATUS_OF("pr") " IN ('WAITING', 'WAITING_FOR_TSQ', 'COMPENSATING')"
           " RETURNING pr.process_id),"
           " n AS (INSERT INTO commandbus.process_audit (domain, process_id, step_name, command_id, command_type,"
           " command_data, sent_at) SELECT $1::text, pid, step, next_id, next_type, next_data::jsonb, now() FROM i"
           " WHERE next_type IS NOT NULL),"
           " d AS (DELETE FROM pgmq.q_%s q WHERE q.msg_id = ANY(ARRAY(SELECT msg FROM i)))"
           " SELECT 1 / ((SELECT count(*) FROM p) = (SELECT count(*) FROM i))::int",
           r->queue);
  pthread_mutex_init(&r->lock, NULL);
  pthread_cond_init(&r->changed, NULL);
  r->health.state = "starting";
  r->runner.kind = "reply_router";
  r->runner.domain = r->domain;
  r->runner.lanes = r->lanes;
  r->runner.report = report;
  r->runner.stop = stop_runner;
  r->runner.self = r;
  cb_message_router_config cfg;
  cb_message_router_config_init(&cfg);
  cfg.lanes = r->lanes;
  cfg.batch_size = 16;
  cfg.batch_timeout_ms = 0;
  cfg.policy = CB_MESSAGE_ROUTER_BLOCK;
  cfg.block_timeout_ms = -1;
  cfg.ingress_capacity = (size_t)r->capacity + 64;
  cfg.lane_capacity = (size_t)r->capacity + 1;
  if (cb_message_router_new(&r->router, &cfg) != 0) {
    cb_reply_router_free(r);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  r->runner.router = r->router;
  rc = cb_bus_ensure_queue(rt, r->queue, err);
  if (rc == CB_OK) rc = cb_runtime_listen(rt, r->channel, err);
  if (rc != CB_OK) {
    cb_reply_router_free(r);
    return rc;
  }
  *out = r;
  return CB_OK;
}

/* ---- replies ---------------------------------------------------------------- */

static cb_reply *reply_new(const cb_result *res, int row) {
  static const int cols[] = {1, 2, 3, 4, 5, 6, 7, 9, 8, 11};
  static const size_t offsets[] = {
      offsetof(cb_reply, message_json), offsetof(cb_reply, outcome),      offsetof(cb_reply, command_id),
      offsetof(cb_reply, process_id),   offsetof(cb_reply, process_type), offsetof(cb_reply, status),
      offsetof(cb_reply, current_step), offsetof(cb_reply, step_name),    offsetof(cb_reply, state_json),
      offsetof(cb_reply, completed_steps_json)};
  cb_reply *r = cb_result_pack(res, row, sizeof(cb_reply), cols, offsets, (int)(sizeof cols / sizeof cols[0]));
  if (r == NULL) return NULL;
  /* The fields are read as strings: "" rather than NULL for SQL NULL. */
  for (size_t i = 0; i < sizeof cols / sizeof cols[0]; i++) {
    const char **field = (const char **)((char *)r + offsets[i]);
    if (*field == NULL) *field = "";
  }
  r->msg_id = cb_result_int(res, row, 0);
  return r;
}

/* Moves replies out of the queue into its archive (so they can be read). */
static void archive(cb_reply_router *r, int64_t msg_id) {
  char sql[600], ctes[512], id[24];
  cb_queue_archive_ctes(ctes, sizeof ctes, r->queue, "ARRAY[$1::bigint]");
  snprintf(sql, sizeof sql, "WITH %s SELECT count(*) FROM ar", ctes);
  snprintf(id, sizeof id, "%lld", (long long)msg_id);
  const char *p[] = {id};
  cb_unit *u = cb_unit_new();
  if (u == NULL) return;
  cb_unit_add(u, sql, 1, p);
  cb_err err;
  if (cb_runtime_exec(r->rt, u, &err) != CB_OK)
    cb_log(CB_LOG_WARN, "reply router %s: cannot archive reply %lld (%s); it comes back later", r->domain,
           (long long)msg_id, err.message);
  cb_unit_free(u);
}

/* n replies left the router's hands (applied, rejected or released). */
static void count_finished(cb_reply_router *r, uint64_t *counter, int n) {
  pthread_mutex_lock(&r->lock);
  r->in_flight -= n;
  if (counter) *counter += (uint64_t)n;
  pthread_cond_broadcast(&r->changed);
  pthread_mutex_unlock(&r->lock);
}

static void count_done(cb_reply_router *r, uint64_t *counter) { count_finished(r, counter, 1); }

/* Why a fetched reply cannot be applied, or NULL when it can. */
static const char *unusable(const cb_result *res, int row, int *level) {
  *level = CB_LOG_WARN;
  if (cb_result_is_null(res, row, 4)) return "its correlation_id is missing or not a UUID";
  if (cb_result_is_null(res, row, 5)) return "no process has its correlation_id";
  if (is_terminal(cb_result_value(res, row, 6))) {
    *level = CB_LOG_INFO;
    return "its process has already finished";
  }
  if (cb_result_is_null(res, row, 9)) return "it answers a command that is not a step of its process";
  if (!cb_result_is_null(res, row, 10)) {
    *level = CB_LOG_INFO;
    return "it was applied before";
  }
  const char *outcome = cb_result_value(res, row, 2);
  if (strcmp(outcome, "SUCCESS") && strcmp(outcome, "FAILED") && strcmp(outcome, "CANCELED"))
    return "its outcome is not SUCCESS, FAILED or CANCELED";
  return NULL;
}

/* ---- the fetch thread ----------------------------------------------------------- */

static void *fetch_main(void *arg) {
  cb_reply_router *r = arg;
  cb_hub_sub *sub = cb_hub_subscribe(cb_runtime_hub(r->rt), r->channel);
  int failing = 0;
  int wait_ms = (int)(r->o.poll_interval * 1000);
  for (;;) {
    pthread_mutex_lock(&r->lock);
    while (!r->stop_requested && r->in_flight >= r->capacity) pthread_cond_wait(&r->changed, &r->lock);
    int stop = r->stop_requested;
    int room = r->capacity - r->in_flight;
    pthread_mutex_unlock(&r->lock);
    if (stop) break;
    if (room > FETCH_MAX) room = FETCH_MAX;
    cb_unit *u = cb_unit_new();
    char qty[16], vt[32];
    snprintf(qty, sizeof qty, "%d", room);
    snprintf(vt, sizeof vt, "%.3f", r->o.visibility_timeout);
    const char *params[] = {qty, vt, r->domain};
    add_timeout(u, r);
    cb_unit_add(u, r->fetch_sql, 3, params);
    cb_err err;
    int rc = cb_runtime_exec(r->rt, u, &err);
    if (rc == CB_ECLOSED) {
      cb_unit_free(u);
      break;
    }
    int rows = 0;
    if (rc != CB_OK) {
      if (!failing)
        cb_log(CB_LOG_WARN, "reply router %s: fetch failed (%s: %s); retrying at each poll", r->domain,
               cb_strerror(err.code), err.message);
      failing = 1;
    } else {
      if (failing) cb_log(CB_LOG_INFO, "reply router %s: fetching again", r->domain);
      failing = 0;
      const cb_result *res = cb_unit_result(u, 1);
      rows = cb_result_rows(res);
      for (int i = 0; i < rows; i++) {
        int level;
        const char *why = unusable(res, i, &level);
        if (why) {
          cb_log(level, "reply router %s: reply %s archived: %s (process %s)", r->domain, cb_result_value(res, i, 0),
                 why, cb_result_value(res, i, 4));
          archive(r, cb_result_int(res, i, 0));
          pthread_mutex_lock(&r->lock);
          r->health.rejected++;
          pthread_mutex_unlock(&r->lock);
          continue;
        }
        cb_reply *reply = reply_new(res, i);
        if (reply == NULL) continue; /* comes back after the visibility timeout */
        pthread_mutex_lock(&r->lock);
        r->in_flight++;
        pthread_mutex_unlock(&r->lock);
        if (cb_message_router_route(r->router, reply->process_id, strlen(reply->process_id), reply) != 0) {
          free(reply);
          count_done(r, NULL);
        }
      }
    }
    cb_unit_free(u);
    if (rows == 0 && cb_hub_wait(sub, wait_ms) == CB_ECLOSED) break;
  }
  cb_hub_unsubscribe(sub);
  pthread_mutex_lock(&r->lock);
  r->fetcher_done = 1;
  pthread_cond_broadcast(&r->changed);
  pthread_mutex_unlock(&r->lock);
  return NULL;
}

int cb_reply_router_start(cb_reply_router *r, cb_err *err) {
  if (r->fetcher_started) return cb_err_set(err, CB_ESTATE, "the reply router was already started");
  if (cb_message_router_start(r->router) != 0) return cb_err_set(err, CB_ESTATE, "cannot start the lanes");
  pthread_mutex_lock(&r->lock);
  r->health.state = "running"; /* as its first heartbeat says */
  pthread_mutex_unlock(&r->lock);
  int rc = cb_runner_start(r->rt, &r->runner, err);
  if (rc == CB_OK && cb_thread_start(&r->fetcher, fetch_main, r) != 0)
    rc = cb_err_set(err, CB_ENOMEM, "cannot start the fetch thread");
  if (rc != CB_OK) {
    pthread_mutex_lock(&r->lock);
    r->health.state = "stopped";
    pthread_mutex_unlock(&r->lock);
    return rc;
  }
  r->fetcher_started = 1;
  cb_log(CB_LOG_INFO, "reply router %s: running with %d lane(s) on %s", r->domain, r->lanes, r->queue);
  return CB_OK;
}

void cb_reply_router_stop(cb_reply_router *r) {
  pthread_mutex_lock(&r->lock);
  r->stop_requested = 1;
  if (strcmp(r->health.state, "running") == 0) r->health.state = "stopping";
  pthread_cond_broadcast(&r->changed);
  pthread_mutex_unlock(&r->lock);
  cb_hub_notify(cb_runtime_hub(r->rt), r->channel); /* wakes the fetch thread */
}

/* Once stopping, fetched out and drained: the lanes may end. */
static void maybe_end_lanes(cb_reply_router *r) {
  pthread_mutex_lock(&r->lock);
  int end = r->stop_requested && r->fetcher_done && r->in_flight == 0 && !r->lanes_ending;
  if (end) r->lanes_ending = 1;
  pthread_mutex_unlock(&r->lock);
  if (end) {
    cb_message_router_stop(r->router);
    cb_log(CB_LOG_INFO, "reply router %s: stopped", r->domain);
    cb_runner_stopped(&r->runner); /* before a waiter may see it ended and free the router */
    pthread_mutex_lock(&r->lock);
    r->lanes_ended = 1;
    r->health.state = "stopped";
    pthread_cond_broadcast(&r->changed);
    pthread_mutex_unlock(&r->lock);
  }
}

int cb_reply_router_wait(cb_reply_router *r, int timeout_ms) {
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    /* Short waits (a closed runtime is noticed), never past the caller's
     * timeout: run()'s tick comes every tick_interval, not every 100 ms. */
    long slice_ms = 100;
    if (timeout_ms >= 0) {
      struct timespec now;
      clock_gettime(CLOCK_MONOTONIC, &now);
      long left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
      if (left < slice_ms) slice_ms = left > 0 ? left : 0;
    }
    maybe_end_lanes(r);
    pthread_mutex_lock(&r->lock);
    int ended = r->lanes_ended;
    if (!ended && slice_ms > 0) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += slice_ms * 1000000L;
      if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
      pthread_cond_timedwait(&r->changed, &r->lock, &ts);
    }
    pthread_mutex_unlock(&r->lock);
    if (ended) return 1;
    if (cb_runtime_is_closed(r->rt)) cb_reply_router_stop(r);
    if (slice_ms == 0) return 0;
  }
}

void cb_reply_router_free(cb_reply_router *r) {
  if (r == NULL) return;
  if (r->fetcher_started) {
    cb_reply_router_stop(r);
    pthread_join(r->fetcher, NULL);
  }
  cb_runner_remove(&r->runner); /* its last row says how it ended */
  if (r->router) {
    cb_message_router_stop(r->router);
    for (int lane = 0; lane < r->lanes; lane++) {
      void *items[64];
      int n;
      while ((n = cb_message_router_take(r->router, lane, items, 64, 0)) > 0)
        for (int i = 0; i < n; i++) free(items[i]);
    }
    cb_message_router_free(r->router);
  }
  pthread_cond_destroy(&r->changed);
  pthread_mutex_destroy(&r->lock);
  free(r);
}

/* ---- lanes ---------------------------------------------------------------------- */

cb_reply *cb_reply_router_take(cb_reply_router *r, int lane, int timeout_ms, int *ended) {
  cb_reply *reply = NULL;
  return cb_reply_router_take_many(r, lane, &reply, 1, timeout_ms, ended) == 1 ? reply : NULL;
}

int cb_reply_router_take_many(cb_reply_router *r, int lane, cb_reply **replies, int max, int timeout_ms, int *ended) {
  *ended = 0;
  void *items[CB_REPLY_ROUTER_BATCH_MAX];
  if (max > CB_REPLY_ROUTER_BATCH_MAX) max = CB_REPLY_ROUTER_BATCH_MAX;
  if (max < 1) return 0;
  int n = cb_message_router_take(r->router, lane, items, (size_t)max, timeout_ms);
  if (n == CB_MESSAGE_ROUTER_END) {
    *ended = 1;
    return 0;
  }
  if (n <= 0) {
    maybe_end_lanes(r); /* a table-mode lane is also the caller waiting for the end */
    return 0;
  }
  for (int i = 0; i < n; i++) replies[i] = items[i];
  return n;
}

void cb_reply_router_reject(cb_reply_router *r, cb_reply *reply, const char *why) {
  cb_log(CB_LOG_ERROR, "reply router %s: reply %lld archived: %s (process %s of type %s)", r->domain,
         (long long)reply->msg_id, why, reply->process_id, reply->process_type);
  archive(r, reply->msg_id);
  free(reply);
  count_done(r, &r->health.rejected);
}

void cb_reply_router_release(cb_reply_router *r, cb_reply *reply) {
  free(reply); /* its message reappears after the visibility timeout */
  count_done(r, &r->health.failures);
}

/* ---- applying ------------------------------------------------------------------- */

static void json_field(cb_strbuf *b, const char *name, const char *value) {
  cb_strbuf_printf(b, ",\"%s\":", name);
  if (value) cb_strbuf_json_string(b, value);
  else cb_strbuf_puts(b, "null");
}

/* Appends to u the transaction applying replies[idx[k]] with decisions[idx[k]]
 * for k < m (m <= CB_REPLY_ROUTER_BATCH_MAX, one reply per process): the
 * guarded apply statement (r->apply_sql), then the next steps' commands. The
 * input travels as one JSON parameter whose values are all JSON strings, so
 * that a caller's text (state, data) is data, never structure. */
static int add_apply(cb_reply_router *r, cb_unit *u, cb_reply *const *replies, const cb_reply_decision *decisions,
                     const int *idx, int m, cb_err *err) {
  cb_command_spec specs[CB_REPLY_ROUTER_BATCH_MAX];
  cb_send_result sent[CB_REPLY_ROUTER_BATCH_MAX];
  char ids[CB_REPLY_ROUTER_BATCH_MAX][CB_UUID_LEN + 1];
  int nsend = 0;
  cb_strbuf input = {0};
  cb_strbuf_putc(&input, '[');
  for (int k = 0; k < m; k++) {
    const cb_reply *reply = replies[idx[k]];
    const cb_reply_decision *d = &decisions[idx[k]];
    cb_strbuf_printf(&input, "%s{\"msg\":%lld", k ? "," : "", (long long)reply->msg_id);
    json_field(&input, "pid", reply->process_id);
    json_field(&input, "cid", reply->command_id);
    json_field(&input, "outcome", reply->outcome);
    json_field(&input, "reply", reply->message_json);
    json_field(&input, "status", d->status);
    json_field(&input, "step", d->step);
    json_field(&input, "state", d->state_json);
    json_field(&input, "ecode", d->error_code);
    json_field(&input, "emsg", d->error_message);
    if (d->next_type) {
      /* The command's id is chosen here, so that its process_audit row can
       * be written by the apply statement, before the send. */
      cb_uuid_v7(ids[nsend]);
      specs[nsend] = (cb_command_spec){.command_id = ids[nsend],
                                       .command_type = d->next_type,
                                       .data_json = d->next_data_json,
                                       .correlation_id = reply->process_id,
                                       .reply_to = r->queue};
      json_field(&input, "next_id", ids[nsend]);
      json_field(&input, "next_type", d->next_type);
      json_field(&input, "next_data", d->next_data_json ? d->next_data_json : "{}");
      nsend++;
    }
    cb_strbuf_putc(&input, '}');
  }
  cb_strbuf_putc(&input, ']');
  int rc = CB_OK;
  if (!input.failed) {
    const char *params[] = {r->domain, input.data};
    add_timeout(u, r);
    if (cb_unit_add(u, r->apply_sql, 2, params) < 0) input.failed = 1;
  }
  if (input.failed) rc = cb_err_set(err, CB_ENOMEM, "out of memory");
  if (rc == CB_OK && nsend) rc = cb_bus_add_send(r->rt, u, r->domain, specs, (size_t)nsend, 0, sent, NULL, err);
  cb_strbuf_free(&input);
  return rc;
}

/* One transaction for replies[idx[0..m)]; the replies are not consumed.
 * The process events it appends are read back; once it committed they wake
 * this process's awaiters and go to the event sink. */
static int exec_apply(cb_reply_router *r, cb_reply *const *replies, const cb_reply_decision *decisions, const int *idx,
                      int m, cb_err *err) {
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  cb_events_add_begin(u);
  int rc = add_apply(r, u, replies, decisions, idx, m, err);
  int events = rc == CB_OK ? cb_events_add_read(u) : -1;
  if (rc == CB_OK) rc = cb_runtime_exec(r->rt, u, err);
  if (rc == CB_OK) cb_events_published(r->rt, u, events);
  cb_unit_free(u);
  return rc;
}

/* After the commit: the replies are freed and counted. */
static void applied(cb_reply_router *r, cb_reply **replies, const int *idx, int m) {
  for (int k = 0; k < m; k++) {
    free(replies[idx[k]]);
    replies[idx[k]] = NULL;
  }
  count_finished(r, &r->health.applied, m);
}

int cb_reply_router_apply(cb_reply_router *r, cb_reply *reply, const cb_reply_decision *d, cb_err *err) {
  const int only = 0;
  int rc = exec_apply(r, &reply, d, &only, 1, err);
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22012") == 0) {
    /* At-least-once delivery: a reply answered twice, or late. Not an error. */
    cb_log(CB_LOG_INFO, "reply router %s: reply %lld archived: it was applied before, or its process moved on"
           " (process %s)", r->domain, (long long)reply->msg_id, reply->process_id);
    archive(r, reply->msg_id);
    free(reply);
    count_done(r, &r->health.rejected);
    return cb_err_set(err, CB_ESTATE, "reply was applied before or the process moved on");
  }
  if (rc != CB_OK) {
    cb_log(CB_LOG_WARN, "reply router %s: applying reply %lld failed (%s); it comes back later", r->domain,
           (long long)reply->msg_id, err->message);
    cb_reply_router_release(r, reply);
    return rc;
  }
  applied(r, &reply, &only, 1);
  return CB_OK;
}

/* Remembers the first failure of several (err may be NULL). */
static void keep_first(int *first, cb_err *err, int rc, const cb_err *one) {
  if (rc == CB_OK || *first != CB_OK) return;
  *first = rc;
  if (err) *err = *one;
}

/* Applies replies[idx[0..m)] (one per process) in one transaction, or, when
 * that fails, one by one. Returns the first failure's code (err filled). */
static int apply_batch(cb_reply_router *r, cb_reply **replies, const cb_reply_decision *decisions, const int *idx,
                       int m, cb_err *err) {
  if (m == 1) return cb_reply_router_apply(r, replies[idx[0]], &decisions[idx[0]], err);
  int rc = exec_apply(r, replies, decisions, idx, m, err);
  if (rc == CB_OK) {
    applied(r, replies, idx, m);
    return CB_OK;
  }
  if (rc == CB_ECLOSED) { /* nothing can be written any more */
    cb_log(CB_LOG_WARN, "reply router %s: the bus was closed; %d replies come back after their visibility timeout",
           r->domain, m);
    for (int k = 0; k < m; k++) cb_reply_router_release(r, replies[idx[k]]);
    return rc;
  }
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22012") == 0)
    cb_log(CB_LOG_INFO, "reply router %s: a batch of %d replies holds one applied before or whose process moved "
           "on; applying them one by one", r->domain, m);
  else
    cb_log(CB_LOG_WARN, "reply router %s: applying a batch of %d replies failed (%s: %s); applying them one by one",
           r->domain, m, cb_strerror(rc), err->message);
  int first = CB_OK;
  for (int k = 0; k < m; k++) {
    cb_err one;
    rc = cb_reply_router_apply(r, replies[idx[k]], &decisions[idx[k]], &one);
    keep_first(&first, err, rc, &one);
  }
  return first;
}

int cb_reply_router_apply_many(cb_reply_router *r, cb_reply **replies, const cb_reply_decision *decisions, int n,
                               cb_err *err) {
  cb_err_clear(err);
  if (n <= 0) return CB_OK;
  int *pending = malloc((size_t)n * sizeof *pending);
  if (pending == NULL) { /* one by one: no bookkeeping needed */
    int first = CB_OK;
    for (int i = 0; i < n; i++) {
      cb_err one;
      int rc = cb_reply_router_apply(r, replies[i], &decisions[i], &one);
      keep_first(&first, err, rc, &one);
    }
    return first;
  }
  for (int i = 0; i < n; i++) pending[i] = i;
  int npending = n, first = CB_OK;
  while (npending > 0) {
    /* A batch takes, in order, each reply whose process it does not hold
     * yet; the others wait for the next batch, still in order. */
    int batch[CB_REPLY_ROUTER_BATCH_MAX], m = 0, rest = 0;
    for (int k = 0; k < npending; k++) {
      int i = pending[k];
      int later = m == CB_REPLY_ROUTER_BATCH_MAX;
      for (int j = 0; j < m && !later; j++) later = strcmp(replies[batch[j]]->process_id, replies[i]->process_id) == 0;
      if (later) pending[rest++] = i;
      else batch[m++] = i;
    }
    npending = rest;
    cb_err one;
    int rc = apply_batch(r, replies, decisions, batch, m, &one);
    keep_first(&first, err, rc, &one);
  }
  free(pending);
  return first;
}

void cb_reply_router_health_get(cb_reply_router *r, cb_reply_router_health *h) {
  pthread_mutex_lock(&r->lock);
  *h = r->health;
  h->in_flight = r->in_flight;
  pthread_mutex_unlock(&r->lock);
}
