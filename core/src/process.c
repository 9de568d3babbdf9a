/* commandbus: starting processes, reading them back, and their event log
 * (see process.h). */
#include "commandbus/process.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "commandbus/events.h"
#include "commandbus/retention.h"
#include "commandbus/uuid.h"

static int check_name(const char *what, const char *value, cb_err *err) {
  if (value == NULL || value[0] == '\0') return cb_err_set(err, CB_EINVAL, "%s is required", what);
  return CB_OK;
}

static int check_id(const char *what, const char *id, char *out, cb_err *err) {
  if (!cb_uuid_parse(id, out)) return cb_err_set(err, CB_EINVAL, "%s `%.60s` is not a UUID", what, id ? id : "");
  return CB_OK;
}

/* The domain and the id of an existing process, the id normalized into id. */
static int check_process(const char *domain, const char *process_id, char *id, cb_err *err) {
  int rc = cb_domain_valid(domain, err);
  if (rc == CB_OK) rc = check_id("process id", process_id, id, err);
  return rc;
}

/* Queries whose first statement looks the process up: no row, no process. */
static int found(int rc, cb_unit **rows, const char *id, cb_err *err) {
  if (rc == CB_OK && cb_result_rows(cb_unit_result(*rows, 0)) == 0) {
    cb_unit_free(*rows);
    *rows = NULL;
    return cb_err_set(err, CB_ENOTFOUND, "unknown process `%s`", id);
  }
  return rc;
}

/* A process's state is an object: its steps read and extend it by key. */
static int check_state(const char *json, cb_err *err) {
  if (json == NULL) return CB_OK;
  while (*json == ' ' || *json == '\t' || *json == '\n' || *json == '\r') json++;
  if (*json != '{') return cb_err_set(err, CB_EINVAL, "process state must be a JSON object");
  return CB_OK;
}

static int check_start(const cb_process_start_spec *spec, const cb_command_spec *command, char *batch, cb_err *err) {
  int rc = cb_domain_valid(spec->domain, err);
  if (rc == CB_OK) rc = check_name("process type", spec->process_type, err);
  if (rc == CB_OK) rc = check_name("step name", spec->step_name, err);
  if (rc == CB_OK) rc = check_state(spec->state_json, err);
  if (rc == CB_OK && spec->batch_id) rc = check_id("batch_id", spec->batch_id, batch, err);
  if (rc == CB_OK && command == NULL) rc = cb_err_set(err, CB_EINVAL, "a process starts with a command");
  if (rc == CB_OK && (command->reply_to == NULL || command->reply_to[0] == '\0'))
    rc = cb_err_set(err, CB_EINVAL, "a process's command needs reply_to (the process's reply queue)");
  return rc;
}

int cb_process_start(cb_runtime *rt, const cb_process_start_spec *spec, const cb_command_spec *first_command,
                     char *process_id, cb_send_result *result, cb_err *err) {
  char batch[CB_UUID_LEN + 1];
  int rc = check_start(spec, first_command, batch, err);
  if (rc != CB_OK) return rc;
  cb_uuid_v7(process_id);
  cb_command_spec command = *first_command;
  command.correlation_id = process_id;

  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  cb_events_add_begin(u); /* STARTED: for local awaiters and the sink */
  const char *process_params[] = {spec->domain,    process_id,       spec->process_type,
                                  spec->step_name, spec->state_json, spec->batch_id ? batch : NULL};
  cb_unit_add(u,
              "INSERT INTO commandbus.process (domain, process_id, process_type, status, current_step, state, batch_id)"
              " VALUES ($1::text, $2::uuid, $3, 'WAITING', $4, coalesce($5::jsonb, '{}'::jsonb), $6::uuid)",
              6, process_params);
  int first = cb_unit_count(u), events = -1;
  /* A command id that exists fails the whole start on the command's key. */
  const cb_send_options strict = {.refuse_duplicates = 1};
  rc = cb_bus_add_send(rt, u, spec->domain, &command, 1, 0, result, &strict, err);
  if (rc == CB_OK) {
    /* The domain is cast to text throughout: rcmd's process tables declare
     * it varchar(255), its command table text. rcmd's sent_at has no
     * default. */
    const char *audit_params[] = {spec->domain,
                                  process_id,
                                  spec->step_name,
                                  result->command_id,
                                  first_command->command_type,
                                  first_command->data_json};
    cb_unit_add(
        u,
        "INSERT INTO commandbus.process_audit (domain, process_id, step_name, command_id, command_type,"
        " command_data, sent_at) VALUES ($1::text, $2::uuid, $3, $4::uuid, $5, coalesce($6::jsonb, '{}'::jsonb),"
        " now())",
        6, audit_params);
    events = cb_events_add_read(u);
    rc = cb_runtime_exec(rt, u, err);
    if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22P02") == 0)
      rc = cb_err_set(err, CB_EINVAL, "invalid process state or command data: %s", err->message);
    else if (rc != CB_OK && cb_bus_is_duplicate(err))
      rc = cb_err_set(err, CB_EDUPLICATE, "command %s already exists in domain %s", result->command_id, spec->domain);
  }
  if (rc == CB_OK) {
    cb_bus_read_send(u, first, 1, result);
    cb_events_published(rt, u, events);
  }
  cb_unit_free(u);
  return rc;
}

/* ---- queries ------------------------------------------------------------------- */

#define PROCESS_COLUMNS                                                                                     \
  "domain, process_id::text AS process_id, process_type AS type, status, current_step, state, error_code, " \
  "error_message, created_at::text AS created_at, updated_at::text AS updated_at, "                         \
  "completed_at::text AS completed_at, batch_id::text AS batch_id"

int cb_process_get(cb_runtime *rt, const char *domain, const char *process_id, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  char id[CB_UUID_LEN + 1];
  int rc = check_process(domain, process_id, id, err);
  if (rc != CB_OK) return rc;
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {domain, id};
  cb_unit_add(u, "SELECT " PROCESS_COLUMNS " FROM commandbus.process WHERE domain = $1 AND process_id = $2::uuid", 2,
              params);
  return found(cb_bus_run_query(rt, u, rows, err), rows, id, err);
}

int cb_process_list(cb_runtime *rt, const cb_process_filter *f, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  int rc = cb_domain_valid(f->domain, err);
  if (rc != CB_OK) return rc;
  if (f->offset < 0) return cb_err_set(err, CB_EINVAL, "offset must not be negative");
  char limit[16], offset[16];
  snprintf(limit, sizeof limit, "%d", f->limit > 0 ? f->limit : 100);
  snprintf(offset, sizeof offset, "%d", f->offset);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {f->domain, f->process_type, f->status, limit, offset};
  cb_unit_add(u,
              "SELECT " PROCESS_COLUMNS
              " FROM commandbus.process WHERE domain = $1"
              " AND ($2::text IS NULL OR process_type = $2) AND ($3::text IS NULL OR status = $3)"
              " ORDER BY created_at DESC, process_id DESC LIMIT $4::int OFFSET $5::int",
              5, params);
  return cb_bus_run_query(rt, u, rows, err);
}

int cb_process_audit(cb_runtime *rt, const char *domain, const char *process_id, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  char id[CB_UUID_LEN + 1];
  int rc = check_process(domain, process_id, id, err);
  if (rc != CB_OK) return rc;
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {domain, id};
  /* One round trip tells "no steps yet" apart from "no such process". */
  cb_unit_add(u, "SELECT 1 FROM commandbus.process WHERE domain = $1 AND process_id = $2::uuid", 2, params);
  cb_unit_add(u,
              "SELECT id, step_name, command_id::text AS command_id, command_type, command_data,"
              " sent_at::text AS sent_at, reply_outcome, reply_data, received_at::text AS received_at"
              " FROM commandbus.process_audit WHERE domain = $1 AND process_id = $2::uuid ORDER BY id",
              2, params);
  return found(cb_bus_run_query(rt, u, rows, err), rows, id, err);
}

/* ---- the process-event log ------------------------------------------------------- */

#define EVENT_TYPE_MAX 100
/* Names the trigger gives events (see core/sql/003_process_events.sql); the
 * terminal ones are cb_event_is_terminal's. */
static const char *RESERVED[] = {"STARTED", "STEP_STARTED", "RESUMED", "WAITING_FOR_TSQ", "COMPENSATING", NULL};

static int reserved(const char *event_type) {
  for (int i = 0; RESERVED[i]; i++)
    if (strcmp(RESERVED[i], event_type) == 0) return 1;
  return cb_event_is_terminal(event_type);
}

int cb_process_append_event(cb_runtime *rt, const char *domain, const char *process_id, const char *event_type,
                            const char *data_json, int64_t *sequence, cb_err *err) {
  char id[CB_UUID_LEN + 1];
  *sequence = 0;
  int rc = check_process(domain, process_id, id, err);
  if (rc != CB_OK) return rc;
  if (event_type == NULL || event_type[0] == '\0' || strlen(event_type) > EVENT_TYPE_MAX)
    return cb_err_set(err, CB_EINVAL, "event_type must be 1 to %d bytes", EVENT_TYPE_MAX);
  if (reserved(event_type))
    return cb_err_set(err, CB_EINVAL, "event_type `%s` is reserved for process changes", event_type);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {domain, id, event_type, data_json};
  cb_events_add_begin(u);
  int at = cb_unit_add(u, "SELECT commandbus.append_process_event($1, $2::uuid, $3, $4::jsonb)", 4, params);
  int read = cb_events_add_read(u);
  rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22P02") == 0)
    rc = cb_err_set(err, CB_EINVAL, "event data is not valid JSON: %s", err->message);
  if (rc == CB_OK) {
    const cb_result *r = cb_unit_result(u, at);
    if (cb_result_is_null(r, 0, 0)) rc = cb_err_set(err, CB_ENOTFOUND, "unknown process `%s`", id);
    else if ((*sequence = cb_result_int(r, 0, 0)) < 0) {
      *sequence = 0;
      rc = cb_err_set(err, CB_ESTATE, "process %s has finished; it takes no more events", id);
    } else cb_events_published(rt, u, read);
  }
  cb_unit_free(u);
  return rc;
}

#define EVENT_COLUMNS \
  "domain, process_id::text AS process_id, sequence, event_type, step, status, data, created_at::text AS created_at"

int cb_process_events(cb_runtime *rt, const char *domain, const char *process_id, int64_t after_sequence,
                      cb_unit **rows, cb_err *err) {
  char id[CB_UUID_LEN + 1], after[24];
  *rows = NULL;
  int rc = check_process(domain, process_id, id, err);
  if (rc != CB_OK) return rc;
  snprintf(after, sizeof after, "%lld", (long long)after_sequence);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {domain, id, after};
  cb_unit_add(u, "SELECT 1 FROM commandbus.process WHERE domain = $1 AND process_id = $2::uuid", 2, params);
  cb_unit_add(u,
              "SELECT " EVENT_COLUMNS
              " FROM commandbus.process_event"
              " WHERE domain = $1 AND process_id = $2::uuid AND sequence > $3::bigint ORDER BY sequence",
              3, params);
  return found(cb_bus_run_query(rt, u, rows, err), rows, id, err);
}

int cb_process_purge(cb_runtime *rt, const char *domain, double older_than, int64_t *count, cb_err *err) {
  *count = 0;
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  if (!(older_than >= 0)) return cb_err_set(err, CB_EINVAL, "older_than must be a number of seconds >= 0");
  char secs[32];
  snprintf(secs, sizeof secs, "%.3f", older_than);
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  /* Retention's statement, for every such process at once. */
  int at = cb_retention_add_step(u, CB_RETAIN_PROCESSES, domain, NULL, secs, NULL, INT_MAX);
  rc = at < 0 ? cb_err_set(err, at, "cannot build the purge statement") : cb_runtime_exec(rt, u, err);
  if (rc == CB_OK) *count = cb_result_int(cb_unit_result(u, at), 0, 0);
  cb_unit_free(u);
  return rc;
}
