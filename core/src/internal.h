/* commandbus: structures shared by runtime.c and pg.c. Not installed.
 *
 * runtime.c calls into pg.c (connections), never the other way: what pg.c
 * needs of the runtime is data of cb_runtime below, and what it owes the
 * runtime (the pool's first attempts, notifications for watches) it writes
 * there itself.
 *
 * Threads: fields marked [loop] are touched only by the loop thread; fields
 * marked [lock] are guarded by cb_runtime.lock; [init] are set before the loop
 * thread starts and read-only after. */
#ifndef COMMANDBUS_INTERNAL_H
#define COMMANDBUS_INTERNAL_H

#include <libpq-fe.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "commandbus/runtime.h"
#include "unit_internal.h"

/* What the connection expects next from the server, in pipeline order. */
enum { SLOT_PREPARE, SLOT_PREPARE_SYNC, SLOT_STMT, SLOT_SYNC };
typedef struct pipe_slot {
  int kind;
  int index; /* statement index for SLOT_PREPARE/SLOT_STMT */
  cb_unit *unit;
} pipe_slot;

typedef struct stmt_cache_entry {
  char *sql; /* NULL: empty */
  uint64_t hash;
  int id;
} stmt_cache_entry;

enum { CONN_IDLE, CONN_CONNECTING, CONN_READY };

typedef struct cb_conn {
  cb_runtime *rt;       /* [init] */
  int index;            /* [init] -1 for the listener */
  PGconn *pg;           /* [loop] */
  uv_poll_t *poll;      /* [loop] heap: freed by its close callback */
  int poll_fd;          /* [loop] */
  int poll_events;      /* [loop] */
  int state;            /* [loop] CONN_* */
  int ever_connected;   /* [loop] */
  int startup_reported; /* [loop] the first attempt was reported to cb_runtime_new */
  uv_timer_t timer;     /* [loop] connect timeout, then reconnect backoff */
  int backoff_ms;       /* [loop] */
  pipe_slot *slots;     /* [loop] ring of what the server will answer */
  size_t slot_head, slot_count, slot_cap;
  int units_in_flight;     /* [loop] */
  cb_unit *copying;        /* [loop] the CB_STMT_COPY unit running here (out of pipeline mode), or NULL */
  int copy_next;           /* [loop] its parameter the next COPY reads (its copy source: the next COPY's number) */
  int copy_streaming;      /* [loop] a COPY is taking pieces from the unit's copy source */
  int copy_waiting;        /* [loop] its copy source had no piece yet: resumed by cb__resume_copies */
  int want_write;          /* [loop] PQflush left data to send */
  int goodbye;             /* [loop] the server said FATAL while nothing was in flight */
  stmt_cache_entry *cache; /* [loop] prepared statements of this session */
  size_t cache_cap, cache_count;
  int next_stmt_id;     /* [loop] */
  char last_error[256]; /* [loop] */
} cb_conn;

struct cb_runtime {
  uv_loop_t loop;     /* [loop] */
  uv_poll_t wake;     /* [loop] readable when wake_fd was written */
  int wake_fd;        /* an eventfd: any thread writes to it to wake the loop (runtime.c, wake_loop) */
  pthread_t thread;   /* [init] */
  int thread_started; /* [init] */
  pid_t pid;          /* [init] the process that created it: a fork's child may not use it */

  pthread_mutex_t lock;
  pthread_cond_t started;                       /* signalled when the first connection attempts end */
  cb_unit *submitted_head, *submitted_tail;     /* [lock] handed over, not yet taken */
  struct pending_call *calls_head, *calls_tail; /* [lock] */
  int closing;                                  /* [lock] no new work accepted */
  int closed;                                   /* [lock] the loop thread has been joined */
  int startup_pending;                          /* [lock] pool connections still making their first attempt */
  char **channels;                              /* [lock] channels LISTENed on (or being) */
  size_t nchannels, channels_cap;
  char **remembered; /* [lock] see cb_runtime_remember */
  size_t nremembered, remembered_cap;

  cb_unit *pending_head, *pending_tail;       /* [loop] waiting for a connection */
  int loop_closing;                           /* [loop] shutting down: no new work from callbacks */
  struct notify_watch *watches;               /* [loop] */
  size_t nwatches, watches_cap;               /* [loop] */
  int next_watch_id;                          /* [loop] */
  pthread_mutex_t signal_lock;                /* guards signal_watches; held while their callbacks run */
  struct signal_watch *signal_watches;        /* [signal_lock] id 0: a free slot */
  size_t nsignal_watches, signal_watches_cap; /* [signal_lock] */
  int next_signal_id, live_signal_watches;    /* [signal_lock] */
  uv_signal_t sigint, sigterm;                /* [loop] */
  int signals_inited, signals_on;             /* [loop] */
  cb_conn *conns;                             /* [init] the pool */
  int nconns;
  int notify_after_commit; /* cb_runtime_options' */
  cb_conn listener;
  char *conninfo;             /* [init] */
  char *application_name;     /* [init] */
  int connect_timeout_ms;     /* [init] */
  cb_hub *hub;                /* [init] */
  cb_event_feed *events;      /* [init] the process event sink's queue */
  struct runtime_part *parts; /* [lock] states of components above (cb_runtime_part_of) */
  uint64_t units_sent;        /* atomic: units sent to PostgreSQL (each one transaction) */
  int copies_kicked;          /* atomic: cb__kick_copies was called since the loop last looked */
  cb_runtime *next_open;      /* guarded by the global list's lock */
  /* The send connection: made on first use, used from callers' threads
   * outside the loop, one at a time (cb__direct_exec; bus.c's sends). */
  pthread_mutex_t direct_lock;
  cb_conn direct;          /* [direct_lock] */
  int64_t direct_retry_at; /* [direct_lock] CLOCK_MONOTONIC ms: no attempt to make it before */
};

typedef struct signal_watch {
  int id; /* 0: free slot */
  cb_signal_fn fn;
  void *arg;
} signal_watch;

typedef struct notify_watch {
  int id; /* 0: free slot */
  char channel[64];
  cb_notify_fn fn;
  void *arg;
} notify_watch;

/* pg.c: connections, run on the loop thread. */
void cb__conn_init(cb_runtime *rt, cb_conn *conn, int index);
void cb__conn_start(cb_conn *conn);
void cb__conn_shutdown(cb_conn *conn); /* fails in-flight units with CB_ECLOSED, closes handles */
void cb__dispatch(cb_runtime *rt);     /* sends pending units where a connection is ready */
/* Runs units (a chain of transactions, in order, in one round trip) on the
 * send connection from the calling thread, blocking, without the loop
 * thread: 0 once they ran (each unit's status says how it went; their
 * done callbacks are called on this thread), -1 when they did not start
 * (the connection is in use by another thread, cannot be made, the runtime
 * is closing or was forked): the caller then submits them as usual. */
int cb__direct_exec(cb_runtime *rt, cb_unit *const *units, size_t n);
/* Closes the send connection (cb_runtime_close, once the loop is joined). */
void cb__direct_close(cb_runtime *rt);
/* Asks each COPY whose source had no piece yet for one again (pg.c). */
void cb__resume_copies(cb_runtime *rt);
/* From any thread: each COPY whose source answered CB__COPY_LATER is
 * asked again soon, on the loop thread (runtime.c). */
void cb__kick_copies(cb_runtime *rt);
/* Writes message to out (outlen bytes, truncated) with whatever it echoes of
 * a password in conninfo (URI user info or password=, as written or
 * percent-decoded) shown as "***". conninfo may be NULL. */
void cb__redact_conninfo(const char *conninfo, const char *message, char *out, size_t outlen);

#endif
