/* commandbus: awaiting commands, processes and process events (see awaiter.h). */
#include "commandbus/awaiter.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "commandbus/bus.h"
#include "commandbus/hub.h"
#include "commandbus/uuid.h"

int cb_await_backoff_ms(int attempt) {
  if (attempt < 0) attempt = 0;
  if (attempt >= 6) return 1000; /* 25 << 6 = 1600: past the cap */
  int ms = 25 << attempt;
  return ms > 1000 ? 1000 : ms;
}

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int cb_await_safety_backoff_ms(int attempt) {
  if (attempt < 0) attempt = 0;
  if (attempt >= 11) return CB_AWAIT_SAFETY_CAP_MS; /* 25 << 11 = 51200: past the cap */
  int ms = 25 << attempt;
  return ms > CB_AWAIT_SAFETY_CAP_MS ? CB_AWAIT_SAFETY_CAP_MS : ms;
}

/* The command table's trigger notifies awaiters only for these states
 * (core/sql/009_notify_final_states.sql): the lists must agree. */
static const char *const COMMAND_DONE[] = {"COMPLETED", "FAILED", "CANCELED", "IN_TROUBLESHOOTING_QUEUE", NULL};
#define COMMAND_DONE_SQL "('COMPLETED', 'FAILED', 'CANCELED', 'IN_TROUBLESHOOTING_QUEUE')"
static const char *const PROCESS_DONE[] = {"COMPLETED", "COMPENSATED", "FAILED", "CANCELED", NULL};

static int listed(const char *const *names, const char *s) {
  for (int i = 0; names[i]; i++)
    if (strcmp(names[i], s) == 0) return 1;
  return 0;
}

/* What one await waits for: the statements that read it, and how to tell
 * "there", "not yet" and "no such thing" apart from their results. */
typedef struct target {
  const char *what; /* "command" or "process": for messages */
  const char *domain;
  char id[CB_UUID_LEN + 1];
  const char *sql[2];   /* read statements; the last one's rows are the answer */
  const char *lock_sql; /* sql[0] taking a share lock on the record's row (see await_target) */
  int sql_nparams[2];   /* each uses the first sql_nparams[i] of params */
  int nsql;
  const char *params[4];
  /* 1: resolved; 0: not yet (why filled); CB_ENOTFOUND. u holds the reads
   * as its last nsql statements. */
  int (*check)(const cb_unit *u, const struct target *t, char *why, size_t n);
  const char *event_type; /* await_event */
  const char *after;
  /* sql[0] for a registered waiter (nsql 1): it also removes the waiter's
   * registration ($1 domain, $2 id, $3 waiter) when the record is in a
   * state the await returns on, in the same statement, so under the same
   * snapshot as the read: an answer it returns is one whose registration
   * it removed. NULL: the registration is removed after the await. */
  const char *read_unregister_sql;
} target;

#define READ_COMMAND                                                                                     \
  "SELECT domain, command_id::text AS command_id, command_type AS type, status, attempts, max_attempts," \
  " msg_id, queue_name, nullif(reply_queue, '') AS reply_to, correlation_id::text AS correlation_id,"    \
  " batch_id::text AS batch_id, last_error_type, last_error_code, last_error_msg,"                       \
  " created_at::text AS created_at, updated_at::text AS updated_at FROM commandbus.command"              \
  " WHERE domain = $1 AND command_id = $2::uuid"

#define READ_PROCESS                                                                                  \
  "SELECT domain, process_id::text AS process_id, process_type AS type, status, current_step, state," \
  " error_code, error_message, created_at::text AS created_at, updated_at::text AS updated_at,"       \
  " completed_at::text AS completed_at, batch_id::text AS batch_id FROM commandbus.process"           \
  " WHERE domain = $1 AND process_id = $2::uuid"

#define READ_EVENT                                                                                            \
  "SELECT domain, process_id::text AS process_id, sequence, event_type, step, status, data,"                  \
  " created_at::text AS created_at FROM commandbus.process_event WHERE domain = $1 AND process_id = $2::uuid" \
  " AND event_type = $3 AND sequence > $4::bigint ORDER BY sequence LIMIT 1"

static const cb_result *last(const cb_unit *u, int back) { return cb_unit_result(u, cb_unit_count(u) - 1 - back); }

static int check_status(const cb_unit *u, const target *t, const char *const *done, char *why, size_t n) {
  const cb_result *r = last(u, 0);
  if (cb_result_rows(r) == 0) return CB_ENOTFOUND;
  const char *status = cb_result_value(r, 0, 3);
  if (listed(done, status)) return 1;
  snprintf(why, n, "%s %s did not finish (it is %s)", t->what, t->id, status);
  return 0;
}

static int check_command(const cb_unit *u, const target *t, char *why, size_t n) {
  return check_status(u, t, COMMAND_DONE, why, n);
}

static int check_process(const cb_unit *u, const target *t, char *why, size_t n) {
  return check_status(u, t, PROCESS_DONE, why, n);
}

static int check_event(const cb_unit *u, const target *t, char *why, size_t n) {
  if (cb_result_rows(last(u, 1)) == 0) return CB_ENOTFOUND;
  if (cb_result_rows(last(u, 0)) > 0) return 1;
  snprintf(why, n, "process %s appended no %s event after sequence %s", t->id, t->event_type, t->after);
  return 0;
}

static void add_reads(cb_unit *u, const target *t, int locked) {
  for (int i = 0; i < t->nsql; i++)
    cb_unit_add(u, i == 0 && locked ? t->lock_sql : t->sql[i], t->sql_nparams[i], t->params);
}

/* A registered waiter's read also removes the registration once the record
 * is done, in the same statement: the await that returns then needs no
 * transaction of its own to unregister, nor a statement of its own in the
 * read's. 1 when the read added does that. */
static int add_reads_unregistering(cb_unit *u, const target *t, const char *const *register_params) {
  if (t->read_unregister_sql == NULL) {
    add_reads(u, t, 0);
    return 0;
  }
  cb_unit_add(u, t->read_unregister_sql, 3, register_params);
  return 1;
}

/* The first round trip of a listening await: register (so that writers
 * elsewhere notify us), then read, in one transaction. Rows of waiters that
 * died without removing theirs are cleared on the way, so that the table
 * stays as small as the number of live waiters (the triggers' first probe
 * finds it empty).
 *
 * The read takes a share lock on the record's row (`locked`), which closes
 * the gap between a writer and a waiter that registers meanwhile. A writer's
 * trigger looks for waiters when its statement ends, before its commit; a
 * waiter that registers after that look and reads before that commit would
 * neither be notified nor see the change. Under the lock it cannot: a writer
 * that holds the row already makes the read wait for its commit (the read
 * then returns the row as the writer left it), and a writer that comes
 * later waits for this transaction, so its trigger sees the registration.
 * The lock is held for this one transaction, which is not flushed to disk
 * before it returns (synchronous_commit off: a registration lost to a crash
 * costs nothing). `lock_ms` bounds the wait for a writer; when the lock
 * cannot be had (that bound, or a role without UPDATE on the table) the
 * round is made again without it, and the safety poll covers the gap. */
static void add_first_round(cb_unit *u, const target *t, const char *const *register_params, int locked,
                            const char *lock_ms) {
  /* One statement, not three: the settings (made once, by the row the
   * insert reads them from; the read after it is the first statement to
   * need them), the expired rows' delete and the registration. */
  const char *params[] = {register_params[0], register_params[1], register_params[2], register_params[3], lock_ms};
  cb_unit_add(u,
              "WITH expired AS (DELETE FROM commandbus.awaiter WHERE expires_at < now())"
              " INSERT INTO commandbus.awaiter (domain, id, waiter, expires_at)"
              " SELECT $1, $2::uuid, $3::uuid, now() + make_interval(secs => $4::float8)"
              " FROM (SELECT set_config('synchronous_commit', 'off', true), set_config('lock_timeout', $5, true)) s",
              5, params);
  add_reads(u, t, locked);
}

/* The lock of the first round could not be had: 55P03 (lock_timeout),
 * 42501 (no UPDATE privilege on the table). */
static int lock_refused(const cb_err *err) {
  return err->code == CB_EDATABASE && (strcmp(err->sqlstate, "55P03") == 0 || strcmp(err->sqlstate, "42501") == 0);
}

static void free_unit(cb_unit *u, void *arg) {
  (void)arg;
  cb_unit_free(u);
}

/* Sent without waiting for it: the caller has its answer already, and a row
 * left behind (the runtime closing meanwhile) expires on its own. */
static void unregister(cb_runtime *rt, const target *t, const char *waiter) {
  cb_unit *d = cb_unit_new();
  if (d == NULL) return;
  const char *params[] = {t->domain, t->id, waiter};
  cb_unit_add(d, "DELETE FROM commandbus.awaiter WHERE domain = $1 AND id = $2::uuid AND waiter = $3::uuid", 3, params);
  cb_unit_on_done(d, free_unit, NULL);
  if (cb_runtime_submit(rt, &d, 1) != CB_OK) cb_unit_free(d);
}

#define REGISTRATION_S 600.0

/* A request's send (cb_await_send): the unit holding it, and its result. */
typedef struct request {
  cb_unit *unit;
  const cb_command_spec *spec;
  cb_send_result *result;
} request;

/* Registers the waiter in the send's transaction, only when the send wrote
 * the command: a command id that exists fails the send (sent refusing
 * duplicates), and a held dedup key leaves no row with this id. Waiters
 * that died are cleared on the way, as by the first round. */
#define REGISTER_SENT                                                                      \
  "WITH expired AS (DELETE FROM commandbus.awaiter WHERE expires_at < now())"              \
  " INSERT INTO commandbus.awaiter (domain, id, waiter, expires_at)"                       \
  " SELECT $1, $2::uuid, $3::uuid, now() + make_interval(secs => $4::float8) WHERE EXISTS" \
  " (SELECT 1 FROM commandbus.command WHERE domain = $1 AND command_id = $2::uuid)"

/* Sends the request's command, registering the waiter in that transaction
 * unless it does not listen. The command cannot be done before that commits,
 * so there is nothing to read yet, nor a gap to close with a lock: the
 * listener and the subscription are in place before the commit, so the
 * completion's notification reaches us. */
static int send_request(cb_runtime *rt, const target *t, const request *req, const char *const *register_params,
                        int listening, cb_err *err) {
  if (listening && cb_unit_add(req->unit, REGISTER_SENT, 4, register_params) < 0)
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  int rc = cb_bus_send_unit(rt, req->unit, 1, req->result, err);
  if (rc != CB_OK && cb_bus_is_duplicate(err)) {
    snprintf(req->result->duplicate_of, sizeof req->result->duplicate_of, "%s", t->id);
    return cb_err_set(err, CB_EDUPLICATE, "command %s already exists in domain %s", t->id, t->domain);
  }
  if (rc == CB_OK && req->result->duplicate)
    return cb_err_set(err, CB_EDUPLICATE, "dedup key `%.200s` is held by command %s in domain %s until its window ends",
                      req->spec->dedup_key, req->result->duplicate_of, t->domain);
  return rc;
}

/* The next read of a waiting await, armed on its subscription
 * (cb_hub_arm): the change that wakes the await hands the read to the loop
 * thread at once, from the thread that saw it. Woken first and then handing
 * the read over itself, the waiting thread added two wake-ups to the path of
 * every answer (itself, then the loop thread). Lives on the waiter's stack
 * until the read is back or was never handed over. */
typedef struct armed_read {
  cb_runtime *rt;
  cb_unit *unit;
  pthread_mutex_t lock;
  pthread_cond_t back;
  int done;      /* [lock] the read is back, or could not be handed over */
  int submit_rc; /* set before done: the hand-over's failure */
} armed_read;

static void armed_read_back(cb_unit *u, void *arg) {
  (void)u;
  armed_read *a = arg;
  pthread_mutex_lock(&a->lock);
  a->done = 1;
  pthread_cond_signal(&a->back);
  pthread_mutex_unlock(&a->lock);
}

/* On the thread that bumped the key. Once handed over, the read may be back
 * and its waiter gone before cb_runtime_submit returns: a is not touched
 * after it. */
static void armed_read_fire(void *arg) {
  armed_read *a = arg;
  cb_unit *u = a->unit;
  int rc = cb_runtime_submit(a->rt, &u, 1);
  if (rc != CB_OK) {
    a->submit_rc = rc;
    armed_read_back(u, a);
  }
}

static void deadline_in(struct timespec *ts, int ms) {
  clock_gettime(CLOCK_REALTIME, ts);
  ts->tv_sec += ms / 1000;
  ts->tv_nsec += (long)(ms % 1000) * 1000000L;
  if (ts->tv_nsec >= 1000000000L) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000L;
  }
}

/* Waits for the subscription's key to move, as cb_hub_wait does (1: it
 * moved, 0: wait_ms passed, CB_ECLOSED), with the read u armed on it. When
 * the change ran the read, *read_rc is its outcome (CB_OK, or the failure,
 * in err) and *ran is 1; otherwise the caller runs it. */
static int wait_reading(cb_runtime *rt, cb_hub_sub *sub, cb_unit *u, int wait_ms, int *ran, int *read_rc, cb_err *err) {
  *ran = 0;
  armed_read a = {.rt = rt, .unit = u};
  pthread_mutex_init(&a.lock, NULL);
  pthread_cond_init(&a.back, NULL);
  cb_unit_on_done(u, armed_read_back, &a);
  int woke = cb_hub_arm(sub, armed_read_fire, &a);
  if (woke == 0) {
    struct timespec deadline;
    deadline_in(&deadline, wait_ms);
    pthread_mutex_lock(&a.lock);
    while (!a.done && pthread_cond_timedwait(&a.back, &a.lock, &deadline) != ETIMEDOUT) {
    }
    int done = a.done;
    pthread_mutex_unlock(&a.lock);
    /* Out of time, unless a change took the read just now: then it is on
     * its way, and comes back. */
    if (done || cb_hub_disarm(sub) == 1) {
      pthread_mutex_lock(&a.lock);
      while (!a.done) pthread_cond_wait(&a.back, &a.lock);
      pthread_mutex_unlock(&a.lock);
      woke = 1;
      *ran = 1;
      if (a.submit_rc != CB_OK) {
        *read_rc = cb_err_set(err, CB_ECLOSED, "the bus was closed");
      } else {
        *read_rc = cb_unit_status(u);
        if (*read_rc != CB_OK && err) *err = *cb_unit_error(u);
      }
    }
  }
  cb_unit_on_done(u, NULL, NULL);
  pthread_cond_destroy(&a.back);
  pthread_mutex_destroy(&a.lock);
  return woke;
}

static int await_target(cb_runtime *rt, const target *t, double timeout, int flags, const request *req, cb_unit **rows,
                        cb_err *err) {
  *rows = NULL;
  if (!(timeout >= 0)) return cb_err_set(err, CB_EINVAL, "timeout must be a number of seconds >= 0");
  int no_listen = (flags & CB_AWAIT_NO_LISTEN) != 0;
  int rc;
  if (!no_listen && (rc = cb_runtime_listen(rt, CB_AWAIT_CHANNEL, err)) != CB_OK) return rc;
  char key[CB_HUB_KEY_MAX];
  cb_hub_change_key(t->domain, t->id, key);
  /* Subscribed before the first read: a change between the read and the
   * wait bumps the version we already hold, so it is never lost. */
  cb_hub_sub *sub = cb_hub_subscribe(cb_runtime_hub(rt), key);
  if (sub == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  char waiter[CB_UUID_LEN + 1], expires[32], why[256] = "";
  cb_uuid_v7(waiter);
  /* A registration lasts a while past the next safety poll and is renewed
   * as it nears its end, so that long (or endless) waits stay registered,
   * and a waiter that died stops costing notifications soon. */
  double lasts = (timeout < REGISTRATION_S ? timeout : REGISTRATION_S) + CB_AWAIT_SAFETY_CAP_MS / 1000.0 * 2;
  snprintf(expires, sizeof expires, "%.3f", lasts);
  const char *register_params[] = {t->domain, t->id, waiter, expires};
  double deadline = now_seconds() + timeout, registered_until = now_seconds() + lasts;
  cb_unit *u = cb_unit_new();
  if (u == NULL) {
    cb_hub_unsubscribe(sub);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  /* A waiter that only looks (timeout 0) has no gap to close. */
  int locked = !no_listen && timeout > 0;
  char lock_ms[24];
  snprintf(lock_ms, sizeof lock_ms, "%d", timeout >= 5 ? 5000 : timeout * 1000 < 1 ? 1 : (int)(timeout * 1000));
  if (req == NULL) { /* a request's send is its first round */
    if (no_listen) add_reads(u, t, 0);
    else add_first_round(u, t, register_params, locked, lock_ms);
  }
  int registered = 0, first_round = !no_listen && !req, unregistering = 0, to_send = req != NULL;
  int read_ran = 0, read_rc = CB_OK;
  for (int attempt = 0;; attempt++) {
    int found;
    if (read_ran) { /* the change that woke us ran the read */
      read_ran = 0;
      rc = read_rc;
      if (rc != CB_OK) break;
      found = t->check(u, t, why, sizeof why);
    } else if (to_send) {
      to_send = 0;
      rc = send_request(rt, t, req, register_params, !no_listen, err);
      if (rc != CB_OK) break; /* rolled back, or a held dedup key: nothing registered */
      registered = !no_listen;
      found = 0;
      snprintf(why, sizeof why, "command %s did not finish (it is PENDING)", t->id);
    } else {
      rc = cb_runtime_exec(rt, u, err);
      if (rc != CB_OK && first_round && locked && lock_refused(err)) {
        locked = 0;
        cb_unit_reset(u);
        add_first_round(u, t, register_params, 0, lock_ms);
        rc = cb_runtime_exec(rt, u, err);
      }
      if (rc != CB_OK) break; /* rolled back: the registration is as it was */
      if (first_round) registered = 1;
      found = t->check(u, t, why, sizeof why);
    }
    /* The read that found the record done removed the registration. */
    if (found == 1 && unregistering) registered = 0;
    if (found == CB_ENOTFOUND) {
      rc = cb_err_set(err, CB_ENOTFOUND, "unknown %s `%s`", t->what, t->id);
      break;
    }
    if (found == 1) {
      *rows = u;
      u = NULL;
      break;
    }
    double left = deadline - now_seconds();
    if (left <= 0) {
      rc = cb_err_set(err, CB_ETIMEOUT, "%s within %g s", why, timeout);
      break;
    }
    /* The next read is ready before the wait, and the last one's results
     * are gone: an idle waiter holds little memory. */
    cb_unit_reset(u);
    first_round = 0;
    unregistering = 0;
    if (!no_listen && !registered) {
      /* Waiting unregistered: registered again at once, the gap closed as
       * at the start. The reads above never leave a waiter so (the read
       * that removes the registration is the one that returns; it was two
       * statements, and a retry between them could); kept for safety. */
      first_round = 1;
      add_first_round(u, t, register_params, locked, lock_ms);
      registered_until = now_seconds() + lasts;
      continue;
    }
    if (registered && now_seconds() > registered_until - CB_AWAIT_SAFETY_CAP_MS / 1000.0 * 1.5) {
      cb_unit_add(u,
                  "UPDATE commandbus.awaiter SET expires_at = now() + make_interval(secs => $4::float8)"
                  " WHERE domain = $1 AND id = $2::uuid AND waiter = $3::uuid",
                  4, register_params);
      registered_until = now_seconds() + lasts;
    }
    if (registered) unregistering = add_reads_unregistering(u, t, register_params);
    else add_reads(u, t, 0);
    /* Listening, every writer's change reaches us (the command and process
     * tables' triggers notify awaiters, core/sql/003, 004 and 009): polling is
     * only a safety net. Otherwise re-reads back off from 25 ms to 1 s. */
    int wait = no_listen ? cb_await_backoff_ms(attempt) : cb_await_safety_backoff_ms(attempt);
    if (wait > left * 1000) wait = (int)(left * 1000) + 1;
    int woke = wait_reading(rt, sub, u, wait, &read_ran, &read_rc, err);
    if (woke == CB_ECLOSED) {
      rc = cb_err_set(err, CB_ECLOSED, "the bus was closed");
      break;
    }
    if (woke == 1) attempt = -1; /* a real change: the poll schedule starts over */
  }
  cb_unit_free(u);
  cb_hub_unsubscribe(sub);
  if (registered) unregister(rt, t, waiter);
  return rc;
}

static int init_target(target *t, const char *what, const char *domain, const char *id, cb_err *err) {
  memset(t, 0, sizeof *t);
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (!cb_uuid_parse(id, t->id)) return cb_err_set(err, CB_EINVAL, "%s id `%.60s` is not a UUID", what, id ? id : "");
  t->what = what;
  t->domain = domain;
  t->params[0] = domain;
  t->params[1] = t->id;
  return CB_OK;
}

/* The reads of a command's await. */
static void command_target(target *t) {
  t->sql_nparams[t->nsql] = 2;
  t->sql[t->nsql++] = READ_COMMAND;
  t->lock_sql = READ_COMMAND " FOR SHARE";
  t->check = check_command;
  /* A statement's sub-statements share its snapshot: the delete's status
   * and the read's agree. */
  t->read_unregister_sql =
      "WITH unregistered AS (DELETE FROM commandbus.awaiter a WHERE a.domain = $1 AND a.id = $2::uuid"
      " AND a.waiter = $3::uuid AND EXISTS (SELECT 1 FROM commandbus.command c WHERE c.domain = $1"
      " AND c.command_id = $2::uuid AND c.status IN " COMMAND_DONE_SQL ")) " READ_COMMAND;
}

int cb_await_command(cb_runtime *rt, const char *domain, const char *command_id, double timeout, int flags,
                     cb_unit **rows, cb_err *err) {
  target t;
  *rows = NULL;
  int rc = init_target(&t, "command", domain, command_id, err);
  if (rc != CB_OK) return rc;
  command_target(&t);
  return await_target(rt, &t, timeout, flags, NULL, rows, err);
}

int cb_await_send(cb_runtime *rt, const char *domain, const cb_command_spec *spec, double delay, double timeout,
                  int flags, cb_send_result *result, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  memset(result, 0, sizeof *result);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  /* Refusing duplicates: a command id that exists fails the transaction,
   * the waiter's registration with it. */
  const cb_send_options refuse = {.refuse_duplicates = 1};
  target t;
  int rc = cb_bus_add_send(rt, u, domain, spec, 1, delay, result, &refuse, err);
  if (rc == CB_OK) rc = init_target(&t, "command", domain, result->command_id, err);
  if (rc == CB_OK) {
    command_target(&t);
    const request req = {u, spec, result};
    rc = await_target(rt, &t, timeout, flags, &req, rows, err);
  }
  cb_unit_free(u);
  return rc;
}

int cb_await_process(cb_runtime *rt, const char *domain, const char *process_id, double timeout, int flags,
                     cb_unit **rows, cb_err *err) {
  target t;
  *rows = NULL;
  int rc = init_target(&t, "process", domain, process_id, err);
  if (rc != CB_OK) return rc;
  t.sql_nparams[t.nsql] = 2;
  t.sql[t.nsql++] = READ_PROCESS;
  t.lock_sql = READ_PROCESS " FOR SHARE";
  t.check = check_process;
  return await_target(rt, &t, timeout, flags, NULL, rows, err);
}

int cb_await_event(cb_runtime *rt, const char *domain, const char *process_id, const char *event_type,
                   int64_t after_sequence, double timeout, int flags, cb_unit **rows, cb_err *err) {
  target t;
  *rows = NULL;
  int rc = init_target(&t, "process", domain, process_id, err);
  if (rc != CB_OK) return rc;
  if (event_type == NULL || event_type[0] == '\0') return cb_err_set(err, CB_EINVAL, "event_type is required");
  if (after_sequence < 0) return cb_err_set(err, CB_EINVAL, "after_sequence must not be negative");
  char after[24];
  snprintf(after, sizeof after, "%lld", (long long)after_sequence);
  t.event_type = event_type;
  t.after = after;
  t.params[2] = event_type;
  t.params[3] = after;
  t.sql_nparams[t.nsql] = 2;
  t.sql[t.nsql++] = "SELECT 1 FROM commandbus.process WHERE domain = $1 AND process_id = $2::uuid";
  /* Events are written under the process row's lock (its update's trigger,
   * or commandbus.append_process_event's FOR NO KEY UPDATE). */
  t.lock_sql = "SELECT 1 FROM commandbus.process WHERE domain = $1 AND process_id = $2::uuid FOR SHARE";
  t.sql_nparams[t.nsql] = 4;
  t.sql[t.nsql++] = READ_EVENT;
  t.check = check_event;
  return await_target(rt, &t, timeout, flags, NULL, rows, err);
}
