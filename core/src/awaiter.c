/* commandbus: awaiting commands (see awaiter.h). */
#include "commandbus/awaiter.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#include "commandbus/bus.h"
#include "commandbus/uuid.h"

int cb_await_backoff_ms(int attempt) {
  if (attempt < 0) attempt = 0;
  if (attempt >= 6) return 1000; /* 25 << 6 = 1600: past the cap */
  int ms = 25 << attempt;
  return ms > 1000 ? 1000 : ms;
}

void cb_await_key(const char *domain, const char *id, char *out) {
  snprintf(out, 128, CB_AWAIT_CHANNEL ":%s:%s", domain, id);
}

void cb_await_touch(cb_runtime *rt, const char *domain, const char *id) {
  char key[128];
  cb_await_key(domain, id, key);
  cb_hub_notify(cb_runtime_hub(rt), key);
}

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int terminal(const char *status) {
  return strcmp(status, "COMPLETED") == 0 || strcmp(status, "FAILED") == 0 || strcmp(status, "CANCELED") == 0 ||
         strcmp(status, "IN_TROUBLESHOOTING_QUEUE") == 0;
}

#define READ_COMMAND                                                                                        \
  "SELECT domain, command_id::text AS command_id, command_type AS type, status, attempts, max_attempts,"   \
  " msg_id, queue_name, nullif(reply_queue, '') AS reply_to, correlation_id::text AS correlation_id,"      \
  " batch_id::text AS batch_id, last_error_type, last_error_code, last_error_msg,"                         \
  " created_at::text AS created_at, updated_at::text AS updated_at FROM commandbus.command"                \
  " WHERE domain = $1 AND command_id = $2::uuid"

int cb_await_command(cb_runtime *rt, const char *domain, const char *command_id, double timeout, cb_unit **rows,
                     cb_err *err) {
  *rows = NULL;
  char id[CB_UUID_LEN + 1], waiter[CB_UUID_LEN + 1], key[128], expires[32];
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (!cb_uuid_parse(command_id, id))
    return cb_err_set(err, CB_EINVAL, "command id `%.60s` is not a UUID", command_id ? command_id : "");
  if (timeout < 0) return cb_err_set(err, CB_EINVAL, "timeout must not be negative");
  rc = cb_runtime_listen(rt, CB_AWAIT_CHANNEL, err);
  if (rc != CB_OK) return rc;
  cb_await_key(domain, id, key);
  cb_hub_sub *sub = cb_hub_subscribe(cb_runtime_hub(rt), key);
  if (sub == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  cb_uuid_v7(waiter);
  snprintf(expires, sizeof expires, "%.3f", timeout + 10);
  double deadline = now_seconds() + timeout;
  const char *read_params[] = {domain, id};
  const char *register_params[] = {domain, id, waiter, expires};

  /* First round trip: register (so that writers elsewhere notify us) and
   * read, in that order, in one transaction. */
  cb_unit *u = cb_unit_new();
  if (u == NULL) {
    cb_hub_unsubscribe(sub);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  cb_unit_add(u,
              "INSERT INTO commandbus.awaiter (domain, id, waiter, expires_at)"
              " VALUES ($1, $2::uuid, $3::uuid, now() + make_interval(secs => $4::float8))",
              4, register_params);
  cb_unit_add(u, READ_COMMAND, 2, read_params);
  int registered = 0;
  for (int attempt = 0;; attempt++) {
    rc = cb_runtime_exec(rt, u, err);
    if (rc != CB_OK) break;
    registered = 1;
    const cb_result *r = cb_unit_result(u, cb_unit_count(u) - 1);
    if (cb_result_rows(r) == 0) {
      rc = cb_err_set(err, CB_ENOTFOUND, "unknown command `%s`", id);
      break;
    }
    if (terminal(cb_result_value(r, 0, 3))) {
      *rows = u;
      u = NULL;
      break;
    }
    double left = deadline - now_seconds();
    if (left <= 0) {
      rc = cb_err_set(err, CB_ETIMEOUT, "command %s did not finish within %g s (it is %s)", id, timeout,
                      cb_result_value(r, 0, 3));
      break;
    }
    int wait = cb_await_backoff_ms(attempt);
    if (wait > left * 1000) wait = (int)(left * 1000) + 1;
    int woke = cb_hub_wait(sub, wait);
    if (woke == CB_ECLOSED) {
      rc = cb_err_set(err, CB_ECLOSED, "the bus was closed");
      break;
    }
    if (woke == 1) attempt = -1; /* a real change: the poll schedule starts over */
    cb_unit_reset(u);
    cb_unit_add(u, READ_COMMAND, 2, read_params);
  }
  cb_unit_free(u);
  cb_hub_unsubscribe(sub);
  if (registered) { /* best effort: an expired row is ignored anyway */
    cb_unit *d = cb_unit_new();
    if (d) {
      cb_unit_add(d, "DELETE FROM commandbus.awaiter WHERE domain = $1 AND id = $2::uuid AND waiter = $3::uuid", 3,
                  register_params);
      cb_err ignored;
      cb_runtime_exec(rt, d, &ignored);
      cb_unit_free(d);
    }
  }
  return rc;
}
