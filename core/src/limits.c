/* commandbus: rate and concurrency limits per command type (see limits.h).
 * The worker applies them in its receive statement. */
#include "commandbus/limits.h"

#include <stdio.h>
#include <string.h>

#include "commandbus/bus.h"

int cb_limits_set(cb_runtime *rt, const char *domain, const char *command_type, int per_second, int max_in_flight,
                  cb_err *err) {
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (command_type == NULL || command_type[0] == '\0') return cb_err_set(err, CB_EINVAL, "type is required");
  if (per_second < 0) return cb_err_set(err, CB_EINVAL, "per_second must not be negative");
  if (max_in_flight < 0) return cb_err_set(err, CB_EINVAL, "concurrency must not be negative");
  char rate[16], flight[16];
  snprintf(rate, sizeof rate, "%d", per_second);
  snprintf(flight, sizeof flight, "%d", max_in_flight);
  const char *params[] = {domain, command_type, rate, flight};
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  if (per_second == 0 && max_in_flight == 0) {
    cb_unit_add(u, "DELETE FROM commandbus.type_limit WHERE domain = $1 AND command_type = $2", 2, params);
  } else {
    /* The window's count is kept: changing a limit does not reset it. */
    cb_unit_add(u,
                "INSERT INTO commandbus.type_limit (domain, command_type, per_second, max_in_flight)"
                " VALUES ($1, $2, nullif($3::int, 0), nullif($4::int, 0)) ON CONFLICT (domain, command_type)"
                " DO UPDATE SET per_second = excluded.per_second, max_in_flight = excluded.max_in_flight",
                4, params);
  }
  rc = cb_runtime_exec(rt, u, err);
  cb_unit_free(u);
  return rc;
}

int cb_limits_list(cb_runtime *rt, const char *domain, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  const char *params[] = {domain};
  return cb_bus_query(rt,
                      "SELECT l.command_type AS type, l.per_second, l.max_in_flight AS concurrency,"
                      " (SELECT count(*) FROM commandbus.command k WHERE k.status = 'IN_PROGRESS'"
                      " AND k.command_type = l.command_type AND k.domain = $1"
                      " AND k.lease_expires_at > clock_timestamp())"
                      " AS in_flight FROM commandbus.type_limit l WHERE l.domain = $1 ORDER BY l.command_type",
                      1, params, rows, err);
}

/* The lock is taken in a sub-select so that the statement returns one row
 * even when there is nothing to lock, and the setting is made all the same. */
int cb_limits_add_lock(cb_unit *u, const char *domain) {
  const char *params[] = {domain};
  return cb_unit_add(u,
                     "SELECT set_config('plan_cache_mode', 'force_generic_plan', true),"
                     " ARRAY(SELECT command_type FROM commandbus.type_limit WHERE domain = $1 ORDER BY command_type"
                     " FOR NO KEY UPDATE)::text",
                     1, params);
}
