/* commandbus: the worker's acknowledgement rounds (see worker_internal.h),
 * on the loop thread.
 *
 * Group commit: outcomes lanes hand back gather while a round is on its
 * way, then leave together in the next round, one transaction for all of
 * them with one statement per kind of outcome (and its reply queues), and
 * the next fetch riding along. Each command's effects are guarded by its
 * status (only an IN_PROGRESS command at the outcome's attempt moves), so a
 * late outcome never overwrites a terminal state or an operator's decision.
 * When a round's transaction fails, each command is acknowledged again on
 * its own, so that one bad command cannot hold the others back; when the
 * database is away, the outcomes are kept and tried again at each poll. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commandbus/bus.h"
#include "commandbus/events.h"
#include "commandbus/log.h"
#include "keyed.h"
#include "worker_internal.h"

/* One acknowledgement transaction: its works, so that a failure can retry
 * them one by one. */
typedef struct ack_round {
  cb_worker *w;
  cb_work *works;   /* linked through next */
  int single;       /* already one work: no further split */
  int fetch_index;  /* the receive riding along in this transaction, or -1 */
  int events_index; /* the process events read back, or -1 */
} ack_round;

/* The works of a round sorted by kind of outcome: each kind's JSON input
 * and the reply queues its statement writes to. */
typedef struct round_input {
  cb_strbuf input[ACK_KINDS];
  char reply[ACK_KINDS][MAX_REPLY_QUEUES][CB_QUEUE_NAME_MAX + 1];
  int nreply[ACK_KINDS];
} round_input;

static void submit_round(cb_worker *w, cb_work *works, int single);

/* ---- batches ---------------------------------------------------------------------- */

void cb__worker_refresh_batches(cb_worker *w, const char **ids, size_t n) {
  cb_unit *u = cb_unit_new();
  if (u == NULL) return;
  cb_add_keyed_begin(u, w->o.statement_timeout);
  for (size_t i = 0; i < n; i++) {
    int seen = 0;
    for (size_t j = 0; j < i && !seen; j++) seen = strcmp(ids[i], ids[j]) == 0;
    if (!seen) cb_bus_add_batch_refresh(u, w->domain, ids[i]);
  }
  cb_engine_write(&w->engine, u, "refreshing batches", "they are refreshed again when read");
}

/* ---- the input of a round --------------------------------------------------------- */

static double backoff_for(const cb_worker *w, int attempt) {
  if (w->o.nbackoff == 0) return 0;
  int i = attempt - 1;
  if (i < 0) i = 0;
  if (i >= w->o.nbackoff) i = w->o.nbackoff - 1;
  return w->o.backoff[i];
}

static int ack_kind(const cb_work *work) {
  switch (work->outcome) {
    case CB_OUTCOME_SUCCESS: return ACK_SUCCESS;
    case CB_OUTCOME_BUSINESS_RULE: return ACK_FAILED;
    case CB_OUTCOME_PERMANENT: return ACK_TSQ;
    default: return work->attempt >= work->max_attempts ? ACK_TSQ : ACK_RETRY;
  }
}

static void json_or_null(cb_strbuf *b, const char *json) { cb_strbuf_puts(b, json ? json : "null"); }

/* Pieces put one by one rather than formatted: every outcome passes here. */
static void append_input(cb_strbuf *b, const cb_worker *w, const cb_work *work, int kind) {
  cb_strbuf_puts(b, b->len ? ",{\"id\":\"" : "[{\"id\":\"");
  cb_strbuf_puts(b, work->command_id);
  cb_strbuf_puts(b, "\",\"msg\":");
  cb_strbuf_put_int(b, work->msg_id);
  cb_strbuf_puts(b, ",\"attempt\":");
  cb_strbuf_put_int(b, work->attempt);
  if (kind == ACK_SUCCESS) {
    cb_strbuf_puts(b, ",\"result\":");
    json_or_null(b, work->result_json);
    cb_strbuf_puts(b, work->result_json && strcmp(work->result_json, "null") ? ",\"has\":true}" : ",\"has\":false}");
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

/* Finds or adds the reply queue in the statement of its kind; 0 when it
 * has no place there (MAX_REPLY_QUEUES others, or a bad name). */
static int reply_fits(round_input *in, int kind, const char *queue) {
  for (int i = 0; i < in->nreply[kind]; i++)
    if (strcmp(in->reply[kind][i], queue) == 0) return 1;
  if (in->nreply[kind] == MAX_REPLY_QUEUES || cb_queue_name_valid(queue, NULL) != CB_OK) return 0;
  snprintf(in->reply[kind][in->nreply[kind]++], CB_QUEUE_NAME_MAX + 1, "%s", queue);
  return 1;
}

/* Sorts the works into in and returns them, in order; those whose reply
 * queue has no place go to *alone instead. */
static cb_work *sort_works(const cb_worker *w, cb_work *works, round_input *in, cb_work **alone) {
  cb_work *kept = NULL, **tail = &kept;
  for (cb_work *work = works, *next; work; work = next) {
    next = work->next;
    work->next = NULL;
    int kind = ack_kind(work);
    if (work->reply_to && (kind == ACK_SUCCESS || kind == ACK_FAILED) && !reply_fits(in, kind, work->reply_to)) {
      work->next = *alone;
      *alone = work;
      continue;
    }
    append_input(&in->input[kind], w, work, kind);
    *tail = work;
    tail = &work->next;
  }
  return kept;
}

/* The round's transaction: each kind's statement and its reply queues'
 * notifications, the process events when a step went to the TSQ, and the
 * next fetch riding along. NULL when out of memory. */
static cb_unit *build_round(cb_worker *w, round_input *in, ack_round *round) {
  cb_unit *u = cb_unit_new();
  cb_strbuf sql = {0};
  /* Generic plans: the statements of cb__worker_sql_ack are key lookups
   * either way (and the riding fetch sets the same again). */
  int ok = u != NULL && cb_add_keyed_begin_generic(u, w->o.statement_timeout) >= 0;
  /* A step moved to the TSQ pauses its process: an event (rare, so only
   * then is the transaction asked to collect what it appends). */
  int collect = ok && in->input[ACK_TSQ].len > 0;
  if (collect) cb_events_add_begin(u);
  for (int kind = 0; ok && kind < ACK_KINDS; kind++) {
    if (in->input[kind].len == 0) continue;
    cb_strbuf_putc(&in->input[kind], ']');
    cb_strbuf *text = &sql;
    if (in->nreply[kind] == 0) {
      text = &w->ack_sql[kind];
      if (text->len == 0 || text->failed) cb__worker_sql_ack(text, w->queue, kind, NULL, 0);
    } else {
      cb__worker_sql_ack(text, w->queue, kind, in->reply[kind], in->nreply[kind]);
    }
    const char *params[] = {w->domain, in->input[kind].data};
    ok = !text->failed && !in->input[kind].failed && cb_unit_add(u, text->data, 2, params) >= 0;
    for (int i = 0; ok && i < in->nreply[kind]; i++) ok = cb_queue_add_notify(u, in->reply[kind][i]) >= 0;
  }
  cb_strbuf_free(&sql);
  if (ok && collect && (round->events_index = cb_events_add_read(u)) < 0) ok = 0;
  /* One commit and one round trip per cycle of acknowledge-and-receive. */
  if (ok && !round->single && cb_engine_fetch_into(&w->engine, u, &round->fetch_index) != CB_OK) ok = 0;
  if (ok) return u;
  cb_unit_free(u);
  return NULL;
}

/* Each work in a round of its own (a reply queue with a bad name loses
 * its reply). */
static void submit_alone(cb_worker *w, cb_work *works) {
  while (works) {
    cb_work *next = works->next;
    works->next = NULL;
    if (works->reply_to && cb_queue_name_valid(works->reply_to, NULL) != CB_OK) {
      cb_log(CB_LOG_ERROR, "worker %s: command %s has an invalid reply queue `%s`; no reply sent", w->domain,
             works->command_id, works->reply_to);
      works->reply_to = NULL;
    }
    submit_round(w, works, 1);
    works = next;
  }
}

/* ---- a round's end ------------------------------------------------------------------ */

/* After the commit: local waiters hear of each command, and batches whose
 * commands reached a terminal state are refreshed (after this commit, so
 * that the last one to finish sees every other). */
static void round_committed(cb_worker *w, ack_round *round, cb_unit *u) {
  if (w->ack_failing) cb_log(CB_LOG_INFO, "worker %s: acknowledging again", w->domain);
  w->ack_failing = 0;
  cb_events_published(w->rt, u, round->events_index);
  /* Awaiters in this process hear of each command, when there are any:
   * one subscribes before its first read of the command, so one that
   * subscribes after this look reads what this round committed. */
  cb_hub *hub = cb_runtime_hub(w->rt);
  int awaited = cb_hub_record_waiters(hub) > 0;
  const char *ids[64];
  size_t n = 0;
  for (int st = 0; st < cb_unit_count(u); st++) {
    const cb_result *r = cb_unit_result(u, st);
    if (cb_result_columns(r) != 2 || strcmp(cb_result_column_name(r, 1), "batch_id") != 0) continue;
    for (int row = 0; row < cb_result_rows(r); row++) {
      if (awaited) cb_hub_changed(hub, w->domain, cb_result_value(r, row, 0));
      if (cb_result_is_null(r, row, 1)) continue;
      const char *id = cb_result_value(r, row, 1);
      int seen = 0;
      for (size_t k = 0; k < n && !seen; k++) seen = strcmp(ids[k], id) == 0;
      if (seen) continue;
      if (n == 64) { /* many batches in one round: refresh these, go on */
        cb__worker_refresh_batches(w, ids, n);
        n = 0;
      }
      ids[n++] = id;
    }
  }
  if (n) cb__worker_refresh_batches(w, ids, n);
}

/* The database is away: the outcomes go back to the front of the queue, to
 * be tried again at the next poll (the statements are guarded, so a repeat
 * changes nothing). */
static void round_kept(cb_worker *w, ack_round *round, const cb_err *e) {
  if (!w->ack_failing) /* once per outage, not once per attempt */
    cb_log(CB_LOG_WARN, "worker %s: cannot acknowledge outcomes (%s); keeping them to try again at each poll",
           w->domain, e->message);
  w->ack_failing = 1;
  cb_work *rest = w->ack_head;
  w->ack_head = w->ack_tail = NULL;
  cb__work_list_append(&w->ack_head, &w->ack_tail, round->works);
  cb__work_list_append(&w->ack_head, &w->ack_tail, rest);
  round->works = NULL;
  w->acks_held = 1; /* not again before the next poll: no busy loop */
}

static void round_failed(cb_worker *w, ack_round *round, const cb_err *e) {
  cb_work *work = round->works;
  if (round->single && work && work->reply_to && !work->reply_dropped) {
    /* Most likely the reply queue is gone: record the outcome without the
     * reply rather than run the handler again forever. */
    cb_log(CB_LOG_ERROR,
           "worker %s: acknowledging command %s with a reply to %s failed (%s); recording its "
           "outcome without the reply",
           w->domain, work->command_id, work->reply_to, e->message);
    work->reply_to = NULL;
    work->reply_dropped = 1;
  } else if (!round->single) {
    cb_log(CB_LOG_WARN, "worker %s: acknowledging a round failed (%s: %s); acknowledging one by one", w->domain,
           cb_strerror(e->code), e->message);
  } else {
    cb_log(CB_LOG_ERROR,
           "worker %s: cannot record the outcome of command %s (%s: %s); its message reappears after the "
           "visibility timeout",
           w->domain, work->command_id, cb_strerror(e->code), e->message);
    return;
  }
  round->works = NULL;
  submit_alone(w, work);
}

static void on_round_done(cb_unit *u, void *arg) {
  ack_round *round = arg;
  cb_worker *w = round->w;
  w->rounds_in_flight--;
  int more = round->fetch_index >= 0 && cb_engine_fetched(&w->engine, u, round->fetch_index);
  int status = cb_unit_status(u);
  if (status == CB_OK) round_committed(w, round, u);
  else if (status == CB_ECONNECTION && !w->abandon_acks) round_kept(w, round, cb_unit_error(u));
  else round_failed(w, round, cb_unit_error(u));
  cb__work_list_free(round->works);
  free(round);
  cb_unit_free(u);
  cb__worker_flush_acks(w);
  if (more || w->rounds_in_flight == 0) cb_engine_fetch(&w->engine);
  cb_engine_check(&w->engine);
}

/* Builds one transaction for the works (any mix of outcomes) and submits it. */
static void submit_round(cb_worker *w, cb_work *works, int single) {
  round_input in = {0};
  cb_work *alone = NULL; /* works whose reply queue has no place in this round */
  ack_round *round = calloc(1, sizeof *round);
  cb_unit *u = NULL;
  works = sort_works(w, works, &in, &alone);
  if (round) {
    *round = (ack_round){.w = w, .works = works, .single = single, .fetch_index = -1, .events_index = -1};
    u = build_round(w, &in, round);
  }
  for (int kind = 0; kind < ACK_KINDS; kind++) cb_strbuf_free(&in.input[kind]);
  if (u) {
    cb_unit_on_done(u, on_round_done, round);
    w->rounds_in_flight++;
    if (cb_runtime_submit(w->rt, &u, 1) == CB_OK) works = NULL;
    else {
      w->rounds_in_flight--;
      if (round->fetch_index >= 0) cb_engine_fetch_cancel(&w->engine);
      cb_unit_free(u);
    }
  } else { /* the messages reappear after the visibility timeout */
    cb_log(CB_LOG_ERROR, "worker %s: out of memory acknowledging; messages will be redelivered", w->domain);
  }
  if (works) {
    cb__work_list_free(works);
    free(round);
  }
  submit_alone(w, alone); /* rare: many reply queues in one round, or a bad name */
}

void cb__worker_flush_acks(cb_worker *w) {
  if (w->rounds_in_flight >= MAX_ROUNDS_IN_FLIGHT || w->ack_head == NULL || w->acks_held) return;
  cb_work *works = w->ack_head;
  w->ack_head = w->ack_tail = NULL;
  submit_round(w, works, works->next == NULL);
}

/* Takes every outcome lanes handed back and acknowledges them. */
void cb__worker_collect(void *arg) {
  cb_worker *w = arg;
  pthread_mutex_lock(&w->engine.lock);
  cb_work *works = w->done_head;
  w->done_head = w->done_tail = NULL;
  pthread_mutex_unlock(&w->engine.lock);
  cb_work *to_ack = NULL, **tail = &to_ack;
  for (cb_work *next; works; works = next) {
    next = works->next;
    works->next = NULL;
    if (works->outcome == CB_OUTCOME_NONE) { /* abandoned at stop: redelivered later */
      cb__work_free(works);
    } else {
      *tail = works;
      tail = &works->next;
    }
  }
  cb__work_list_append(&w->ack_head, &w->ack_tail, to_ack);
  cb__worker_flush_acks(w);
}
