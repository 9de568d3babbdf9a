/* commandbus core (internal): the engine of a runner (commandbus/engine.h
 * drives it), what a worker and a reply router share.
 *
 * A runner reads its queue, routes what it read to lanes through a message
 * router (keyed, so that related items keep their order on one lane), and
 * its lanes hand the work back. The engine is that cycle, written once:
 *
 * - on the runtime's loop thread, it fetches whenever the owner says there
 *   is room (woken by the queue's notifications after a send, and by a poll
 *   timer that finds redeliveries and messages whose delay ran out), routes
 *   the rows, and collects what lanes handed back; once asked to stop, it
 *   fetches no more and finishes when nothing is in flight;
 * - lanes take work with cb_engine_take and hand it back through the owner,
 *   which tells the engine (cb_engine_hand_back);
 * - callers start it, stop it (any thread; SIGINT/SIGTERM too when asked),
 *   wait until it has stopped, and free it.
 *
 * While it runs it is registered as a runner (runner.h): metrics see its
 * health and its heartbeats tell other processes.
 *
 * The owner (worker.c, reply_router.c) says, through cb_engine_ops, how
 * much to fetch, with which statements, what the rows become, and what was
 * handed back; and it may add its own timers and jobs on the loop thread.
 *
 * Threads: fields marked [loop] are the loop thread's; [lock] are guarded by
 * `lock`, which the owner uses for its own shared fields too. */
#ifndef COMMANDBUS_ENGINE_INTERNAL_H
#define COMMANDBUS_ENGINE_INTERNAL_H

#include <pthread.h>
#include <uv.h>

#include "commandbus/engine.h"
#include "commandbus/message_router.h"
#include "commandbus/runner.h"
#include "commandbus/runtime.h"
#include "queue_layout.h"

enum { CB_ENGINE_STARTING, CB_ENGINE_RUNNING, CB_ENGINE_STOPPING, CB_ENGINE_STOPPED };

#define CB_ENGINE_MAX_FETCHES 2

struct engine_fetch; /* engine.c: a fetch of its own on its way */

/* The owner's part. Every hook runs on the loop thread except report and
 * free_item; those marked optional may be NULL. */
typedef struct cb_engine_ops {
  /* How many items a fetch may take now; 0 or less: none. */
  int (*room)(void *owner);
  /* Appends to u (whose first statement is the keyed begin, keyed.h) the
   * statements of a fetch of up to `room` items; returns the index of the
   * statement whose rows are the items, or a negative cb_code. */
  int (*add_fetch)(void *owner, cb_unit *u, int room);
  /* The rows of a fetch (statement `index` of the completed unit u): the
   * owner makes its items and routes them (cb_engine_route). */
  void (*fetched)(void *owner, cb_unit *u, int index);
  /* Optional: takes what lanes handed back since the last call (after
   * cb_engine_hand_back). */
  void (*collect)(void *owner);
  /* Optional: nonzero while work of the owner's own is on its way (writes,
   * background jobs): the engine finishes only once it is done. */
  int (*busy)(void *owner);
  /* Optional: the engine started on the loop thread (after its own poll
   * timer and watch): the owner starts its timers and jobs. */
  void (*started)(void *owner, uv_loop_t *loop);
  /* Optional: the stop reached the loop thread; no fetch follows. */
  void (*stopping)(void *owner);
  /* Optional: nothing is in flight any more: the owner closes its handles
   * (cb_engine_close_handle) and the engine stops once they are closed. */
  void (*finishing)(void *owner);
  /* Optional: the poll timer fired; a fetch follows. */
  void (*polled)(void *owner);
  /* What metrics and heartbeats see besides the state (which the engine
   * fills): the in-flight count and counters (any thread; see
   * cb_runner.report). */
  void (*report)(void *owner, cb_runner_stat *stat);
  /* Optional: frees an item never taken by a lane; NULL: free(). */
  void (*free_item)(void *item);
} cb_engine_ops;

typedef struct cb_engine_config {
  const char *kind;   /* runner kind: "worker", "reply_router" */
  const char *name;   /* in log lines and errors: "worker", "reply router" */
  const char *domain; /* these strings live as long as the engine */
  const char *queue;
  int lanes;
  int capacity; /* items routed and not yet handed back, at most */
  /* Fetches on their way at once, at most (0: 1; CB_ENGINE_MAX_FETCHES at
   * most). More than one only while the last fetch came back full (a
   * burn-down): each is a transaction of its own, so that the pool's
   * connections read the queue side by side. */
  int max_fetches;
  double visibility_timeout, statement_timeout, poll_interval;
  const cb_engine_ops *ops;
  void *owner;
} cb_engine_config;

struct cb_engine {
  cb_runtime *rt;
  cb_engine_config c;
  char channel[CB_QUEUE_CHANNEL_MAX];
  cb_message_router *router;
  cb_runner runner;
  int ready; /* initialised: destroy has something to undo */

  /* [loop] */
  int fetching;       /* fetches on their way (their own, or riding in an owner's unit) */
  int fetch_asked;    /* how many rows the fetches on their way asked for, in all */
  int riding;         /* the fetch on its way rides in an owner's unit: no other goes */
  int riding_room;    /* how many rows that one asked for */
  int last_full;      /* the last fetch that came back read as many rows as it asked for */
  unsigned fetch_seq; /* fetches built so far: the newest one's number */
  /* Fetches of their own on their way, oldest first: their rows are handed
   * to the owner in this order, whichever comes back first, so that
   * commands keep the queue's order on their lanes. */
  struct engine_fetch *own[CB_ENGINE_MAX_FETCHES];
  int nown;
  /* Notified since the last fetch was built: a fetch on its way may have
   * read the queue before the send committed, so another one follows it. */
  int wake_pending;
  /* The last fetch read fewer rows than it asked for (and no notification
   * came while it was on its way): it took all the queue held. No fetch is
   * made until a notification or the poll clears it, not after outcomes
   * free room nor in an acknowledgement's transaction: with one request in
   * flight those fetches only found the queue empty, and a send's
   * notification that came while one was on its way waited for it. */
  int drained;
  int fetch_room; /* how many rows the fetch whose rows the owner is handed asked for */
  int in_flight;  /* routed, not yet handed back */
  int stop_seen;
  int finished;
  int fetch_failing; /* logged once per outage */
  int watch_id;
  uv_timer_t poll_timer;
  int timer_open;
  int handles_closing; /* uv_close calls whose callbacks have not run yet */
  int writes;          /* the owner's writes on their way (cb_engine_write) */

  pthread_mutex_t lock;
  pthread_cond_t changed;
  int state;          /* [lock] CB_ENGINE_* */
  int started;        /* [lock] cb_engine_start handed the start to the loop thread */
  int stop_requested; /* [lock] */
  int wake_scheduled; /* [lock] a collect is due on the loop thread */
  int handed_back;    /* [lock] items handed back since the last collect */
};

/* Creates the lanes' message router and LISTENs on the queue's channel
 * (the queue must exist). On failure the owner still calls
 * cb_engine_destroy. */
int cb_engine_init(cb_engine *e, cb_runtime *rt, const cb_engine_config *c, cb_err *err);
/* Stops and drains a running engine (waiting for it), unregisters it,
 * frees what lanes never took. The owner frees its own afterwards. */
void cb_engine_destroy(cb_engine *e);

/* "starting", "running", "stopping" or "stopped"; with the lock held. */
const char *cb_engine_state_name(const cb_engine *e);

/* Lanes: up to max items of the lane, waiting up to timeout_ms. The count,
 * 0 on timeout, -1 once the lane has ended. */
int cb_engine_take(cb_engine *e, int lane, void **items, int max, int timeout_ms);
/* Any thread, with the lock held: n items left the lanes' hands; the loop
 * thread counts them soon (and runs the owner's collect), once for many
 * calls. When it returns 1, call cb_engine_wake_now after unlocking. */
int cb_engine_hand_back(cb_engine *e, int n);
void cb_engine_wake_now(cb_engine *e);

/* ---- the loop thread ------------------------------------------------------------ */

/* How many a fetch may take now: 0 when the last one drained the queue (see
 * drained), once stopping, when the owner has no room, or while fetches are
 * on their way: one at all, unless the last one came back full (then up to
 * max_fetches, none riding in an owner's unit). The owner counts
 * fetch_asked as taken. */
int cb_engine_room(cb_engine *e);
/* Fetches in transactions of their own while there is room (see
 * cb_engine_room). */
void cb_engine_fetch(cb_engine *e);
/* Appends a fetch to the owner's unit u (it already holds the keyed
 * begin), when there is room and no fetch is on its way: *index is its
 * statement, or -1 for none.
 * CB_OK, or a negative cb_code (nothing is on its way then). Once u
 * completed, the owner calls cb_engine_fetched. */
int cb_engine_fetch_into(cb_engine *e, cb_unit *u, int *index);
/* The owner's unit holding a fetch was never sent. */
void cb_engine_fetch_cancel(cb_engine *e);
/* The fetch riding in the owner's unit came back (statement `index` of
 * u): hands the rows to the owner,
 * or logs the failure (once per outage). 1 when it read as many rows as it
 * asked for (there may be more) or when a notification came while it was on
 * its way (a send it may not have seen): fetch again. */
int cb_engine_fetched(cb_engine *e, cb_unit *u, int index);
/* Routes n items to lanes; those that cannot be routed (only when
 * stopping) are freed, to be redelivered later. */
void cb_engine_route(cb_engine *e, cb_message_router_entry *entries, int n);
/* Sends a write of the owner's own (u: a transaction that begins with the
 * keyed begin); the engine finishes only once it came back. A failure is
 * logged as "<what> failed (<error>); <then>" (what and then: literals). */
void cb_engine_write(cb_engine *e, cb_unit *u, const char *what, const char *then);
/* Finishes once stopping and nothing is in flight (call after the owner's
 * own work completed). */
void cb_engine_check(cb_engine *e);
/* Brings the next poll forward to ms from now, when it is due later. */
void cb_engine_poll_in(cb_engine *e, uint64_t ms);
/* Closes an owner's handle; the engine stops once every close completed. */
void cb_engine_close_handle(cb_engine *e, uv_handle_t *h);

#endif
