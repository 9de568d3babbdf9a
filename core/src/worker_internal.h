/* commandbus core (internal): the worker's parts and what they share.
 *
 * The worker is an engine (engine.h: fetch, route to lanes, stop, drain)
 * with three jobs of its own, one file each:
 *   worker.c        lifecycle and lanes: options, start, stop, free, what
 *                   lanes take and hand back, stuck handlers, the drain
 *                   deadline, health;
 *   worker_fetch.c  receiving commands: how many, the receive statement's
 *                   rows made into works, poison messages set aside;
 *   worker_acks.c   acknowledgement rounds: outcomes recorded in groups,
 *                   one transaction a round, one by one when a round fails;
 *   worker_sql.c    the SQL of all three, in one place;
 *   worker_work.c   works, what all of them hand around.
 * Calls go one way: worker.c uses the others, worker_fetch.c uses
 * worker_acks.c, and worker_sql.c and worker_work.c use none of them.
 *
 * Threads: fields marked [loop] are the loop thread's; [lock] are guarded by
 * the engine's lock; lane_buffer belongs to its lane's thread. */
#ifndef COMMANDBUS_WORKER_INTERNAL_H
#define COMMANDBUS_WORKER_INTERNAL_H

#include <uv.h>

#include "commandbus/upkeep.h"
#include "commandbus/worker.h"
#include "engine_internal.h"
#include "strbuf.h"

/* Commands received at once, at most (and so, in a burn-down, about the size
 * of an acknowledgement round: outcomes gather while the rounds before run).
 * Each receive and acknowledgement pays a share that does not grow with its
 * rows (its transaction, commit and WAL flush, the executor set up for a
 * statement of many parts, the round trips), and the rows themselves leave
 * little to trim: most of the server's time goes to the rows rcmd's schema
 * asks for (four indexes on the command table, updated twice a command; two
 * audit rows). At 100 a burn-down at concurrency 4 or 8 committed some 2.1
 * times per 100 commands; at 400, 0.7 to 0.8 times, for some 10-27% less
 * server CPU a command (bench/defer_gate/burn.sh, base and this side by
 * side on the two-core box). The worker's capacity (4 x this, and a quarter
 * of the visibility timeout at the handlers' pace) still bounds what is
 * held; a worker of concurrency 1 holds at most 256, as before. */
#define FETCH_MAX 400
/* Receives on their way at once while the queue holds more (max_fetches,
 * engine_internal.h): a burn-down's fetch is its critical path, and two
 * keep both pooled connections (and their backends) reading side by side. */
#define FETCHES_IN_FLIGHT 2
#define MAX_REPLY_QUEUES 8 /* per acknowledgement statement; more go one by one */
/* Acknowledgement rounds on their way at once: two keep both pooled
 * connections (and their backends) busy while the rest gather. */
#define MAX_ROUNDS_IN_FLIGHT 2
#define STARTED_BATCHES 16 /* batches remembered as started */

/* What a work's outcome means for the command. */
enum { ACK_SUCCESS, ACK_RETRY, ACK_TSQ, ACK_FAILED, ACK_KINDS };

typedef struct lane_buffer { /* owned by its lane thread */
  void *items[64];
  int count, next;
} lane_buffer;

struct cb_worker {
  cb_runtime *rt;
  cb_worker_options o;
  char domain[CB_QUEUE_NAME_MAX + 1];
  char queue[CB_QUEUE_NAME_MAX + 1];
  cb_strbuf receive_sql, lean_receive_sql; /* with limits, without (worker_sql.c) */
  int lanes;
  cb_engine engine;
  lane_buffer *buffers; /* one per lane */

  /* [loop] */
  int capacity; /* works fetched and not yet done, at most */
  /* Where the read of priority-0 messages starts: the lowest msg_id the
   * last fetch received at that priority. A message below it that becomes
   * visible later (a retry, a redelivery, a send that committed late) is
   * found by the next full scan, which every poll asks for. */
  int64_t scan_from;
  int full_scan_due;
  /* The domain had limits at the last fetch (or none has come back yet):
   * the next fetch uses the receive statement that applies them. */
  int limited;
  cb_upkeep *upkeep; /* background jobs; [loop] once started */
  int upkeep_running;
  int rounds_in_flight;         /* acknowledgement rounds sent, not answered */
  int abandon_acks;             /* drain deadline passed: outcomes kept for retry are given up */
  int acks_held;                /* the last round failed for a lost connection: wait for the poll */
  int ack_failing;              /* acknowledgements fail: logged once */
  cb_work *ack_head, *ack_tail; /* outcomes waiting for the next round */
  /* Each kind's acknowledgement statement without reply queues, built on
   * first use: rounds of a few dozen commands rebuilt kilobytes of SQL. */
  cb_strbuf ack_sql[ACK_KINDS];
  char started_batches[STARTED_BATCHES][CB_UUID_LEN + 1]; /* recently seen as started */
  int started_next;
  uv_timer_t stuck_timer, drain_timer;
  int timers_open;
  /* [any thread, atomic] works received and not yet freed: the commands
   * the worker holds, from the receive until their acknowledgement has
   * answered (or they were let go, to be redelivered). */
  int held;

  /* [lock] */
  cb_work *done_head, *done_tail; /* handed back by lanes, not yet collected */
  int abandon;                    /* drain deadline passed: lanes drop what they have not started */
  cb_work **current;              /* per lane: the work whose handler runs, or NULL */
  cb_worker_health health;
  double avg_handler_s; /* moving average of handler time; 0 = unknown yet */
};

/* ---- worker_work.c ---------------------------------------------------------------- */

double cb__worker_now(void);
/* One allocation holds the work and its input strings (row of the receive). */
cb_work *cb__work_new(const cb_result *r, int row);
void cb__work_free(cb_work *w);
/* Frees a list of works linked through next. */
void cb__work_list_free(cb_work *list);
/* Appends the list (linked through next) to *head / *tail. */
void cb__work_list_append(cb_work **head, cb_work **tail, cb_work *list);

/* ---- worker_fetch.c (loop) -------------------------------------------------------- */

int cb__worker_room(void *w);
int cb__worker_add_fetch(void *w, cb_unit *u, int room);
void cb__worker_fetched(void *w, cb_unit *u, int index);

/* ---- worker_acks.c (loop) ---------------------------------------------------------- */

/* Takes what lanes handed back and acknowledges it (engine hook). */
void cb__worker_collect(void *w);
/* Sends the gathered outcomes, when a round may go. */
void cb__worker_flush_acks(cb_worker *w);
/* Marks the batches as changed (their counts are computed again). */
void cb__worker_refresh_batches(cb_worker *w, const char **ids, size_t n);

/* ---- worker_sql.c ---------------------------------------------------------------- */

/* The receive statement: $1 how many, $2 the visibility timeout, $3 the
 * domain, $4 where the priority-0 read starts. With `limits` 0, the lean
 * statement for a domain that has none: it receives nothing when the
 * domain has limits after all, and then returns one row of its own, whose
 * msg_id is null (see worker_sql.c). */
void cb__worker_sql_receive(cb_strbuf *sql, const char *queue, int limits);
/* Sets poison messages aside: $1 domain, $2 JSON [{msg, id, reason}], $3 queue. */
void cb__worker_sql_set_aside(cb_strbuf *sql, const char *queue);
/* The acknowledgement statement of one kind of outcome: $1 domain, $2 the
 * JSON input of its works; replies go to the nreply listed queues. */
void cb__worker_sql_ack(cb_strbuf *sql, const char *queue, int kind, char reply[][CB_QUEUE_NAME_MAX + 1], int nreply);

#endif
