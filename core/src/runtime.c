/* commandbus: the sync runtime's loop thread, hand-over and lifecycle.
 * Connections themselves live in pg.c. */
#include "internal.h"

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "commandbus/error.h"
#include "commandbus/thread.h"
#include "strbuf.h"

typedef struct pending_call {
  struct pending_call *next;
  void (*fn)(cb_runtime *rt, void *arg);
  void *arg;
} pending_call;

/* ---- fork safety --------------------------------------------------------- */

/* A fork copies a runtime's memory but not its loop thread: in the child its
 * locks may be held for good and its wake-up descriptor still reaches the
 * parent's loop. So a child never touches it, not even a lock; every entry
 * point asks this first. (nginx forks its workers after init_by_lua.) */
static int forked(const cb_runtime *rt) { return rt->pid != cb_process_id(); }

static int fork_error(const cb_runtime *rt, cb_err *err) {
  return cb_err_set(err, CB_ESTATE,
                    "this bus was connected in process %d and cannot be used in process %d, a child forked from it "
                    "(nginx forks its workers after init_by_lua): connect in the process that uses the bus "
                    "(in nginx, in init_worker_by_lua or on first use)",
                    (int)rt->pid, (int)getpid());
}

int cb_runtime_check(cb_runtime *rt, cb_err *err) {
  if (forked(rt)) return fork_error(rt, err);
  if (cb_runtime_is_closed(rt)) return cb_err_set(err, CB_ECLOSED, "the bus is closed");
  return CB_OK;
}

/* ---- the loop thread --------------------------------------------------- */

static void fail_list(cb_unit *u, int code, const char *why) {
  cb_err err;
  cb_err_set(&err, code, "%s", why);
  while (u) {
    cb_unit *next = u->next;
    cb__unit_complete(u, code, &err);
    u = next;
  }
}

static void on_handle_closed(uv_handle_t *h) { (void)h; }

static void close_leftover(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

/* Wakes the loop thread, from any thread. An eventfd rather than a
 * uv_async_t: libuv's async handle makes the loop thread spin until the
 * sending thread has finished its uv_async_send, and a sender that the
 * wake-up itself pushed off the core (two cores, a loaded machine) keeps it
 * spinning for tens of microseconds on every hand-over. A write to an
 * eventfd is all there is to it. */
static void wake_loop(cb_runtime *rt) {
  uint64_t one = 1;
  ssize_t n;
  do n = write(rt->wake_fd, &one, sizeof one);
  while (n < 0 && errno == EINTR);
  /* EAGAIN: the counter is full, so the loop is due to wake anyway. */
}

/* Runs on the loop thread when woken: takes what other threads handed over,
 * or, once closing, tears everything down so that uv_run can return. */
static void on_wake(uv_poll_t *poll, int status, int events) {
  (void)status;
  (void)events;
  cb_runtime *rt = poll->data;
  uint64_t count;
  /* Reset before taking the lists: a hand-over after this wakes us again. */
  while (read(rt->wake_fd, &count, sizeof count) < 0 && errno == EINTR) continue;
  pthread_mutex_lock(&rt->lock);
  cb_unit *units = rt->submitted_head;
  rt->submitted_head = rt->submitted_tail = NULL;
  pending_call *calls = rt->calls_head;
  rt->calls_head = rt->calls_tail = NULL;
  int closing = rt->closing;
  pthread_mutex_unlock(&rt->lock);

  while (calls) {
    pending_call *next = calls->next;
    if (!closing) calls->fn(rt, calls->arg);
    free(calls);
    calls = next;
  }
  if (closing) {
    /* Callbacks below may submit again: they must find the loop closing
     * and the lists detached, never a list being failed. */
    rt->loop_closing = 1;
    cb_unit *pending = rt->pending_head;
    rt->pending_head = rt->pending_tail = NULL;
    fail_list(units, CB_ECLOSED, "the runtime was closed");
    fail_list(pending, CB_ECLOSED, "the runtime was closed");
    for (int i = 0; i < rt->nconns; i++) cb__conn_shutdown(&rt->conns[i]);
    cb__conn_shutdown(&rt->listener);
    uv_close((uv_handle_t *)&rt->wake, on_handle_closed);
    /* Components that put handles on the loop (a running worker's timers)
     * may not get to close them: close whatever is left, so that uv_run
     * returns and the thread can be joined. Their owners find the runtime
     * closed and stop. */
    uv_walk(&rt->loop, close_leftover, NULL);
    return;
  }
  if (units) {
    if (rt->pending_tail) rt->pending_tail->next = units;
    else rt->pending_head = units;
    cb_unit *t = units;
    while (t->next) t = t->next;
    rt->pending_tail = t;
  }
  cb__dispatch(rt);
  if (__atomic_exchange_n(&rt->copies_kicked, 0, __ATOMIC_SEQ_CST)) cb__resume_copies(rt);
}

void cb__kick_copies(cb_runtime *rt) {
  __atomic_store_n(&rt->copies_kicked, 1, __ATOMIC_SEQ_CST);
  wake_loop(rt);
}

static void start_connections(cb_runtime *rt, void *arg) {
  (void)arg;
  for (int i = 0; i < rt->nconns; i++) cb__conn_start(&rt->conns[i]);
  cb__conn_start(&rt->listener);
}

static void *loop_main(void *arg) {
  cb_runtime *rt = arg;
  start_connections(rt, NULL);
  uv_run(&rt->loop, UV_RUN_DEFAULT);
  return NULL;
}

/* ---- open runtimes, closed at process exit ------------------------------ */

static pthread_mutex_t open_lock = PTHREAD_MUTEX_INITIALIZER;
static cb_runtime *open_head;
static pthread_once_t atexit_once = PTHREAD_ONCE_INIT;

static void close_open_runtimes(void) {
  for (;;) {
    pthread_mutex_lock(&open_lock);
    cb_runtime *rt = open_head;
    pthread_mutex_unlock(&open_lock);
    if (rt == NULL) return;
    cb_runtime_close(rt); /* unlinks it */
  }
}

static void register_atexit(void) { atexit(close_open_runtimes); }

static void link_open(cb_runtime *rt) {
  pthread_once(&atexit_once, register_atexit);
  pthread_mutex_lock(&open_lock);
  rt->next_open = open_head;
  open_head = rt;
  pthread_mutex_unlock(&open_lock);
}

static void unlink_open(cb_runtime *rt) {
  pthread_mutex_lock(&open_lock);
  for (cb_runtime **pp = &open_head; *pp; pp = &(*pp)->next_open)
    if (*pp == rt) {
      *pp = rt->next_open;
      break;
    }
  pthread_mutex_unlock(&open_lock);
}

/* ---- parts: states of components above ---------------------------------- */

typedef struct runtime_part {
  struct runtime_part *next;
  const cb_runtime_part *part;
  void *state;
} runtime_part;

void *cb_runtime_part_of(cb_runtime *rt, const cb_runtime_part *part) {
  if (forked(rt)) return NULL;
  pthread_mutex_lock(&rt->lock);
  runtime_part *p = rt->parts;
  while (p && p->part != part) p = p->next;
  if (p == NULL && (p = calloc(1, sizeof *p)) != NULL) {
    p->part = part;
    if ((p->state = part->make(rt)) != NULL) {
      p->next = rt->parts;
      rt->parts = p;
    } else {
      free(p);
      p = NULL;
    }
  }
  void *state = p ? p->state : NULL;
  pthread_mutex_unlock(&rt->lock);
  return state;
}

/* When the runtime is freed: its loop thread was joined. */
static void drop_parts(cb_runtime *rt) {
  while (rt->parts) {
    runtime_part *p = rt->parts;
    rt->parts = p->next;
    p->part->drop(p->state);
    free(p);
  }
}

/* ---- lifecycle ---------------------------------------------------------- */

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

/* Frees what cb_runtime_new allocated before its loop and threads exist. */
static void free_parts(cb_runtime *rt) {
  free(rt->conninfo);
  free(rt->application_name);
  free(rt->conns);
  cb_hub_free(rt->hub);
  cb_event_feed_free(rt->events);
  free(rt);
}

int cb_runtime_new(const cb_runtime_options *options, cb_runtime **out, cb_err *err) {
  *out = NULL;
  cb_runtime_options defaults = {0};
  if (options == NULL) options = &defaults;
  cb_runtime *rt = calloc(1, sizeof *rt);
  if (rt == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  rt->pid = cb_process_id();
  rt->nconns = options->pool_size > 0 ? options->pool_size : 2;
  rt->notify_after_commit = options->notify_after_commit != 0;
  rt->connect_timeout_ms = options->connect_timeout_ms > 0 ? options->connect_timeout_ms : 5000;
  rt->conninfo = dup_or_null(options->conninfo ? options->conninfo : "");
  rt->application_name = dup_or_null(options->application_name ? options->application_name : "commandbus");
  rt->conns = calloc((size_t)rt->nconns, sizeof *rt->conns);
  rt->hub = cb_hub_new();
  rt->events = cb_event_feed_new();
  if (!rt->conninfo || !rt->application_name || !rt->conns || !rt->hub || !rt->events) {
    free_parts(rt);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  pthread_mutex_init(&rt->lock, NULL);
  pthread_mutex_init(&rt->direct_lock, NULL);
  pthread_mutex_init(&rt->signal_lock, NULL);
  pthread_cond_init(&rt->started, NULL);
  uv_loop_init(&rt->loop);
  rt->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (rt->wake_fd < 0 || uv_poll_init(&rt->loop, &rt->wake, rt->wake_fd) != 0) {
    if (rt->wake_fd >= 0) close(rt->wake_fd);
    uv_loop_close(&rt->loop);
    pthread_cond_destroy(&rt->started);
    pthread_mutex_destroy(&rt->signal_lock);
    pthread_mutex_destroy(&rt->direct_lock);
    pthread_mutex_destroy(&rt->lock);
    free_parts(rt);
    return cb_err_set(err, CB_ENOMEM, "cannot make the loop's wake-up descriptor");
  }
  rt->wake.data = rt;
  uv_poll_start(&rt->wake, UV_READABLE, on_wake);
  for (int i = 0; i < rt->nconns; i++) cb__conn_init(rt, &rt->conns[i], i);
  cb__conn_init(rt, &rt->listener, -1);
  rt->startup_pending = rt->nconns;

  if (cb_thread_start(&rt->thread, loop_main, rt) != 0) {
    uv_close((uv_handle_t *)&rt->wake, NULL);
    for (int i = 0; i < rt->nconns; i++) uv_close((uv_handle_t *)&rt->conns[i].timer, NULL);
    uv_close((uv_handle_t *)&rt->listener.timer, NULL);
    uv_run(&rt->loop, UV_RUN_DEFAULT);
    rt->closed = 1;
    cb_runtime_free(rt);
    return cb_err_set(err, CB_ENOMEM, "cannot start the loop thread");
  }
  rt->thread_started = 1;
  link_open(rt);

  /* Wait for the pool's first attempts, then insist on one good connection:
   * an unreachable database is reported here, once, rather than by the first
   * query. */
  pthread_mutex_lock(&rt->lock);
  while (rt->startup_pending > 0) pthread_cond_wait(&rt->started, &rt->lock);
  pthread_mutex_unlock(&rt->lock);

  cb_unit *probe = cb_unit_new();
  int rc = probe ? cb_unit_add(probe, "SELECT 1", 0, NULL) : CB_ENOMEM;
  if (rc >= 0) rc = cb_runtime_exec(rt, probe, err);
  cb_unit_free(probe);
  if (rc != CB_OK) {
    if (rc == CB_ECONNECTION && rt->conns[0].last_error[0])
      cb_err_set(err, CB_ECONNECTION, "cannot connect to PostgreSQL: %s", rt->conns[0].last_error);
    cb_runtime_free(rt);
    return rc;
  }
  *out = rt;
  return CB_OK;
}

void cb_runtime_close(cb_runtime *rt) {
  if (rt == NULL) return;
  if (forked(rt)) { /* the parent's to close; the child only forgets it */
    unlink_open(rt);
    return;
  }
  pthread_mutex_lock(&rt->lock);
  if (rt->closing) {
    /* Another thread is closing: wait until it has joined the loop. */
    while (!rt->closed) pthread_cond_wait(&rt->started, &rt->lock);
    pthread_mutex_unlock(&rt->lock);
    return;
  }
  rt->closing = 1;
  pthread_mutex_unlock(&rt->lock);

  if (rt->thread_started) {
    wake_loop(rt);
    pthread_join(rt->thread, NULL);
  }
  uv_loop_close(&rt->loop);
  close(rt->wake_fd);   /* its poll handle was closed with the loop */
  cb__direct_close(rt); /* a send under way on it sees the runtime closing */
  cb_hub_close(rt->hub);
  unlink_open(rt);
  pthread_mutex_lock(&rt->lock);
  rt->closed = 1;
  pthread_cond_broadcast(&rt->started);
  pthread_mutex_unlock(&rt->lock);
}

void cb_runtime_free(cb_runtime *rt) {
  if (rt == NULL) return;
  cb_runtime_close(rt);
  if (forked(rt)) return; /* a copy of the parent's: left as it is */
  for (size_t i = 0; i < rt->nchannels; i++) free(rt->channels[i]);
  free(rt->channels);
  for (size_t i = 0; i < rt->nremembered; i++) free(rt->remembered[i]);
  free(rt->remembered);
  free(rt->watches);
  free(rt->signal_watches);
  free(rt->conns);
  free(rt->conninfo);
  free(rt->application_name);
  cb_hub_free(rt->hub);
  cb_event_feed_free(rt->events);
  drop_parts(rt);
  pthread_cond_destroy(&rt->started);
  pthread_mutex_destroy(&rt->signal_lock);
  pthread_mutex_destroy(&rt->direct_lock);
  pthread_mutex_destroy(&rt->lock);
  free(rt);
}

int cb_runtime_is_closed(cb_runtime *rt) {
  if (forked(rt)) return 1;
  pthread_mutex_lock(&rt->lock);
  int closing = rt->closing;
  pthread_mutex_unlock(&rt->lock);
  return closing;
}

cb_hub *cb_runtime_hub(cb_runtime *rt) { return rt->hub; }

cb_event_feed *cb_runtime_event_feed(cb_runtime *rt) { return rt->events; }

int cb_runtime_pool_size(const cb_runtime *rt) { return rt->nconns; }

int cb_runtime_notify_after_commit(const cb_runtime *rt) { return rt->notify_after_commit; }

uint64_t cb_runtime_units_sent(cb_runtime *rt) { return __atomic_load_n(&rt->units_sent, __ATOMIC_RELAXED); }

int cb_runtime_on_loop(cb_runtime *rt) { return rt->thread_started && pthread_equal(pthread_self(), rt->thread); }

/* ---- handing work to the loop ------------------------------------------ */

static void chain(cb_unit *const *units, size_t n) {
  for (size_t i = 0; i < n; i++) {
    units[i]->next = i + 1 < n ? units[i + 1] : NULL;
    units[i]->group_end = i + 1 == n;
    units[i]->reconnect_tried = 0;
    if (units[i]->broken) continue; /* keeps its failure: pg.c sends none of it */
    units[i]->status = CB_OK;
    cb_err_clear(&units[i]->err);
  }
}

int cb_runtime_submit(cb_runtime *rt, cb_unit *const *units, size_t n) {
  if (forked(rt)) return CB_ESTATE;
  if (n == 0) return CB_OK;
  if (cb_runtime_on_loop(rt) && rt->loop_closing) return CB_ECLOSED;
  chain(units, n);
  if (cb_runtime_on_loop(rt)) {
    if (rt->pending_tail) rt->pending_tail->next = units[0];
    else rt->pending_head = units[0];
    rt->pending_tail = units[n - 1];
    cb__dispatch(rt);
    return CB_OK;
  }
  pthread_mutex_lock(&rt->lock);
  if (rt->closing) {
    pthread_mutex_unlock(&rt->lock);
    return CB_ECLOSED;
  }
  if (rt->submitted_tail) rt->submitted_tail->next = units[0];
  else rt->submitted_head = units[0];
  rt->submitted_tail = units[n - 1];
  pthread_mutex_unlock(&rt->lock);
  wake_loop(rt);
  return CB_OK;
}

int cb_runtime_call(cb_runtime *rt, void (*fn)(cb_runtime *rt, void *arg), void *arg) {
  if (forked(rt)) return CB_ESTATE;
  pending_call *c = malloc(sizeof *c);
  if (c == NULL) return CB_ENOMEM;
  c->next = NULL;
  c->fn = fn;
  c->arg = arg;
  pthread_mutex_lock(&rt->lock);
  if (rt->closing) {
    pthread_mutex_unlock(&rt->lock);
    free(c);
    return CB_ECLOSED;
  }
  if (rt->calls_tail) rt->calls_tail->next = c;
  else rt->calls_head = c;
  rt->calls_tail = c;
  pthread_mutex_unlock(&rt->lock);
  wake_loop(rt);
  return CB_OK;
}

/* A caller thread blocked on its units; lives on the caller's stack. */
typedef struct waiter {
  pthread_mutex_t lock;
  pthread_cond_t done;
  size_t remaining;
} waiter;

static void waiter_unit_done(cb_unit *u, void *arg) {
  (void)u;
  waiter *w = arg;
  pthread_mutex_lock(&w->lock);
  if (--w->remaining == 0) pthread_cond_signal(&w->done);
  pthread_mutex_unlock(&w->lock);
}

int cb_runtime_exec_many(cb_runtime *rt, cb_unit *const *units, size_t n, cb_err *err) {
  if (forked(rt)) return fork_error(rt, err);
  if (cb_runtime_on_loop(rt))
    return cb_err_set(err, CB_EDEADLOCK,
                      "a blocking call was made on the runtime's own loop thread; it would wait forever");
  if (n == 0) return CB_OK;
  waiter w;
  pthread_mutex_init(&w.lock, NULL);
  pthread_cond_init(&w.done, NULL);
  w.remaining = n;
  for (size_t i = 0; i < n; i++) cb_unit_on_done(units[i], waiter_unit_done, &w);
  int rc = cb_runtime_submit(rt, units, n);
  if (rc == CB_OK) {
    pthread_mutex_lock(&w.lock);
    while (w.remaining > 0) pthread_cond_wait(&w.done, &w.lock);
    pthread_mutex_unlock(&w.lock);
  } else {
    cb_err_set(err, rc, "the runtime is closed");
  }
  for (size_t i = 0; i < n; i++) cb_unit_on_done(units[i], NULL, NULL);
  pthread_cond_destroy(&w.done);
  pthread_mutex_destroy(&w.lock);
  return rc;
}

int cb_runtime_exec(cb_runtime *rt, cb_unit *u, cb_err *err) {
  if (u->broken) { /* a statement was dropped while it was filled: nothing runs */
    if (err) *err = u->err;
    return u->broken;
  }
  int rc = cb_runtime_exec_many(rt, &u, 1, err);
  if (rc != CB_OK) return rc;
  if (u->status != CB_OK && err) *err = u->err;
  return u->status;
}

/* ---- LISTEN ------------------------------------------------------------- */

static int valid_channel(const char *c) {
  size_t n = strlen(c);
  if (n == 0 || n > 63) return 0;
  for (size_t i = 0; i < n; i++) {
    char ch = c[i];
    if (!((ch >= 'a' && ch <= 'z') || ch == '_' || (i > 0 && ch >= '0' && ch <= '9'))) return 0;
  }
  return 1;
}

int cb_runtime_listen(cb_runtime *rt, const char *channel, cb_err *err) {
  if (forked(rt)) return fork_error(rt, err);
  if (!valid_channel(channel)) return cb_err_set(err, CB_EINVAL, "invalid channel name `%s`", channel);
  pthread_mutex_lock(&rt->lock);
  for (size_t i = 0; i < rt->nchannels; i++)
    if (strcmp(rt->channels[i], channel) == 0) {
      pthread_mutex_unlock(&rt->lock);
      return CB_OK;
    }
  /* Recorded first, so that a reconnection in between re-LISTENs it too. */
  char *copy = strdup(channel);
  size_t cap = rt->channels_cap;
  if (copy == NULL || cb_grow((void **)&rt->channels, &cap, rt->nchannels + 1, sizeof(char *)) < 0) {
    pthread_mutex_unlock(&rt->lock);
    free(copy);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  rt->channels_cap = cap;
  rt->channels[rt->nchannels++] = copy;
  pthread_mutex_unlock(&rt->lock);

  char sql[96];
  snprintf(sql, sizeof sql, "LISTEN \"%s\"", channel);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  cb_unit_add_flags(u, sql, 0, NULL, CB_STMT_ONESHOT);
  u->to_listener = 1;
  int rc = cb_runtime_exec(rt, u, err);
  cb_unit_free(u);
  /* Another thread may have found the channel recorded while this LISTEN was
   * still on its way, and gone to wait: a send in that gap notified nobody.
   * Waking the channel's waiters once makes them read again. */
  if (rc == CB_OK) cb_hub_notify(rt->hub, channel);
  return rc;
}

/* ---- loop-thread notification watches ------------------------------------ */

int cb_runtime_watch(cb_runtime *rt, const char *channel, cb_notify_fn fn, void *arg) {
  size_t i = 0;
  while (i < rt->nwatches && rt->watches[i].id != 0) i++;
  if (i == rt->nwatches) {
    size_t cap = rt->watches_cap;
    if (cb_grow((void **)&rt->watches, &cap, rt->nwatches + 1, sizeof *rt->watches) < 0) return CB_ENOMEM;
    rt->watches_cap = cap;
    rt->nwatches++;
  }
  notify_watch *w = &rt->watches[i];
  w->id = ++rt->next_watch_id;
  snprintf(w->channel, sizeof w->channel, "%s", channel);
  w->fn = fn;
  w->arg = arg;
  return w->id;
}

void cb_runtime_unwatch(cb_runtime *rt, int id) {
  for (size_t i = 0; i < rt->nwatches; i++)
    if (rt->watches[i].id == id) rt->watches[i].id = 0;
}

/* ---- signal watches ------------------------------------------------------ */

static void on_signal(uv_signal_t *handle, int signum) {
  cb_runtime *rt = handle->data;
  /* Under the lock: once unwatch returns, its callback cannot be running. */
  pthread_mutex_lock(&rt->signal_lock);
  for (size_t i = 0; i < rt->nsignal_watches; i++)
    if (rt->signal_watches[i].id != 0) rt->signal_watches[i].fn(signum, rt->signal_watches[i].arg);
  pthread_mutex_unlock(&rt->signal_lock);
}

/* Loop: handles the signals while any watch wants them. */
static void sync_signals(cb_runtime *rt, void *arg) {
  (void)arg;
  if (rt->loop_closing) return;
  pthread_mutex_lock(&rt->signal_lock);
  int want = rt->live_signal_watches > 0;
  pthread_mutex_unlock(&rt->signal_lock);
  if (want && !rt->signals_inited) {
    uv_signal_init(&rt->loop, &rt->sigint);
    uv_signal_init(&rt->loop, &rt->sigterm);
    rt->sigint.data = rt->sigterm.data = rt;
    rt->signals_inited = 1;
  }
  if (want && !rt->signals_on) {
    uv_signal_start(&rt->sigint, on_signal, SIGINT);
    uv_signal_start(&rt->sigterm, on_signal, SIGTERM);
  } else if (!want && rt->signals_on) {
    uv_signal_stop(&rt->sigint);
    uv_signal_stop(&rt->sigterm);
  }
  rt->signals_on = want;
}

static int request_sync_signals(cb_runtime *rt) {
  if (cb_runtime_on_loop(rt)) {
    sync_signals(rt, NULL);
    return CB_OK;
  }
  return cb_runtime_call(rt, sync_signals, NULL);
}

int cb_runtime_watch_signals(cb_runtime *rt, cb_signal_fn fn, void *arg) {
  pthread_mutex_lock(&rt->signal_lock);
  size_t i = 0;
  while (i < rt->nsignal_watches && rt->signal_watches[i].id != 0) i++;
  if (i == rt->nsignal_watches) {
    size_t cap = rt->signal_watches_cap;
    if (cb_grow((void **)&rt->signal_watches, &cap, rt->nsignal_watches + 1, sizeof *rt->signal_watches) < 0) {
      pthread_mutex_unlock(&rt->signal_lock);
      return CB_ENOMEM;
    }
    rt->signal_watches_cap = cap;
    rt->nsignal_watches++;
  }
  signal_watch *w = &rt->signal_watches[i];
  w->id = ++rt->next_signal_id;
  w->fn = fn;
  w->arg = arg;
  rt->live_signal_watches++;
  int id = w->id;
  pthread_mutex_unlock(&rt->signal_lock);
  if (request_sync_signals(rt) != CB_OK) {
    cb_runtime_unwatch_signals(rt, id);
    return CB_ECLOSED;
  }
  return id;
}

void cb_runtime_unwatch_signals(cb_runtime *rt, int id) {
  if (id <= 0) return;
  int found = 0;
  pthread_mutex_lock(&rt->signal_lock);
  for (size_t i = 0; i < rt->nsignal_watches && !found; i++)
    if (rt->signal_watches[i].id == id) {
      rt->signal_watches[i].id = 0;
      rt->live_signal_watches--;
      found = 1;
    }
  pthread_mutex_unlock(&rt->signal_lock);
  if (found) request_sync_signals(rt); /* closed: the loop's handles are gone already */
}

struct uv_loop_s *cb_runtime_loop(cb_runtime *rt) {
  return &rt->loop;
}

/* ---- remembered facts ---------------------------------------------------- */

int cb_runtime_remembers(cb_runtime *rt, const char *key) {
  if (forked(rt)) return 0;
  pthread_mutex_lock(&rt->lock);
  int found = 0;
  for (size_t i = 0; i < rt->nremembered && !found; i++) found = strcmp(rt->remembered[i], key) == 0;
  pthread_mutex_unlock(&rt->lock);
  return found;
}

void cb_runtime_remember(cb_runtime *rt, const char *key) {
  if (forked(rt) || cb_runtime_remembers(rt, key)) return;
  char *copy = strdup(key);
  if (copy == NULL) return;
  pthread_mutex_lock(&rt->lock);
  size_t cap = rt->remembered_cap;
  if (cb_grow((void **)&rt->remembered, &cap, rt->nremembered + 1, sizeof(char *)) == 0) {
    rt->remembered_cap = cap;
    rt->remembered[rt->nremembered++] = copy;
    copy = NULL;
  }
  pthread_mutex_unlock(&rt->lock);
  free(copy);
}

/* ---- configuration ------------------------------------------------------ */

static int default_threads_set;

void cb_set_default_threads(int n) { __atomic_store_n(&default_threads_set, n > 0 ? n : 0, __ATOMIC_RELAXED); }

int cb_default_threads(void) {
  int n = __atomic_load_n(&default_threads_set, __ATOMIC_RELAXED);
  if (n > 0) return n;
  const char *env = getenv("COMMANDBUS_SYNC_THREADS");
  if (env && *env) {
    char *end;
    long v = strtol(env, &end, 10);
    if (*end == '\0' && v > 0 && v <= 1024) return (int)v;
  }
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  if (cores < 1) cores = 1;
  return cores < 32 ? (int)cores : 32;
}
