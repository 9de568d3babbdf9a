/* commandbus: the sync runtime.
 *
 * A runtime owns one libuv loop thread, and that thread owns every PostgreSQL
 * connection: a pool of nonblocking libpq connections in pipeline mode, plus
 * one listener connection for LISTEN/NOTIFY. Other threads never touch a
 * connection; they hand the loop *units of work* and either block until the
 * units complete (cb_runtime_exec) or get a callback on the loop thread
 * (cb_runtime_submit).
 *
 * A unit is a list of statements executed as one transaction: they go out in
 * one pipeline segment closed by a Sync, so PostgreSQL runs them in one
 * implicit transaction and an error in any rolls back all. Several units
 * submitted together go out in one write and come back in one round trip,
 * each still atomic on its own. Units themselves (filling them, reading
 * their results) are unit.h's.
 *
 * Lifecycle: cb_runtime_close stops the loop, fails whatever is queued or in
 * flight with CB_ECLOSED, and joins the thread; later calls fail with
 * CB_ECLOSED. cb_runtime_free closes and frees; no other thread may be using
 * the runtime then. Runtimes still open at process exit are closed by an
 * atexit hook, so no thread outlives main().
 *
 * A runtime belongs to the process that created it. In a child forked from
 * that process (nginx's workers, when a bus was connected in init_by_lua)
 * every call fails at once with CB_ESTATE, saying so, instead of waiting
 * for a loop thread the child does not have; closing or freeing it there
 * only forgets it. */
#ifndef COMMANDBUS_RUNTIME_H
#define COMMANDBUS_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/event_feed.h"
#include "commandbus/hub.h"
#include "commandbus/unit.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cb_runtime cb_runtime;

typedef struct cb_runtime_options {
  const char *conninfo;         /* libpq conninfo or URI; NULL or "" uses PG* variables */
  int pool_size;                /* connections for queries; <= 0 means 2 */
  int connect_timeout_ms;       /* per connection attempt; <= 0 means 5000 */
  const char *application_name; /* NULL means "commandbus" */
  /* Nonzero: cb_bus_send's wake-up (its queue's NOTIFY) goes in a
   * transaction of its own right after the rows' commit, in the same round
   * trip, rather than inside it. PostgreSQL makes transactions that notify
   * commit one at a time, each with a WAL flush of its own, across the whole
   * cluster; without the NOTIFY the rows' commits of several processes that
   * send at once share flushes. Costs one more (unflushed) commit per send
   * transaction and brings a lone send's wake-up a little later
   * (docs/architecture.md). For many processes that each send alone
   * (nginx workers, say); 0 (the default) keeps the NOTIFY inside. */
  int notify_after_commit;
} cb_runtime_options;

/* Starts the loop thread and connects the pool. Returns CB_ECONNECTION (and no
 * runtime) when no connection of the pool could be made within the timeout. */
int cb_runtime_new(const cb_runtime_options *options, cb_runtime **out, cb_err *err);
void cb_runtime_close(cb_runtime *rt);
void cb_runtime_free(cb_runtime *rt);
int cb_runtime_is_closed(cb_runtime *rt);
/* CB_OK when rt may be used from the calling process; else CB_ESTATE (it was
 * created before a fork) or CB_ECLOSED, with a message in err. */
int cb_runtime_check(cb_runtime *rt, cb_err *err);

/* The hub fed by this runtime's listener (keys are channel names) and by the
 * components above it. Lives as long as the runtime. */
cb_hub *cb_runtime_hub(cb_runtime *rt);

/* The queue of process events waiting for the host (events.h fills it and
 * hands it out). Lives as long as the runtime. */
cb_event_feed *cb_runtime_event_feed(cb_runtime *rt);

/* State that a component above the runtime keeps per runtime (the registry
 * of runners): made by make(rt) on first use, freed by drop(state) when the
 * runtime is freed, after its loop thread was joined. So the runtime owns
 * the state without knowing its component, and never calls up by name.
 * `part` names the component (the address of a static object). make runs
 * under the runtime's lock: it must not call the runtime. Any thread;
 * returns the state, or NULL when make failed (it is asked again next time)
 * or the runtime was created before a fork. */
typedef struct cb_runtime_part {
  void *(*make)(cb_runtime *rt);
  void (*drop)(void *state);
} cb_runtime_part;
void *cb_runtime_part_of(cb_runtime *rt, const cb_runtime_part *part);

/* Units (each one transaction, one round trip or part of one) sent to
 * PostgreSQL since the runtime started: what the runtime costs the server. */
uint64_t cb_runtime_units_sent(cb_runtime *rt);

/* True on the runtime's loop thread. */
int cb_runtime_on_loop(cb_runtime *rt);

/* The connections of the pool (pool_size as it was resolved). */
int cb_runtime_pool_size(const cb_runtime *rt);

/* The runtime's notify_after_commit option (0 or 1). */
int cb_runtime_notify_after_commit(const cb_runtime *rt);

/* --- running units (unit.h) ------------------------------------------------ */

/* A unit that failed while it was filled (unit.h) runs none of its
 * statements: cb_runtime_exec returns its failure at once, without a round
 * trip; among several units (exec_many, submit) it completes in its turn
 * with that failure, and the others run. */

/* Runs n units in one round trip and blocks until all complete. Returns CB_OK
 * when they ran (each unit has its own status), CB_EDEADLOCK from the loop
 * thread, CB_ECLOSED on a closed runtime. */
int cb_runtime_exec_many(cb_runtime *rt, cb_unit *const *units, size_t n, cb_err *err);
/* One unit; returns the unit's own status (and copies its error to err). */
int cb_runtime_exec(cb_runtime *rt, cb_unit *u, cb_err *err);

/* Hands n units to the loop; each unit's on_done callback runs on the loop
 * thread when it completes (also when it fails or the runtime closes). The
 * units must stay alive until then. From the loop thread itself this sends
 * them directly. Returns CB_ECLOSED (callbacks not called) on a closed
 * runtime. */
int cb_runtime_submit(cb_runtime *rt, cb_unit *const *units, size_t n);

/* Runs fn(arg) on the loop thread (asynchronously). */
int cb_runtime_call(cb_runtime *rt, void (*fn)(cb_runtime *rt, void *arg), void *arg);

/* --- notifications ------------------------------------------------------ */

/* Makes sure the listener connection LISTENs on channel (a valid identifier,
 * at most 63 bytes). From then on, each notification on it bumps the hub key
 * of the same name; after a reconnection every listened key is bumped, since
 * notifications may have been missed. Blocking; idempotent. */
int cb_runtime_listen(cb_runtime *rt, const char *channel, cb_err *err);

/* Loop thread only: runs fn(arg) on the loop thread for every notification on
 * channel (once cb_runtime_listen made it listened), and after the listener
 * reconnects (notifications may have been missed). Returns a watch id. */
typedef void (*cb_notify_fn)(void *arg);
int cb_runtime_watch(cb_runtime *rt, const char *channel, cb_notify_fn fn, void *arg);
void cb_runtime_unwatch(cb_runtime *rt, int id);

/* --- signals ------------------------------------------------------------ */

/* Makes SIGINT and SIGTERM call fn(signum, arg) on the loop thread until
 * cb_runtime_unwatch_signals(id): how a worker run from a shell, a systemd
 * unit or a container drains on Ctrl-C or a stop. While any watch exists the
 * runtime handles both signals (they no longer end the process); after the
 * last watch goes they get their default action back. fn must not call
 * cb_runtime_unwatch_signals. Any thread; returns a watch id > 0, or
 * CB_ECLOSED or CB_ENOMEM. */
typedef void (*cb_signal_fn)(int signum, void *arg);
int cb_runtime_watch_signals(cb_runtime *rt, cb_signal_fn fn, void *arg);
/* Any thread. Once it returns, fn is not running for this watch and will not
 * run again. */
void cb_runtime_unwatch_signals(cb_runtime *rt, int id);

/* The runtime's libuv loop, for components that put their own handles on it
 * (from the loop thread only). */
struct uv_loop_s *cb_runtime_loop(cb_runtime *rt);

/* --- memory of facts (queues known to exist, ...) ------------------------- */

/* A set of strings the runtime keeps for its lifetime; thread-safe. */
int cb_runtime_remembers(cb_runtime *rt, const char *key);
void cb_runtime_remember(cb_runtime *rt, const char *key);

/* --- configuration ------------------------------------------------------ */

/* The default number of handler lanes for workers and routers: the value set
 * here (n > 0), else COMMANDBUS_SYNC_THREADS, else min(32, cores). */
void cb_set_default_threads(int n);
int cb_default_threads(void);

#ifdef __cplusplus
}
#endif
#endif
