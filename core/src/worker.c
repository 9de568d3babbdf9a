/* commandbus: the worker engine (see worker.h).
 *
 * Threads: the engine's state marked [loop] lives on the runtime's loop
 * thread; lanes talk to it only through the message router (work in) and the
 * done list under `lock` (outcomes out). Fetch and acknowledgement are
 * set-based: one statement receives a whole batch, and one transaction per
 * round acknowledges every outcome gathered since the previous round, one
 * statement per kind of outcome (and reply queue). Each command's effects are
 * guarded by its status (only an IN_PROGRESS command moves), so a late
 * outcome never overwrites a terminal state or an operator's decision. When a
 * round's transaction fails, each command is acknowledged again on its own,
 * so one bad command cannot hold the others back. */
#include "commandbus/worker.h"

#include <math.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "commandbus/events.h"
#include "commandbus/bus.h"
#include "commandbus/limits.h"
#include "commandbus/log.h"
#include "commandbus/message_router.h"
#include "commandbus/queue.h"
#include "commandbus/runner.h"
#include "keyed.h"
#include "strbuf.h"

enum { STATE_STARTING, STATE_RUNNING, STATE_STOPPING, STATE_STOPPED };
static const char *state_names[] = {"starting", "running", "stopping", "stopped"};

#define FETCH_MAX 100
#define MAX_REPLY_QUEUES 8 /* per acknowledgement statement; more go one by one */
/* Acknowledgement rounds on their way at once: two keep both pooled
 * connections (and their backends) busy while the rest gather. */
#define MAX_ROUNDS_IN_FLIGHT 2

typedef struct lane_buffer { /* owned by its lane thread */
  void *items[64];
  int count, next;
} lane_buffer;

struct cb_worker {
  cb_runtime *rt;
  cb_worker_options o;
  char domain[CB_QUEUE_NAME_MAX + 1];
  char queue[CB_QUEUE_NAME_MAX + 1];
  char channel[80];
  char receive_sql[6144];
  int lanes;
  int capacity; /* works fetched and not yet done, at most */
  cb_message_router *router;
  lane_buffer *buffers; /* one per lane */

  /* [loop] */
  int fetching;
  int in_flight;    /* fetched and routed, outcome not yet taken */
  int acks_pending; /* units of acknowledgement in flight */
  int stop_seen;
  int finalized;
  int watch_id;
  int more_waiting; /* the last fetch found messages: there may be more */
  int wake_pending; /* notified since the last receive was built: fetch again */
  /* Where the read of priority-0 messages starts: the lowest msg_id the
   * last fetch received at that priority. A message below it that becomes
   * visible later (a retry, a redelivery, a send that committed late) is
   * found by the next full scan, which every poll asks for. */
  int64_t scan_from;
  int full_scan_due;
  int asked; /* how many the last receive asked for */
  cb_upkeep *upkeep; /* background jobs; [loop] once started */
  int upkeep_running;
  int rounds_in_flight;        /* acknowledgement rounds sent, not answered */
  int abandon_acks;            /* drain deadline passed: outcomes kept for retry are given up */
  int acks_held;               /* the last round failed for a lost connection: wait for the poll */
  int fetch_failing;           /* fetches fail (the database is away): logged once */
  int ack_failing;             /* acknowledgements fail: logged once */
  cb_work *ack_head, *ack_tail; /* outcomes waiting for the next round */
  char started_batches[16][CB_UUID_LEN + 1]; /* recently seen as started */
  int started_next;
  uv_timer_t poll_timer, stuck_timer, drain_timer;
  int timers_open;
  cb_runner runner; /* seen by metrics and heartbeats while it runs */
  int handles_closing; /* uv_close calls whose callbacks have not run yet */

  pthread_mutex_t lock; /* guards what follows */
  pthread_cond_t changed;
  cb_work *done_head, *done_tail;
  int done_scheduled;
  int state;
  int stop_requested;
  int abandon; /* drain deadline passed: lanes drop what they have not started */
  cb_work **current; /* per lane: the work whose handler runs, or NULL */
  cb_worker_health health;
  double avg_handler_s; /* moving average of handler time; 0 = unknown yet */
};

static double now_unix(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- works ------------------------------------------------------------------ */

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

void cb_work_succeed(cb_work *w, const char *result_json) {
  w->outcome = CB_OUTCOME_SUCCESS;
  free(w->result_json);
  w->result_json = dup_or_null(result_json);
}

void cb_work_fail(cb_work *w, int outcome, const char *code, const char *message, const char *details_json) {
  w->outcome = outcome;
  free(w->error_code);
  free(w->error_message);
  free(w->error_details_json);
  w->error_code = strdup(code && *code ? code : "ERROR");
  w->error_message = strdup(message ? message : "");
  w->error_details_json = dup_or_null(details_json);
}

/* One allocation holds the work and its input strings. */
static cb_work *work_new(const cb_result *r, int row) {
  static const int cols[] = {2, 3, 4, 7, 8, 9}; /* id, type, data, correlation, reply, batch */
  size_t len = sizeof(cb_work);
  for (size_t i = 0; i < sizeof cols / sizeof cols[0]; i++) len += strlen(cb_result_value(r, row, cols[i])) + 1;
  cb_work *w = calloc(1, len);
  if (w == NULL) return NULL;
  char *p = (char *)(w + 1);
  const char **fields[] = {&w->command_id, &w->command_type, &w->data_json,
                           &w->correlation_id, &w->reply_to, &w->batch_id};
  for (size_t i = 0; i < sizeof cols / sizeof cols[0]; i++) {
    const char *v = cb_result_value(r, row, cols[i]);
    size_t n = strlen(v) + 1;
    memcpy(p, v, n);
    *fields[i] = cb_result_is_null(r, row, cols[i]) ? NULL : p;
    p += n;
  }
  if (w->data_json == NULL) w->data_json = "{}";
  w->msg_id = cb_result_int(r, row, 0);
  w->attempt = (int)cb_result_int(r, row, 5);
  w->max_attempts = (int)cb_result_int(r, row, 6);
  return w;
}

static void work_free(cb_work *w) {
  if (w == NULL) return;
  free(w->result_json);
  free(w->error_code);
  free(w->error_message);
  free(w->error_details_json);
  free(w);
}

/* ---- options and lifecycle ------------------------------------------------------- */

void cb_worker_options_init(cb_worker_options *o) {
  memset(o, 0, sizeof *o);
  o->visibility_timeout = 30;
  o->statement_timeout = 25;
  o->poll_interval = 1;
  o->backoff[0] = 10;
  o->backoff[1] = 60;
  o->backoff[2] = 300;
  o->nbackoff = 3;
  o->drain_timeout = 30;
  o->retention = 1;
  o->retention_interval = 60;
  o->schedules = 1;
}

/* A message is received only when it is its command's current message
 * (command.msg_id): a redelivery after a crash is, a stray second message for
 * the same command is not, and is set aside as DUPLICATE_MESSAGE.
 *
 * Every lookup names its keys with `= ANY(ARRAY(...))`: joins against a CTE
 * are planned from statistics, and a queue workload keeps them stale (a
 * domain seen as one row led to a nested loop over all its commands for each
 * message). Key conditions make the plan primary-key lookups whatever the
 * statistics say.
 *
 * Messages are taken by priority: first those above 0 from the queue's
 * partial priority index (which holds only messages with a priority), then
 * those at 0 in msg_id order, then those below 0. Each source is read only as
 * far as the fetch needs (a LIMIT over the three reads lazily). The read at
 * priority 0 tests `NOT (message ? 'priority')` first: the planner has no
 * statistics on priority_of(message) and would guess that few messages are
 * at 0, then read the whole queue and sort it on every fetch instead of
 * walking msg_id order; messages without the key are what it expects almost
 * all messages to be, as they are. The read at
 * priority 0 starts at msg_id $4 (see scan_from): under a transaction that
 * holds back vacuum, the dead entries of every message completed since it
 * began lie below that mark, and the index scan would otherwise step over
 * them all on every fetch.
 *
 * Limits per command type (commandbus.type_limit; the previous statement of
 * the transaction locked the domain's rows, so that every worker counts the
 * same numbers): types with no room left are not read, and of the others no
 * more than their room is received; the rest stay in the queue untouched
 * (not received, no attempt, no audit). Each received type's window count
 * goes up in the same statement. With no limits this costs a probe of an
 * empty table and a test per message read. */
static void build_receive_sql(cb_worker *w) {
  const char *q = w->queue;
#define NOT_FULL " AND NOT coalesce(message->>'command_type' = ANY((SELECT t FROM full_types)::text[]), false)"
  snprintf(w->receive_sql, sizeof w->receive_sql,
           "WITH room AS (SELECT command_type, room FROM commandbus.type_room($3)),"
           " full_types AS (SELECT coalesce(array_agg(command_type) FILTER (WHERE room <= 0), '{}') AS t FROM room),"
           " hi AS (SELECT msg_id, message->>'command_type' AS type, commandbus.priority_of(message) AS prio"
           " FROM pgmq.q_%s WHERE commandbus.priority_of(message) > 0 AND vt <= clock_timestamp()" NOT_FULL
           " ORDER BY commandbus.priority_of(message) DESC, msg_id LIMIT $1::int FOR UPDATE SKIP LOCKED),"
           " mid AS (SELECT msg_id, message->>'command_type' AS type, 0 AS prio FROM pgmq.q_%s"
           " WHERE msg_id >= $4::bigint AND vt <= clock_timestamp()"
           " AND (NOT (message ? 'priority') OR coalesce(commandbus.priority_of(message), 0) = 0)" NOT_FULL
           " ORDER BY msg_id LIMIT $1::int FOR UPDATE SKIP LOCKED),"
           " lo AS (SELECT msg_id, message->>'command_type' AS type, commandbus.priority_of(message) AS prio"
           " FROM pgmq.q_%s WHERE commandbus.priority_of(message) < 0 AND vt <= clock_timestamp()" NOT_FULL
           " ORDER BY commandbus.priority_of(message) DESC, msg_id LIMIT $1::int FOR UPDATE SKIP LOCKED),"
           " pick AS (SELECT * FROM (SELECT * FROM hi UNION ALL SELECT * FROM mid UNION ALL SELECT * FROM lo) x"
           " LIMIT $1::int),"
           " kept AS (SELECT p.msg_id FROM (SELECT msg_id, type, row_number() OVER (PARTITION BY type"
           " ORDER BY prio DESC, msg_id) AS nth FROM pick) p LEFT JOIN room r ON r.command_type = p.type"
           " WHERE r.room IS NULL OR p.nth <= r.room),"
           " m AS (UPDATE pgmq.q_%s q SET vt = clock_timestamp() + make_interval(secs => $2::float8),"
           " read_ct = q.read_ct + 1 WHERE q.msg_id = ANY(ARRAY(SELECT msg_id FROM kept))"
           " RETURNING q.msg_id, q.read_ct, q.message, commandbus.priority_of(q.message) AS priority,"
           " commandbus.message_command_id(q.message) AS command_id),"
           " c AS (UPDATE commandbus.command k SET attempts = k.attempts + 1, status = 'IN_PROGRESS',"
           " updated_at = now(), lease_expires_at = clock_timestamp() + make_interval(secs => $2::float8)"
           " FROM m WHERE k.domain = $3 AND k.command_id = m.command_id AND k.msg_id = m.msg_id"
           " AND k.command_id = ANY(ARRAY(SELECT command_id FROM m WHERE command_id IS NOT NULL))"
           " AND " CB_STATUS_OF("k") " IN ('PENDING', 'IN_PROGRESS')"
           " RETURNING k.command_id, k.command_type, k.attempts, k.max_attempts, k.correlation_id,"
           " k.reply_queue, k.batch_id, m.msg_id),"
           " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
           " SELECT $3, command_id, 'RECEIVED', jsonb_build_object('msg_id', msg_id, 'attempt', attempts,"
           " 'max_attempts', max_attempts) FROM c),"
           " wnd AS (UPDATE commandbus.type_limit t SET window_start = date_trunc('second', now()),"
           " window_taken = CASE WHEN t.window_start = date_trunc('second', now()) THEN t.window_taken ELSE 0 END + x.n"
           " FROM (SELECT command_type, count(*) AS n FROM c GROUP BY command_type) x"
           " WHERE t.domain = $3 AND t.command_type = x.command_type AND t.per_second IS NOT NULL)"
           " SELECT m.msg_id, m.read_ct, c.command_id::text, c.command_type, (m.message->'data')::text,"
           " c.attempts, c.max_attempts, c.correlation_id::text, nullif(c.reply_queue, ''), c.batch_id::text,"
           " jsonb_typeof(m.message), m.command_id::text,"
           " CASE WHEN c.command_id IS NULL THEN (SELECT k2.status FROM commandbus.command k2"
           " WHERE k2.domain = $3 AND k2.command_id = m.command_id) END, coalesce(m.priority, 0)"
           " FROM m LEFT JOIN c ON c.msg_id = m.msg_id ORDER BY coalesce(m.priority, 0) DESC, m.msg_id",
           q, q, q, q);
#undef NOT_FULL
}

/* What metrics and heartbeats see of the worker (any thread). */
static void report(void *self, cb_runner_stat *s) {
  cb_worker *w = self;
  cb_worker_health h;
  cb_worker_health_get(w, &h);
  snprintf(s->state, sizeof s->state, "%s", h.state);
  s->in_flight = h.in_flight;
  s->successes = h.successes;
  s->failures = h.failures;
  s->retries = h.retries;
  s->consecutive_failures = h.consecutive_failures;
  s->stuck = h.stuck;
  s->poison = h.poison;
  s->last_success_at = h.last_success_at;
  _Static_assert(CB_RUNNER_REMOVED_KINDS == CB_RETENTION_KINDS, "a heartbeat carries every kind retention removes");
  cb_retention_counts_values(&h.upkeep.removed, s->removed);
  s->scheduled = h.upkeep.scheduled;
}

static void stop_runner(void *self) { cb_worker_stop(self); }

int cb_worker_new(cb_runtime *rt, const cb_worker_options *opts, cb_worker **out, cb_err *err) {
  *out = NULL;
  int rc = cb_domain_valid(opts->domain, err);
  if (rc != CB_OK) return rc;
  if (opts->visibility_timeout <= 0) return cb_err_set(err, CB_EINVAL, "visibility_timeout must be positive");
  if (opts->statement_timeout <= 0) return cb_err_set(err, CB_EINVAL, "statement_timeout must be positive");
  if (opts->statement_timeout >= opts->visibility_timeout)
    return cb_err_set(err, CB_EINVAL,
                      "statement_timeout (%g s) must be shorter than visibility_timeout (%g s): otherwise a "
                      "slow acknowledgement could outlive the message's invisibility and the command run twice",
                      opts->statement_timeout, opts->visibility_timeout);
  if (opts->poll_interval <= 0) return cb_err_set(err, CB_EINVAL, "poll_interval must be positive");
  if (opts->nbackoff < 0 || opts->nbackoff > CB_MAX_BACKOFF)
    return cb_err_set(err, CB_EINVAL, "backoff has %d entries; at most %d allowed", opts->nbackoff, CB_MAX_BACKOFF);
  for (int i = 0; i < opts->nbackoff; i++)
    if (opts->backoff[i] < 0) return cb_err_set(err, CB_EINVAL, "backoff[%d] must not be negative", i + 1);

  cb_worker *w = calloc(1, sizeof *w);
  if (w == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  w->rt = rt;
  w->o = *opts;
  snprintf(w->domain, sizeof w->domain, "%s", opts->domain);
  w->o.domain = w->domain;
  cb_command_queue_name(w->domain, w->queue);
  snprintf(w->channel, sizeof w->channel, "pgmq_notify_%s", w->queue);
  w->lanes = opts->lanes > 0 ? opts->lanes : cb_default_threads();
  if (w->lanes > CB_MESSAGE_ROUTER_MAX_LANES) w->lanes = CB_MESSAGE_ROUTER_MAX_LANES;
  w->capacity = w->lanes * 2;
  build_receive_sql(w);
  w->runner.kind = "worker";
  w->runner.domain = w->domain;
  w->runner.lanes = w->lanes;
  w->runner.report = report;
  w->runner.stop = stop_runner;
  w->runner.self = w;
  cb_upkeep_options uo = {.retention = opts->retention, .retention_interval = opts->retention_interval,
                          .schedules = opts->schedules, .statement_timeout = opts->statement_timeout};
  w->upkeep = cb_upkeep_new(rt, w->domain, &uo);
  pthread_mutex_init(&w->lock, NULL);
  pthread_cond_init(&w->changed, NULL);
  w->state = STATE_STARTING;
  w->watch_id = -1;
  w->current = calloc((size_t)w->lanes, sizeof *w->current);
  w->buffers = calloc((size_t)w->lanes, sizeof *w->buffers);
  cb_message_router_config cfg;
  cb_message_router_config_init(&cfg);
  cfg.lanes = w->lanes;
  cfg.batch_size = 16;
  cfg.batch_timeout_ms = 0; /* hand work over at once: fetches are batches already */
  cfg.policy = CB_MESSAGE_ROUTER_BLOCK;
  cfg.block_timeout_ms = -1; /* never drop a received command */
  cfg.ingress_capacity = 4 * FETCH_MAX + 64;
  cfg.lane_capacity = 4 * FETCH_MAX + 1;
  if (w->current == NULL || w->buffers == NULL || w->upkeep == NULL || cb_message_router_new(&w->router, &cfg) != 0) {
    cb_worker_free(w);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  w->runner.router = w->router;
  rc = cb_bus_ensure_command_queue(rt, w->domain, 1, err);
  if (rc == CB_OK) rc = cb_runtime_listen(rt, w->channel, err);
  if (rc != CB_OK) {
    cb_worker_free(w);
    return rc;
  }
  *out = w;
  return CB_OK;
}

int cb_worker_lanes(const cb_worker *w) { return w->lanes; }
const char *cb_worker_domain(const cb_worker *w) { return w->domain; }

static void set_state(cb_worker *w, int state) {
  pthread_mutex_lock(&w->lock);
  w->state = state;
  w->health.state = state_names[state];
  pthread_cond_broadcast(&w->changed);
  pthread_mutex_unlock(&w->lock);
}

/* ---- fetching (loop) ---------------------------------------------------------------- */

static void maybe_fetch(cb_worker *w);
static void maybe_finalize(cb_worker *w);
static void poll_at_next_second(cb_worker *w);

static int add_timeout(cb_unit *u, const cb_worker *w) { return cb_add_keyed_begin(u, w->o.statement_timeout); }

static const char *poison_reason(const cb_result *r, int row) {
  const char *type = cb_result_value(r, row, 10);
  if (strcmp(type, "object") != 0) return "NOT_AN_OBJECT";
  if (cb_result_is_null(r, row, 11)) return "INVALID_COMMAND_ID";
  if (cb_result_is_null(r, row, 12)) return "UNKNOWN_COMMAND";
  const char *status = cb_result_value(r, row, 12);
  if (strcmp(status, "PENDING") == 0 || strcmp(status, "IN_PROGRESS") == 0) return "DUPLICATE_MESSAGE";
  return "COMMAND_ALREADY_DONE";
}

static void on_acked(cb_unit *u, void *arg);

/* Archives poison messages with an audit row each (reason in the details). */
static void set_aside(cb_worker *w, cb_strbuf *poison) {
  cb_unit *u = cb_unit_new();
  if (u == NULL) return;
  char sql[1024], archive[512];
  cb_queue_archive_ctes(archive, sizeof archive, w->queue, "ARRAY(SELECT msg FROM i)");
  snprintf(sql, sizeof sql,
           "WITH i AS (SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(msg bigint, id uuid, reason text)), %s,"
           " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
           " SELECT $1, coalesce(i.id, '00000000-0000-0000-0000-000000000000'), 'MESSAGE_REJECTED',"
           " jsonb_build_object('msg_id', i.msg, 'reason', i.reason, 'queue', $3::text) FROM i)"
           " SELECT count(*) FROM x",
           archive);
  add_timeout(u, w);
  const char *params[] = {w->domain, poison->data, w->queue};
  cb_unit_add(u, sql, 3, params);
  cb_unit_on_done(u, on_acked, w);
  w->acks_pending++;
  if (cb_runtime_submit(w->rt, &u, 1) != CB_OK) {
    w->acks_pending--;
    cb_unit_free(u);
  }
}

static void refresh_batches(cb_worker *w, const char **ids, size_t n);

/* Batches recently seen started need no refresh when more of their commands
 * arrive (a small ring: forgetting one only costs a cheap refresh). */
static int batch_seen_started(cb_worker *w, const char *batch_id) {
  for (int i = 0; i < 16; i++)
    if (strcmp(w->started_batches[i], batch_id) == 0) return 1;
  snprintf(w->started_batches[w->started_next], CB_UUID_LEN + 1, "%s", batch_id);
  w->started_next = (w->started_next + 1) % 16;
  return 0;
}

/* Takes the rows of a completed receive statement (statement `index` of u):
 * sets poison aside, routes the rest to the lanes. Does not free u. */
static void handle_fetched(cb_worker *w, cb_unit *u, int index) {
  const cb_result *r = cb_unit_result(u, index);
  int rows = cb_result_rows(r);
  double fetched_at = now_unix();
  cb_message_router_entry entries[4 * FETCH_MAX];
  int n = 0;
  int64_t lowest = 0; /* of priority 0 */
  cb_strbuf poison = {0};
  const char *batches[FETCH_MAX];
  size_t nbatches = 0;
  for (int i = 0; i < rows; i++) {
    int64_t msg_id = cb_result_int(r, i, 0);
    if (cb_result_int(r, i, 13) == 0 && (lowest == 0 || msg_id < lowest)) lowest = msg_id;
    if (cb_result_is_null(r, i, 2)) {
      const char *reason = poison_reason(r, i);
      const char *id = cb_result_is_null(r, i, 11) ? NULL : cb_result_value(r, i, 11);
      cb_log(CB_LOG_WARN, "worker %s: message %s set aside (%s)%s%s", w->domain, cb_result_value(r, i, 0), reason,
             id ? " for command " : "", id ? id : "");
      cb_strbuf_putc(&poison, poison.len ? ',' : '[');
      cb_strbuf_printf(&poison, "{\"msg\":%s,\"id\":%s%s%s,\"reason\":\"%s\"}", cb_result_value(r, i, 0),
                       id ? "\"" : "", id ? id : "null", id ? "\"" : "", reason);
      continue;
    }
    cb_work *work = work_new(r, i);
    if (work == NULL) continue; /* redelivered after the visibility timeout */
    cb_hub_changed(cb_runtime_hub(w->rt), w->domain, work->command_id); /* received: a state change */
    work->started_at = fetched_at;
    if (work->batch_id && nbatches < FETCH_MAX && !batch_seen_started(w, work->batch_id))
      batches[nbatches++] = work->batch_id;
    entries[n].key = work->correlation_id ? work->correlation_id : work->command_id;
    entries[n].len = strlen(entries[n].key);
    entries[n].item = work;
    n++;
  }
  if (poison.len) {
    cb_strbuf_putc(&poison, ']');
    pthread_mutex_lock(&w->lock);
    w->health.poison += (uint64_t)(rows - n);
    pthread_mutex_unlock(&w->lock);
    set_aside(w, &poison);
  }
  cb_strbuf_free(&poison);
  if (nbatches) refresh_batches(w, batches, nbatches); /* BATCH_STARTED */
  if (n > 0) {
    w->in_flight += n;
    long routed = cb_message_router_route_many(w->router, entries, (size_t)n);
    for (long i = routed < 0 ? 0 : routed; i < n; i++) { /* only when stopping: redelivered later */
      work_free(entries[i].item);
      w->in_flight--;
    }
  }
  w->more_waiting = rows > 0;
  if (lowest) w->scan_from = lowest;
  /* Limited command types that had no room wait for the next second's
   * window: poll then rather than at the next poll interval. */
  if (cb_result_rows(cb_unit_result(u, index - 1)) > 0 && rows < w->asked) poll_at_next_second(w);
}

static void on_fetched(cb_unit *u, void *arg) {
  cb_worker *w = arg;
  w->fetching = 0;
  if (cb_unit_status(u) != CB_OK) {
    const cb_err *e = cb_unit_error(u);
    if (!w->fetch_failing) /* once per outage, not once per poll */
      cb_log(CB_LOG_WARN, "worker %s: fetch failed (%s: %s); retrying at each poll", w->domain,
             cb_strerror(e->code), e->message);
    w->fetch_failing = 1;
    w->more_waiting = 0; /* next try at the poll, not at once */
  } else {
    if (w->fetch_failing) cb_log(CB_LOG_INFO, "worker %s: fetching again", w->domain);
    w->fetch_failing = 0;
    handle_fetched(w, u, cb_unit_count(u) - 1); /* the receive is the unit's last statement */
  }
  int more = w->more_waiting || (w->wake_pending && !w->fetch_failing);
  cb_unit_free(u);
  if (more) maybe_fetch(w); /* there may be more, or a send came while this fetch was on its way */
  maybe_finalize(w);
}

/* How many works may wait for lanes: enough for each lane to keep busy for a
 * quarter of the visibility timeout at the handlers' measured pace (fast
 * handlers: large batches, few transactions), never fewer than two per lane.
 * A work that still waits too long is not run (see cb_worker_take). */
static int capacity(cb_worker *w) {
  pthread_mutex_lock(&w->lock);
  double avg = w->avg_handler_s;
  pthread_mutex_unlock(&w->lock);
  double per_lane = 2;
  if (avg > 0) {
    per_lane = 0.25 * w->o.visibility_timeout / avg;
    if (per_lane < 2) per_lane = 2;
    if (per_lane > 256) per_lane = 256;
  }
  double c = per_lane * w->lanes;
  if (c > 4 * FETCH_MAX) c = 4 * FETCH_MAX;
  return (int)c;
}

/* How many to fetch now (0: not now). */
static int fetch_room(cb_worker *w) {
  if (w->fetching || w->stop_seen || w->finalized) return 0;
  w->capacity = capacity(w);
  int room = w->capacity - w->in_flight;
  if (room <= 0) return 0;
  /* Batches of at least a few, so that a busy queue is read in bulk. */
  if (w->in_flight > 0 && room < w->capacity / 4 && room < FETCH_MAX / 4) return 0;
  return room > FETCH_MAX ? FETCH_MAX : room;
}

/* Appends the lock of the domain's limits and the receive statement for
 * `room` commands; returns the receive's index (the lock's is one less). */
static int add_receive(cb_unit *u, cb_worker *w, int room) {
  char qty[16], vt[32], from[24];
  snprintf(qty, sizeof qty, "%d", room);
  snprintf(vt, sizeof vt, "%.3f", w->o.visibility_timeout);
  snprintf(from, sizeof from, "%lld", w->full_scan_due ? 0LL : (long long)w->scan_from);
  w->full_scan_due = 0;
  w->wake_pending = 0; /* this receive runs after the notification: it sees what was sent */
  w->asked = room;
  const char *params[] = {qty, vt, w->domain, from};
  if (cb_limits_add_lock(u, w->domain) < 0) return -1;
  return cb_unit_add(u, w->receive_sql, 4, params);
}

static void maybe_fetch(cb_worker *w) {
  int room = fetch_room(w);
  if (room == 0) return;
  cb_unit *u = cb_unit_new();
  if (u == NULL) return;
  add_timeout(u, w);
  add_receive(u, w, room);
  cb_unit_on_done(u, on_fetched, w);
  w->fetching = 1;
  if (cb_runtime_submit(w->rt, &u, 1) != CB_OK) {
    w->fetching = 0;
    cb_unit_free(u);
  }
}

/* A send committed. A fetch on its way may have read the queue before it:
 * the notification is kept (wake_pending) until a receive built after it
 * has run, so that it never waits for the next poll. */
static void on_notified(void *arg) {
  cb_worker *w = arg;
  w->wake_pending = 1;
  maybe_fetch(w);
}
static void flush_acks(cb_worker *w);
static void on_poll(uv_timer_t *t);

/* Brings the next poll forward to just past the next whole second, when a
 * rate window opens (the poll keeps its interval after that). */
static void poll_at_next_second(cb_worker *w) {
  if (!w->timers_open || w->stop_seen) return;
  double now = now_unix();
  uint64_t wait_ms = (uint64_t)((floor(now) + 1 - now) * 1000) + 5;
  if (uv_timer_get_due_in(&w->poll_timer) <= wait_ms) return;
  uint64_t poll_ms = (uint64_t)(w->o.poll_interval * 1000);
  uv_timer_start(&w->poll_timer, on_poll, wait_ms, poll_ms ? poll_ms : 1);
}

static void on_poll(uv_timer_t *t) {
  cb_worker *w = t->data;
  w->full_scan_due = 1;
  w->acks_held = 0; /* outcomes kept while the database was away: try again */
  flush_acks(w);
  maybe_fetch(w);
}

/* ---- acknowledging (loop) --------------------------------------------------------- */

static double backoff_for(const cb_worker *w, int attempt) {
  if (w->o.nbackoff == 0) return 0;
  int i = attempt - 1;
  if (i < 0) i = 0;
  if (i >= w->o.nbackoff) i = w->o.nbackoff - 1;
  return w->o.backoff[i];
}

/* What a work's outcome means for the command. */
enum { ACK_SUCCESS, ACK_RETRY, ACK_TSQ, ACK_FAILED, ACK_KINDS };

static int ack_kind(const cb_work *work) {
  switch (work->outcome) {
    case CB_OUTCOME_SUCCESS: return ACK_SUCCESS;
    case CB_OUTCOME_BUSINESS_RULE: return ACK_FAILED;
    case CB_OUTCOME_PERMANENT: return ACK_TSQ;
    default: return work->attempt >= work->max_attempts ? ACK_TSQ : ACK_RETRY;
  }
}

static void json_or_null(cb_strbuf *b, const char *json) { cb_strbuf_puts(b, json ? json : "null"); }

static void append_input(cb_strbuf *b, const cb_worker *w, const cb_work *work, int kind) {
  cb_strbuf_putc(b, b->len ? ',' : '[');
  cb_strbuf_printf(b, "{\"id\":\"%s\",\"msg\":%lld,\"attempt\":%d", work->command_id, (long long)work->msg_id,
                   work->attempt);
  if (kind == ACK_SUCCESS) {
    cb_strbuf_puts(b, ",\"result\":");
    json_or_null(b, work->result_json);
    cb_strbuf_printf(b, ",\"has\":%s", work->result_json && strcmp(work->result_json, "null") ? "true" : "false");
    cb_strbuf_putc(b, '}');
    return;
  }
  cb_strbuf_puts(b, ",\"code\":");
  cb_strbuf_json_string(b, work->error_code ? work->error_code : "ERROR");
  cb_strbuf_puts(b, ",\"message\":");
  cb_strbuf_json_string(b, work->error_message ? work->error_message : "");
  if (kind == ACK_RETRY) cb_strbuf_printf(b, ",\"delay\":%.3f", backoff_for(w, work->attempt));
  if (kind == ACK_TSQ)
    cb_strbuf_printf(b, ",\"etype\":\"%s\",\"exhausted\":%s",
                     work->outcome == CB_OUTCOME_PERMANENT ? "PERMANENT" : "TRANSIENT",
                     work->outcome == CB_OUTCOME_PERMANENT ? "false" : "true");
  if (kind == ACK_FAILED || kind == ACK_TSQ) {
    cb_strbuf_puts(b, ",\"details\":");
    json_or_null(b, work->error_details_json);
  }
  cb_strbuf_putc(b, '}');
}

/* The reply CTEs for the listed reply queues (names are validated queue names:
 * they were checked when the command was sent, and again here). */
static void reply_ctes(cb_strbuf *sql, char reply[][CB_QUEUE_NAME_MAX + 1], int nreply, const char *message) {
  for (int i = 0; i < nreply; i++)
    cb_strbuf_printf(sql,
                     ", r%d AS (INSERT INTO pgmq.q_%s (vt, message) SELECT clock_timestamp(), %s FROM c"
                     " WHERE reply_queue = '%s')",
                     i, reply[i], message, reply[i]);
}

/* Each statement moves only commands still IN_PROGRESS *at the attempt this
 * outcome belongs to* (a delivery that outlived its visibility timeout may
 * have been received again elsewhere: its late outcome must not touch the
 * newer delivery), and touches the queue only for the commands it moved. */
static void ack_statement(cb_strbuf *sql, const cb_worker *w, int kind, char reply[][CB_QUEUE_NAME_MAX + 1],
                          int nreply) {
  const char *q = w->queue;
  char archive[512] = ""; /* the message of each command moved (TSQ, FAILED) */
  if (kind == ACK_TSQ || kind == ACK_FAILED)
    cb_queue_archive_ctes(archive, sizeof archive, q, "ARRAY(SELECT msg FROM c)");
  cb_strbuf_reset(sql);
  switch (kind) {
    case ACK_SUCCESS:
      cb_strbuf_printf(sql,
                       "WITH i AS (SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(id uuid, msg bigint, attempt int, result jsonb,"
                       " has bool)),"
                       " c AS (UPDATE commandbus.command k SET status = 'COMPLETED', updated_at = now(),"
                       " lease_expires_at = NULL FROM i WHERE k.domain = $1 AND k.command_id = i.id AND k.command_id = ANY(ARRAY(SELECT id FROM i)) AND k.attempts = i.attempt"
                       " AND " CB_STATUS_OF("k") " = 'IN_PROGRESS' RETURNING k.command_id, k.correlation_id, k.reply_queue,"
                       " k.batch_id, i.msg, i.result, i.has),"
                       " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
                       " SELECT $1, command_id, 'COMPLETED', jsonb_build_object('msg_id', msg, 'reply_to',"
                       " nullif(reply_queue, ''), 'has_result', has) FROM c),"
                       " d AS (DELETE FROM pgmq.q_%s q WHERE q.msg_id = ANY(ARRAY(SELECT msg FROM c)))",
                       q);
      reply_ctes(sql, reply, nreply,
                 "jsonb_build_object('command_id', command_id, 'correlation_id', correlation_id,"
                 " 'outcome', 'SUCCESS', 'result', result)");
      break;
    case ACK_RETRY:
      cb_strbuf_printf(sql,
                       "WITH i AS (SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(id uuid, msg bigint, attempt int, code text,"
                       " message text, delay float8)),"
                       " c AS (UPDATE commandbus.command k SET last_error_type = 'TRANSIENT', last_error_code = i.code,"
                       " last_error_msg = i.message, updated_at = now(), lease_expires_at = NULL FROM i WHERE k.domain = $1"
                       " AND k.command_id = i.id AND k.command_id = ANY(ARRAY(SELECT id FROM i)) AND k.attempts = i.attempt AND " CB_STATUS_OF("k") " = 'IN_PROGRESS'"
                       " RETURNING k.command_id, k.batch_id, k.attempts, k.max_attempts, i.msg, i.code, i.message,"
                       " i.delay),"
                       " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
                       " SELECT $1, command_id, 'FAILED', jsonb_build_object('msg_id', msg, 'attempt', attempts,"
                       " 'max_attempts', max_attempts, 'error_type', 'TRANSIENT', 'error_code', code,"
                       " 'error_msg', message) FROM c),"
                       " v AS (UPDATE pgmq.q_%s q SET vt = clock_timestamp() + make_interval(secs => c.delay)"
                       " FROM c WHERE q.msg_id = c.msg)",
                       q);
      break;
    case ACK_TSQ:
      cb_strbuf_printf(sql,
                       "WITH i AS (SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(id uuid, msg bigint, attempt int, code text,"
                       " message text, etype text, exhausted bool, details jsonb)),"
                       " c AS (UPDATE commandbus.command k SET status = 'IN_TROUBLESHOOTING_QUEUE',"
                       " last_error_type = i.etype, last_error_code = i.code, last_error_msg = i.message,"
                       " updated_at = now(), lease_expires_at = NULL FROM i WHERE k.domain = $1"
                       " AND k.command_id = i.id AND k.command_id = ANY(ARRAY(SELECT id FROM i)) AND k.attempts = i.attempt AND " CB_STATUS_OF("k") " = 'IN_PROGRESS'"
                       " RETURNING k.command_id, k.batch_id, k.attempts, k.max_attempts, k.correlation_id, i.msg, i.code,"
                       " i.message, i.etype, i.exhausted, i.details),"
                       /* One MOVED_TO_TSQ event, with rcmd's details: an
                        * exhausted command's last error, or a permanent
                        * failure's code, message and details. */
                       " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
                       " SELECT $1, c.command_id, 'MOVED_TO_TSQ', CASE WHEN c.exhausted THEN jsonb_build_object('msg_id',"
                       " c.msg, 'attempt', c.attempts, 'max_attempts', c.max_attempts, 'reason', 'EXHAUSTED',"
                       " 'error_type', c.etype, 'error_code', c.code, 'error_msg', c.message) ELSE"
                       " jsonb_build_object('msg_id', c.msg, 'attempt', c.attempts, 'error_code', c.code,"
                       " 'error_msg', c.message, 'error_details', c.details) END FROM c),"
                       " %s,"
                       /* A process step that lands in the TSQ pauses its
                        * process until the operator acts (a probe by key;
                        * commands of no process change nothing). */
                       " pw AS (UPDATE commandbus.process pr SET status = 'WAITING_FOR_TSQ', updated_at = now() FROM c"
                       " WHERE pr.domain = $1 AND pr.process_id = c.correlation_id AND " CB_STATUS_OF("pr") " = 'WAITING')",
                       archive);
      break;
    case ACK_FAILED:
      cb_strbuf_printf(sql,
                       "WITH i AS (SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(id uuid, msg bigint, attempt int, code text,"
                       " message text, details jsonb)),"
                       " c AS (UPDATE commandbus.command k SET status = 'FAILED', last_error_type = 'BUSINESS_RULE',"
                       " last_error_code = i.code, last_error_msg = i.message, updated_at = now(),"
                       " lease_expires_at = NULL FROM i WHERE k.domain = $1 AND k.command_id = i.id AND k.command_id = ANY(ARRAY(SELECT id FROM i)) AND k.attempts = i.attempt"
                       " AND " CB_STATUS_OF("k") " = 'IN_PROGRESS' RETURNING k.command_id, k.correlation_id, k.reply_queue,"
                       " k.batch_id, k.attempts, i.msg, i.code, i.message, i.details),"
                       " a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)"
                       " SELECT $1, command_id, 'BUSINESS_RULE_FAILED', jsonb_build_object('msg_id', msg,"
                       " 'attempt', attempts, 'error_code', code, 'error_msg', message, 'error_details', details)"
                       " FROM c), %s",
                       archive);
      reply_ctes(sql, reply, nreply,
                 "jsonb_build_object('command_id', command_id, 'correlation_id', correlation_id,"
                 " 'outcome', 'FAILED', 'result', jsonb_build_object('error_code', code, 'error_message', message,"
                 " 'error_details', details), 'error_code', code, 'error_message', message)");
      break;
  }
  /* Other processes hear of the change from the command table's trigger
   * (core/sql/004_command_notify.sql), only when someone awaits it. */
  cb_strbuf_puts(sql, " SELECT command_id::text AS command_id, batch_id::text AS batch_id FROM c");
}

/* One acknowledgement transaction: its works, so that a failure can retry
 * them one by one. */
typedef struct ack_round {
  cb_worker *w;
  cb_work *works;  /* linked through next */
  int single;      /* already one work: no further split */
  int fetch_index; /* the receive riding along in this transaction, or -1 */
  int events_index; /* the process events read back, or -1 */
} ack_round;

static void submit_round(cb_worker *w, cb_work *works, int single);

static void on_acked(cb_unit *u, void *arg) {
  cb_worker *w = arg;
  w->acks_pending--;
  if (cb_unit_status(u) != CB_OK) {
    const cb_err *e = cb_unit_error(u);
    cb_log(CB_LOG_WARN, "worker %s: setting messages aside failed (%s: %s); they will come back", w->domain,
           cb_strerror(e->code), e->message);
  }
  cb_unit_free(u);
  maybe_finalize(w);
}

static void flush_acks(cb_worker *w);

static void on_round_done(cb_unit *u, void *arg) {
  ack_round *round = arg;
  cb_worker *w = round->w;
  w->acks_pending--;
  w->rounds_in_flight--;
  int more = 0;
  if (round->fetch_index >= 0) {
    w->fetching = 0;
    if (cb_unit_status(u) == CB_OK) {
      handle_fetched(w, u, round->fetch_index);
      more = w->more_waiting || w->wake_pending;
    }
  }
  if (cb_unit_status(u) != CB_OK && cb_unit_status(u) == CB_ECONNECTION && !w->abandon_acks) {
    /* The database is away: keep the outcomes and try again at the next
     * poll (the statements are guarded, so a repeat changes nothing). */
    const cb_err *e = cb_unit_error(u);
    if (!w->ack_failing) /* once per outage, not once per attempt */
      cb_log(CB_LOG_WARN, "worker %s: cannot acknowledge outcomes (%s); keeping them to try again at each poll",
             w->domain, e->message);
    w->ack_failing = 1;
    cb_work *last = round->works;
    if (last) {
      while (last->next) last = last->next;
      last->next = w->ack_head;
      if (w->ack_head == NULL) w->ack_tail = last;
      w->ack_head = round->works;
      round->works = NULL;
    }
    w->acks_held = 1; /* not again before the next poll: no busy loop */
  } else if (cb_unit_status(u) != CB_OK) {
    const cb_err *e = cb_unit_error(u);
    if (round->single && round->works && round->works->reply_to && !round->works->reply_dropped) {
      /* Most likely the reply queue is gone: record the outcome without
       * the reply rather than run the handler again forever. */
      cb_work *work = round->works;
      cb_log(CB_LOG_ERROR, "worker %s: acknowledging command %s with a reply to %s failed (%s); recording its "
             "outcome without the reply", w->domain, work->command_id, work->reply_to, e->message);
      work->reply_to = NULL;
      work->reply_dropped = 1;
      round->works = NULL;
      submit_round(w, work, 1);
    } else if (!round->single) {
      cb_log(CB_LOG_WARN, "worker %s: acknowledging a round failed (%s: %s); acknowledging one by one", w->domain,
             cb_strerror(e->code), e->message);
      cb_work *works = round->works;
      while (works) {
        cb_work *next = works->next;
        works->next = NULL;
        submit_round(w, works, 1);
        works = next;
      }
      round->works = NULL;
    } else {
      cb_log(CB_LOG_ERROR,
             "worker %s: cannot record the outcome of command %s (%s: %s); its message reappears after the "
             "visibility timeout",
             w->domain, round->works->command_id, cb_strerror(e->code), e->message);
    }
  } else {
    if (w->ack_failing) cb_log(CB_LOG_INFO, "worker %s: acknowledging again", w->domain);
    w->ack_failing = 0;
    cb_events_published(w->rt, u, round->events_index);
    /* Batches whose commands reached a terminal state: refresh them (after
     * this commit, so that the last one to finish sees every other). */
    const char *ids[64];
    size_t n = 0;
    for (int st = 0; st < cb_unit_count(u); st++) {
      const cb_result *r = cb_unit_result(u, st);
      if (cb_result_columns(r) != 2 || strcmp(cb_result_column_name(r, 1), "batch_id") != 0) continue;
      for (int row = 0; row < cb_result_rows(r); row++) {
        cb_hub_changed(cb_runtime_hub(w->rt), w->domain, cb_result_value(r, row, 0)); /* local waiters */
        if (cb_result_is_null(r, row, 1)) continue;
        const char *id = cb_result_value(r, row, 1);
        int seen = 0;
        for (size_t k = 0; k < n && !seen; k++) seen = strcmp(ids[k], id) == 0;
        if (seen) continue;
        if (n == 64) { /* many batches in one round: refresh these, go on */
          refresh_batches(w, ids, n);
          n = 0;
        }
        ids[n++] = id;
      }
    }
    if (n) refresh_batches(w, ids, n);
  }
  cb_work *works = round->works;
  while (works) {
    cb_work *next = works->next;
    work_free(works);
    works = next;
  }
  free(round);
  cb_unit_free(u);
  flush_acks(w);
  if (more || w->rounds_in_flight == 0) maybe_fetch(w);
  maybe_finalize(w);
}

/* Builds one transaction for the works (any mix of outcomes) and submits it. */
static void submit_round(cb_worker *w, cb_work *works, int single) {
  cb_strbuf input[ACK_KINDS] = {{0}};
  char reply[ACK_KINDS][MAX_REPLY_QUEUES][CB_QUEUE_NAME_MAX + 1];
  int nreply[ACK_KINDS] = {0};
  cb_work *overflow = NULL; /* works whose reply queue did not fit this round */
  cb_work *kept = NULL, **kept_tail = &kept;
  for (cb_work *work = works, *next; work; work = next) {
    next = work->next;
    work->next = NULL;
    int kind = ack_kind(work);
    if (work->reply_to && (kind == ACK_SUCCESS || kind == ACK_FAILED)) {
      int found = 0;
      for (int i = 0; i < nreply[kind] && !found; i++) found = strcmp(reply[kind][i], work->reply_to) == 0;
      if (!found) {
        if (nreply[kind] == MAX_REPLY_QUEUES || cb_queue_name_valid(work->reply_to, NULL) != CB_OK) {
          work->next = overflow;
          overflow = work;
          continue;
        }
        snprintf(reply[kind][nreply[kind]++], CB_QUEUE_NAME_MAX + 1, "%s", work->reply_to);
      }
    }
    append_input(&input[kind], w, work, kind);
    *kept_tail = work;
    kept_tail = &work->next;
  }
  cb_unit *u = cb_unit_new();
  ack_round *round = calloc(1, sizeof *round);
  cb_strbuf sql = {0};
  int ok = u != NULL && round != NULL;
  if (ok) add_timeout(u, w);
  /* A step moved to the TSQ pauses its process: an event (rare, so only
   * then is the transaction asked to collect what it appends). */
  int collect = ok && input[ACK_TSQ].len > 0, events_index = -1;
  if (collect) cb_events_add_begin(u);
  for (int kind = 0; ok && kind < ACK_KINDS; kind++) {
    if (input[kind].len == 0) continue;
    cb_strbuf_putc(&input[kind], ']');
    ack_statement(&sql, w, kind, reply[kind], nreply[kind]);
    const char *params[] = {w->domain, input[kind].data};
    ok = !sql.failed && !input[kind].failed && cb_unit_add(u, sql.data, 2, params) >= 0;
    for (int i = 0; ok && i < nreply[kind]; i++) ok = cb_queue_add_notify(u, reply[kind][i]) >= 0;
  }
  if (ok && collect && (events_index = cb_events_add_read(u)) < 0) ok = 0;
  for (int kind = 0; kind < ACK_KINDS; kind++) cb_strbuf_free(&input[kind]);
  cb_strbuf_free(&sql);
  /* The next fetch rides in the same transaction: one commit and one round
   * trip per cycle of acknowledge-and-receive. */
  int fetch_index = -1;
  int room = ok && !single ? fetch_room(w) : 0;
  if (room > 0 && (fetch_index = add_receive(u, w, room)) < 0) ok = 0;
  if (!ok) { /* out of memory: the messages reappear after the visibility timeout */
    cb_log(CB_LOG_ERROR, "worker %s: out of memory acknowledging; messages will be redelivered", w->domain);
    for (cb_work *work = kept, *next; work; work = next) {
      next = work->next;
      work_free(work);
    }
    cb_unit_free(u);
    free(round);
  } else {
    round->w = w;
    round->works = kept;
    round->single = single;
    round->fetch_index = fetch_index;
    round->events_index = events_index;
    if (fetch_index >= 0) w->fetching = 1;
    cb_unit_on_done(u, on_round_done, round);
    w->acks_pending++;
    w->rounds_in_flight++;
    if (cb_runtime_submit(w->rt, &u, 1) != CB_OK) {
      w->acks_pending--;
      w->rounds_in_flight--;
      if (fetch_index >= 0) w->fetching = 0;
      round->works = NULL;
      for (cb_work *work = kept, *next; work; work = next) {
        next = work->next;
        work_free(work);
      }
      free(round);
      cb_unit_free(u);
    }
  }
  while (overflow) { /* rare: many reply queues in one round, or a bad name */
    cb_work *next = overflow->next;
    overflow->next = NULL;
    if (cb_queue_name_valid(overflow->reply_to, NULL) != CB_OK) {
      cb_log(CB_LOG_ERROR, "worker %s: command %s has an invalid reply queue `%s`; no reply sent", w->domain,
             overflow->command_id, overflow->reply_to);
      overflow->reply_to = NULL;
    }
    submit_round(w, overflow, 1);
    overflow = next;
  }
}

/* Loop: takes every outcome lanes handed back and acknowledges them. */
static void on_outcomes(cb_runtime *rt, void *arg) {
  (void)rt;
  cb_worker *w = arg;
  pthread_mutex_lock(&w->lock);
  cb_work *works = w->done_head;
  w->done_head = w->done_tail = NULL;
  w->done_scheduled = 0;
  pthread_mutex_unlock(&w->lock);
  cb_work *to_ack = NULL, **tail = &to_ack;
  while (works) {
    cb_work *next = works->next;
    works->next = NULL;
    w->in_flight--;
    if (works->outcome == CB_OUTCOME_NONE) { /* abandoned at stop: redelivered later */
      work_free(works);
    } else {
      *tail = works;
      tail = &works->next;
    }
    works = next;
  }
  if (to_ack) {
    if (w->ack_tail) w->ack_tail->next = to_ack;
    else w->ack_head = to_ack;
    while (*tail) tail = &(*tail)->next;
    w->ack_tail = (cb_work *)((char *)tail - offsetof(cb_work, next));
  }
  flush_acks(w);
  maybe_fetch(w);
  maybe_finalize(w);
}

/* Group commit: while a round is on its way, outcomes gather here and leave
 * together in the next round, one transaction for all of them. */
static void flush_acks(cb_worker *w) {
  if (w->rounds_in_flight >= MAX_ROUNDS_IN_FLIGHT || w->ack_head == NULL || w->acks_held) return;
  cb_work *works = w->ack_head;
  w->ack_head = w->ack_tail = NULL;
  submit_round(w, works, works->next == NULL);
}

/* ---- batches ---------------------------------------------------------------------- */

static void on_batch_refreshed(cb_unit *u, void *arg) {
  cb_worker *w = arg;
  w->acks_pending--;
  if (cb_unit_status(u) != CB_OK)
    cb_log(CB_LOG_WARN, "worker %s: batch refresh failed (%s); it is refreshed again when read", w->domain,
           cb_unit_error(u)->message);
  cb_unit_free(u);
  maybe_finalize(w);
}

static void refresh_batches(cb_worker *w, const char **ids, size_t n) {
  cb_unit *u = cb_unit_new();
  if (u == NULL) return;
  add_timeout(u, w);
  for (size_t i = 0; i < n; i++) {
    int seen = 0;
    for (size_t j = 0; j < i && !seen; j++) seen = strcmp(ids[i], ids[j]) == 0;
    if (!seen) cb_bus_add_batch_refresh(u, w->domain, ids[i]);
  }
  cb_unit_on_done(u, on_batch_refreshed, w);
  w->acks_pending++;
  if (cb_runtime_submit(w->rt, &u, 1) != CB_OK) {
    w->acks_pending--;
    cb_unit_free(u);
  }
}

/* ---- stuck handlers, stop and finalization (loop) ------------------------------------ */

static void on_stuck_check(uv_timer_t *t) {
  cb_worker *w = t->data;
  double now = now_unix();
  pthread_mutex_lock(&w->lock);
  for (int i = 0; i < w->lanes; i++) {
    cb_work *work = w->current[i];
    if (work && !work->stuck_reported && now - work->started_at > w->o.visibility_timeout + 5) {
      work->stuck_reported = 1;
      w->health.stuck++;
      cb_log(CB_LOG_WARN,
             "worker %s: handler for %s (command %s) on lane %d has run %.0f s, past the visibility timeout "
             "(%g s): stuck; its message may be redelivered to another worker",
             w->domain, work->command_type, work->command_id, i, now - work->started_at, w->o.visibility_timeout);
    }
  }
  pthread_mutex_unlock(&w->lock);
}

static void on_drain_deadline(uv_timer_t *t) {
  cb_worker *w = t->data;
  cb_log(CB_LOG_WARN, "worker %s: drain timeout (%g s) passed with %d command(s) in flight; leaving them for "
         "redelivery", w->domain, w->o.drain_timeout, w->in_flight);
  pthread_mutex_lock(&w->lock);
  w->abandon = 1;
  pthread_mutex_unlock(&w->lock);
  w->abandon_acks = 1;
  if (w->ack_head && w->rounds_in_flight == 0) { /* the database is still away */
    cb_log(CB_LOG_WARN, "worker %s: giving up outcomes that could not be recorded; they will be redelivered",
           w->domain);
    cb_work *works = w->ack_head;
    w->ack_head = w->ack_tail = NULL;
    while (works) {
      cb_work *next = works->next;
      work_free(works);
      works = next;
    }
  }
  cb_message_router_stop(w->router); /* lanes drop what they have not started */
  maybe_finalize(w);
}

/* The worker's handles live inside it: it may be freed only once libuv has
 * finished closing them, so STOPPED is announced by the last close callback. */
static void closed_one(cb_worker *w) {
  if (--w->handles_closing == 0) {
    cb_log(CB_LOG_INFO, "worker %s: stopped", w->domain);
    cb_runner_stopped(&w->runner); /* before a waiter may see STOPPED and free the worker */
    set_state(w, STATE_STOPPED);
  }
}

static void on_handle_closed(uv_handle_t *h) { closed_one(h->data); }

static void close_handle(cb_worker *w, uv_handle_t *h) {
  w->handles_closing++;
  uv_close(h, on_handle_closed);
}

static void maybe_finalize(cb_worker *w) {
  if (!w->stop_seen || w->finalized || w->fetching || w->in_flight > 0 || w->acks_pending > 0 || w->ack_head ||
      w->upkeep_running)
    return;
  w->finalized = 1;
  if (w->watch_id >= 0) cb_runtime_unwatch(w->rt, w->watch_id);
  w->watch_id = -1;
  cb_message_router_stop(w->router); /* lanes are empty: they end at once */
  w->handles_closing = 1; /* held until every close below is issued */
  if (w->timers_open) {
    close_handle(w, (uv_handle_t *)&w->poll_timer);
    close_handle(w, (uv_handle_t *)&w->stuck_timer);
    close_handle(w, (uv_handle_t *)&w->drain_timer);
    w->timers_open = 0;
  }
  closed_one(w); /* drops the hold */
}

static void on_upkeep_stopped(void *arg) {
  cb_worker *w = arg;
  w->upkeep_running = 0;
  maybe_finalize(w);
}

static void stop_on_loop(cb_runtime *rt, void *arg) {
  (void)rt;
  cb_worker *w = arg;
  if (w->stop_seen) return;
  w->stop_seen = 1;
  if (w->upkeep_running) cb_upkeep_stop(w->upkeep, on_upkeep_stopped, w);
  if (w->timers_open) {
    uv_timer_stop(&w->poll_timer);
    uv_timer_start(&w->drain_timer, on_drain_deadline, (uint64_t)(w->o.drain_timeout * 1000), 0);
  }
  if (w->in_flight || w->acks_pending)
    cb_log(CB_LOG_INFO, "worker %s: stopping; waiting for %d command(s) in flight", w->domain, w->in_flight);
  maybe_finalize(w);
}

void cb_worker_watch_signals(cb_worker *w) { w->runner.stop_on_signals = 1; }

static void start_on_loop(cb_runtime *rt, void *arg) {
  cb_worker *w = arg;
  uv_loop_t *loop = cb_runtime_loop(rt);
  uv_timer_init(loop, &w->poll_timer);
  uv_timer_init(loop, &w->stuck_timer);
  uv_timer_init(loop, &w->drain_timer);
  w->poll_timer.data = w->stuck_timer.data = w->drain_timer.data = w;
  w->timers_open = 1;
  uint64_t poll_ms = (uint64_t)(w->o.poll_interval * 1000);
  uv_timer_start(&w->poll_timer, on_poll, poll_ms ? poll_ms : 1, poll_ms ? poll_ms : 1);
  uv_timer_start(&w->stuck_timer, on_stuck_check, 1000, 1000);
  w->watch_id = cb_runtime_watch(rt, w->channel, on_notified, w);
  w->upkeep_running = 1;
  cb_upkeep_start(w->upkeep);
  set_state(w, STATE_RUNNING);
  cb_err err;
  if (cb_runner_start(rt, &w->runner, &err) != CB_OK) /* only signals can fail, and only when closing */
    cb_log(CB_LOG_WARN, "worker %s: %s", w->domain, err.message);
  cb_log(CB_LOG_INFO, "worker %s: running with %d lane(s), visibility timeout %g s", w->domain, w->lanes,
         w->o.visibility_timeout);
  maybe_fetch(w);
  /* A stop requested before this ran is honoured now. */
  pthread_mutex_lock(&w->lock);
  int stop = w->stop_requested;
  pthread_mutex_unlock(&w->lock);
  if (stop) stop_on_loop(rt, w);
}

int cb_worker_start(cb_worker *w, cb_err *err) {
  if (cb_message_router_start(w->router) != 0) return cb_err_set(err, CB_ESTATE, "the worker was already started");
  int rc = cb_runtime_call(w->rt, start_on_loop, w);
  if (rc != CB_OK) {
    cb_message_router_stop(w->router);
    set_state(w, STATE_STOPPED);
    return cb_err_set(err, rc, "the bus is closed");
  }
  return CB_OK;
}

void cb_worker_stop(cb_worker *w) {
  pthread_mutex_lock(&w->lock);
  int first = !w->stop_requested;
  w->stop_requested = 1;
  if (w->state == STATE_RUNNING) w->state = STATE_STOPPING, w->health.state = state_names[STATE_STOPPING];
  pthread_mutex_unlock(&w->lock);
  /* With the runtime closed there is no loop to drain through: end the
   * lanes now (their leftover work is freed with the worker). */
  if (cb_runtime_is_closed(w->rt) || (first && cb_runtime_call(w->rt, stop_on_loop, w) != CB_OK)) {
    cb_message_router_stop(w->router);
    set_state(w, STATE_STOPPED);
  }
}

int cb_worker_wait(cb_worker *w, int timeout_ms) {
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  pthread_mutex_lock(&w->lock);
  while (w->state != STATE_STOPPED) {
    /* Short waits (a runtime closed under the worker is noticed), never past
     * the caller's timeout: run()'s tick comes every tick_interval. */
    long slice_ms = 100;
    if (timeout_ms >= 0) {
      struct timespec now;
      clock_gettime(CLOCK_MONOTONIC, &now);
      long left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
      if (left <= 0) break;
      if (left < slice_ms) slice_ms = left;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += slice_ms * 1000000L;
    if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
    pthread_cond_timedwait(&w->changed, &w->lock, &ts);
    if (w->state == STATE_STOPPED) break;
    if (cb_runtime_is_closed(w->rt)) {
      pthread_mutex_unlock(&w->lock);
      cb_message_router_stop(w->router);
      set_state(w, STATE_STOPPED);
      return 1;
    }
  }
  int stopped = w->state == STATE_STOPPED;
  pthread_mutex_unlock(&w->lock);
  return stopped;
}

void cb_worker_free(cb_worker *w) {
  if (w == NULL) return;
  if (w->router) {
    pthread_mutex_lock(&w->lock);
    int state = w->state;
    pthread_mutex_unlock(&w->lock);
    if (state != STATE_STOPPED && state != STATE_STARTING) {
      cb_worker_stop(w);
      cb_worker_wait(w, -1);
    }
    cb_runner_remove(&w->runner); /* its last row says how it ended */
    cb_message_router_stop(w->router);
    /* Works still queued in lanes (never taken) are ours to free. */
    for (int lane = 0; lane < w->lanes; lane++) {
      void *items[64];
      int n;
      while ((n = cb_message_router_take(w->router, lane, items, 64, 0)) > 0)
        for (int i = 0; i < n; i++) work_free(items[i]);
      lane_buffer *b = &w->buffers[lane];
      for (int i = b->next; i < b->count; i++) work_free(b->items[i]);
    }
    cb_message_router_free(w->router);
  }
  cb_work *lists[] = {w->done_head, w->ack_head};
  for (int i = 0; i < 2; i++) {
    cb_work *works = lists[i];
    while (works) {
      cb_work *next = works->next;
      work_free(works);
      works = next;
    }
  }
  free(w->current);
  free(w->buffers);
  cb_upkeep_free(w->upkeep);
  pthread_cond_destroy(&w->changed);
  pthread_mutex_destroy(&w->lock);
  free(w);
}

/* ---- lanes -------------------------------------------------------------------------- */

int cb_worker_take(cb_worker *w, int lane, cb_work **works, int max, int timeout_ms) {
  if (lane < 0 || lane >= w->lanes || max < 1) return -1;
  lane_buffer *b = &w->buffers[lane];
  if (b->next >= b->count) {
    b->next = b->count = 0;
    int n = cb_message_router_take(w->router, lane, b->items, 64, timeout_ms);
    if (n == CB_MESSAGE_ROUTER_END) return -1;
    if (n <= 0) {
      if (cb_runtime_is_closed(w->rt)) cb_worker_stop(w); /* the bus was closed under the worker */
      return 0;
    }
    b->count = n;
  }
  /* One at a time, so that `current` tells exactly which handler runs. */
  cb_work *work = b->items[b->next++];
  double now = now_unix();
  pthread_mutex_lock(&w->lock);
  /* Waited in the lane for most of its visibility timeout: another worker
   * may get it any moment, so running it here could run it twice. */
  int expired = now - work->started_at > 0.9 * w->o.visibility_timeout;
  int abandon = w->abandon || expired;
  if (expired)
    cb_log(CB_LOG_WARN, "worker %s: command %s waited %.0f s for a lane; leaving it for redelivery", w->domain,
           work->command_id, now - work->started_at);
  if (!abandon) {
    work->lane = lane;
    work->started_at = now;
    w->current[lane] = work;
  }
  pthread_mutex_unlock(&w->lock);
  if (abandon) { /* past the drain deadline: leave it for redelivery */
    work->outcome = CB_OUTCOME_NONE;
    cb_worker_done(w, work);
    return cb_worker_take(w, lane, works, max, 0);
  }
  works[0] = work;
  return 1;
}

void cb_worker_done(cb_worker *w, cb_work *work) {
  work->next = NULL;
  pthread_mutex_lock(&w->lock);
  if (work->outcome != CB_OUTCOME_NONE && w->current[work->lane] == work) w->current[work->lane] = NULL;
  if (work->outcome != CB_OUTCOME_NONE) {
    double took = now_unix() - work->started_at;
    w->avg_handler_s = w->avg_handler_s == 0 ? took : 0.9 * w->avg_handler_s + 0.1 * took;
    if (w->avg_handler_s < 1e-6) w->avg_handler_s = 1e-6;
  }
  if (work->outcome == CB_OUTCOME_SUCCESS) {
    w->health.successes++;
    w->health.consecutive_failures = 0;
    w->health.last_success_at = now_unix();
  } else if (work->outcome != CB_OUTCOME_NONE) {
    w->health.failures++;
    w->health.consecutive_failures++;
    if (work->outcome == CB_OUTCOME_TRANSIENT && work->attempt < work->max_attempts) w->health.retries++;
  }
  if (w->done_tail) w->done_tail->next = work;
  else w->done_head = work;
  w->done_tail = work;
  int schedule = !w->done_scheduled;
  w->done_scheduled = 1;
  pthread_mutex_unlock(&w->lock);
  /* One wake-up per batch of outcomes: later ones join the list until the
   * loop takes it. */
  if (schedule && cb_runtime_call(w->rt, on_outcomes, w) != CB_OK) {
    pthread_mutex_lock(&w->lock);
    w->done_scheduled = 0;
    pthread_mutex_unlock(&w->lock);
  }
}

int cb_worker_extend_visibility(cb_worker *w, cb_work *work, double seconds, cb_err *err) {
  if (seconds <= 0) return cb_err_set(err, CB_EINVAL, "seconds must be positive");
  cb_messages m;
  int rc = cb_queue_set_vt(w->rt, w->queue, work->msg_id, seconds, &m, err);
  if (rc == CB_OK && m.count == 0) rc = cb_err_set(err, CB_ENOTFOUND, "message %lld is gone", (long long)work->msg_id);
  if (rc == CB_OK) {
    pthread_mutex_lock(&w->lock);
    work->started_at = now_unix() - w->o.visibility_timeout + seconds; /* stuck clock restarts */
    pthread_mutex_unlock(&w->lock);
  }
  cb_messages_free(&m);
  return rc;
}

void cb_worker_health_get(cb_worker *w, cb_worker_health *h) {
  pthread_mutex_lock(&w->lock);
  *h = w->health;
  h->state = state_names[w->state];
  pthread_mutex_unlock(&w->lock);
  h->in_flight = cb_worker_in_flight(w);
  cb_upkeep_stats_get(w->upkeep, &h->upkeep);
}

int cb_worker_in_flight(cb_worker *w) {
  /* Read without the loop: an estimate for monitoring (lanes' current + done). */
  pthread_mutex_lock(&w->lock);
  int n = 0;
  for (int i = 0; i < w->lanes; i++) n += w->current[i] != NULL;
  pthread_mutex_unlock(&w->lock);
  return n;
}
