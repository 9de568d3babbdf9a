/* commandbus: retention (see retention.h). */
#include "commandbus/retention.h"

#include <stdio.h>
#include <string.h>

#include "commandbus/bus.h"
#include "commandbus/log.h"
#include "commandbus/queue.h"
#include "keyed.h"
#include "strbuf.h"

#define PURGE_STATEMENT_TIMEOUT 30 /* seconds: a batch is small, this is a safety net */

void cb_retention_counts_add(cb_retention_counts *sum, const cb_retention_counts *more) {
  sum->commands += more->commands;
  sum->audit += more->audit;
  sum->archive += more->archive;
  sum->batches += more->batches;
  sum->processes += more->processes;
  sum->dedup_keys += more->dedup_keys;
  sum->schedule_runs += more->schedule_runs;
}

int64_t cb_retention_counts_total(const cb_retention_counts *c) {
  return c->commands + c->audit + c->archive + c->batches + c->processes + c->dedup_keys + c->schedule_runs;
}

const char *const cb_retention_kinds[CB_RETENTION_KINDS] = {"commands",  "audit",      "archive",      "batches",
                                                            "processes", "dedup_keys", "schedule_runs"};

void cb_retention_counts_values(const cb_retention_counts *c, int64_t out[CB_RETENTION_KINDS]) {
  const int64_t v[CB_RETENTION_KINDS] = {c->commands,  c->audit,      c->archive,      c->batches,
                                         c->processes, c->dedup_keys, c->schedule_runs};
  memcpy(out, v, sizeof v);
}

/* ---- the policy ------------------------------------------------------------------- */

int cb_retention_set(cb_runtime *rt, const char *domain, const cb_retention_policy *p, cb_err *err) {
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  const cb_retention_age *ages[] = {&p->commands, &p->archive, &p->batches, &p->processes};
  char text[4][32];
  const char *params[5] = {domain};
  for (int i = 0; i < 4; i++) {
    if (ages[i]->set && !(ages[i]->seconds < 1e12))
      return cb_err_set(err, CB_EINVAL, "a retention age must be a number of seconds");
    snprintf(text[i], sizeof text[i], "%.3f", ages[i]->seconds);
    params[i + 1] = ages[i]->set ? text[i] : NULL;
  }
  /* NULL keeps the current value; a negative age is "forever" (NULL). */
#define AGE(n, col)                                            \
  "CASE WHEN $" #n "::float8 IS NULL THEN d." col " WHEN $" #n \
  "::float8 < 0 THEN NULL"                                     \
  " ELSE make_interval(secs => $" #n "::float8) END"
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  cb_unit_add(u,
              "INSERT INTO commandbus.retention (domain, commands, archive, batches, processes)"
              " SELECT $1, " AGE(2, "commands") ", " AGE(3, "archive") ", " AGE(4, "batches") ", "
              AGE(5, "processes") " FROM commandbus.retention_of($1) d"
              " ON CONFLICT (domain) DO UPDATE SET commands = excluded.commands, archive = excluded.archive,"
              " batches = excluded.batches, processes = excluded.processes, updated_at = now()",
              5, params);
#undef AGE
  rc = cb_runtime_exec(rt, u, err);
  cb_unit_free(u);
  return rc;
}

int cb_retention_get(cb_runtime *rt, const char *domain, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  int rc = cb_domain_valid(domain, err);
  if (rc != CB_OK) return rc;
  const char *params[] = {domain};
  return cb_bus_query(rt,
                      "SELECT $1::text AS domain, extract(epoch FROM commands)::float8 AS commands,"
                      " extract(epoch FROM archive)::float8 AS archive, extract(epoch FROM batches)::float8 AS batches,"
                      " extract(epoch FROM processes)::float8 AS processes FROM commandbus.retention_of($1)",
                      1, params, rows, err);
}

/* ---- the steps -------------------------------------------------------------------- */

/* Parameters of the steps: $1 domain, $2 batch size, $3 older_than seconds
 * (NULL: the policy), and $4 statuses for the commands. */
#define CUTOFF(kind) "now() - coalesce(make_interval(secs => $3::float8), r." kind ")"
#define TERMINAL_PROCESS "('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELED')"
/* A batch has ended when it is complete with nothing left in the TSQ: one
 * complete with a member in the TSQ (COMPLETED_WITH_FAILURES) is still open,
 * a retry of that member reopens it. */
#define FINISHED_BATCH(b) \
  "(" b ".status IN ('COMPLETED', 'COMPLETED_WITH_FAILURES') AND " b ".in_troubleshooting_count = 0)"

/* Finished commands past their age, with their audit rows. A batch's
 * commands go by the batch's age once it has finished (its counts are read
 * from them, so they go with it, not before); a process's commands stay
 * while the process runs. Found from the oldest update on (the updated_at
 * index). */
static const char commands_sql[] =
    "WITH p AS MATERIALIZED (SELECT " CUTOFF("commands") " AS commands, " CUTOFF("batches") " AS batches"
    " FROM commandbus.retention_of($1) r),"
    " v AS (SELECT k.command_id FROM commandbus.command k"
    " WHERE k.updated_at < (SELECT greatest(commands, batches) FROM p) AND k.domain = $1"
    " AND k.status = ANY(coalesce($4::text[], ARRAY['COMPLETED', 'FAILED', 'CANCELED']))"
    " AND CASE WHEN k.batch_id IS NULL THEN k.updated_at < (SELECT commands FROM p)"
    " ELSE coalesce((SELECT " FINISHED_BATCH("b") " AND b.completed_at < (SELECT batches FROM p)"
    " FROM commandbus.batch b WHERE b.domain = $1 AND b.batch_id = k.batch_id),"
    " k.updated_at < (SELECT commands FROM p)) END"
    " AND NOT EXISTS (SELECT 1 FROM commandbus.process pr WHERE pr.domain = $1 AND pr.process_id = k.correlation_id"
    " AND pr.status NOT IN " TERMINAL_PROCESS ")"
    " ORDER BY k.updated_at LIMIT $2::int FOR UPDATE OF k SKIP LOCKED),"
    " d AS (DELETE FROM commandbus.command k WHERE k.domain = $1 AND k.command_id = ANY(ARRAY(SELECT command_id FROM v))"
    " RETURNING k.command_id),"
    " a AS (DELETE FROM commandbus.audit x WHERE x.command_id = ANY(ARRAY(SELECT command_id FROM d))"
    " AND x.domain = $1 RETURNING 1)"
    " SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM a)";

/* Finished batches past their age whose commands are gone, with the batch's
 * own audit rows (BATCH_STARTED, BATCH_COMPLETED). */
static const char batches_sql[] =
    "WITH v AS (SELECT b.batch_id FROM commandbus.batch b WHERE b.domain = $1 AND " FINISHED_BATCH("b")
    " AND b.completed_at < (SELECT " CUTOFF("batches") " FROM commandbus.retention_of($1) r)"
    " AND NOT EXISTS (SELECT 1 FROM commandbus.command k WHERE k.domain = $1 AND k.batch_id = b.batch_id)"
    " ORDER BY b.completed_at LIMIT $2::int FOR UPDATE SKIP LOCKED),"
    " d AS (DELETE FROM commandbus.batch b WHERE b.domain = $1 AND b.batch_id = ANY(ARRAY(SELECT batch_id FROM v))"
    " RETURNING b.batch_id),"
    " a AS (DELETE FROM commandbus.audit x WHERE x.command_id = ANY(ARRAY(SELECT batch_id FROM d))"
    " AND x.domain = $1 RETURNING 1)"
    " SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM a)";

/* Archived messages past their age, but never the one a command in the
 * troubleshooting queue would be retried with. */
static const char archive_sql[] =
    "WITH d AS (DELETE FROM pgmq.a_%s x WHERE x.msg_id = ANY(ARRAY(SELECT a.msg_id FROM pgmq.a_%s a"
    " WHERE a.archived_at < (SELECT " CUTOFF("archive") " FROM commandbus.retention_of($1) r)"
    " AND NOT EXISTS (SELECT 1 FROM commandbus.command k WHERE k.domain = $1"
    " AND k.command_id = commandbus.message_command_id(a.message) AND k.msg_id = a.msg_id"
    " AND k.status = 'IN_TROUBLESHOOTING_QUEUE')"
    " ORDER BY a.archived_at LIMIT $2::int FOR UPDATE SKIP LOCKED)) RETURNING 1)"
    " SELECT count(*) FROM d";

/* Finished processes past their age, with their events and process_audit
 * rows (neither table has a foreign key: rcmd's schema, and a cheaper
 * append). $3 NULL: the policy's age. */
static const char processes_sql[] =
    "WITH p AS (DELETE FROM commandbus.process x WHERE x.domain = $1 AND x.process_id = ANY(ARRAY("
    " SELECT process_id FROM commandbus.process WHERE domain = $1"
    " AND status IN " TERMINAL_PROCESS " AND completed_at < (SELECT " CUTOFF("processes")
    " FROM commandbus.retention_of($1) r)"
    " ORDER BY completed_at LIMIT $2::int FOR UPDATE SKIP LOCKED)) RETURNING process_id),"
    " a AS (DELETE FROM commandbus.process_audit x USING p WHERE x.domain = $1 AND x.process_id = p.process_id),"
    " e AS (DELETE FROM commandbus.process_event x USING p WHERE x.domain = $1 AND x.process_id = p.process_id)"
    " SELECT count(*) FROM p";

static const char dedup_sql[] =
    "WITH d AS (DELETE FROM commandbus.dedup x WHERE x.domain = $1 AND x.dedup_key = ANY(ARRAY("
    " SELECT dedup_key FROM commandbus.dedup WHERE domain = $1 AND expires_at < now() ORDER BY expires_at"
    " LIMIT $2::int FOR UPDATE SKIP LOCKED)) RETURNING 1)"
    " SELECT count(*) FROM d";

/* Records of sent due times, kept as long as finished commands; only those
 * before the schedule's next due time, which can never be claimed again. */
static const char schedule_runs_sql[] =
    "WITH v AS (SELECT x.name, x.due_at FROM commandbus.schedule_run x JOIN commandbus.schedule s USING (name)"
    " WHERE s.domain = $1 AND x.due_at < s.next_due_at"
    " AND x.sent_at < (SELECT " CUTOFF("commands") " FROM commandbus.retention_of($1) r)"
    " ORDER BY x.sent_at LIMIT $2::int FOR UPDATE OF x SKIP LOCKED),"
    " d AS (DELETE FROM commandbus.schedule_run x USING v WHERE x.name = v.name AND x.due_at = v.due_at RETURNING 1)"
    " SELECT count(*) FROM d";

int cb_retention_add_queues(cb_unit *u, const char *domain) {
  const char *params[] = {domain};
  return cb_unit_add(u,
                     "SELECT queue_name FROM pgmq.meta WHERE queue_name IN ($1 || '__commands', $1 || '__replies',"
                     " $1 || '__process_replies') ORDER BY queue_name",
                     1, params);
}

int cb_retention_add_step(cb_unit *u, int step, const char *domain, const char *queue, const char *older_than,
                          const char *statuses, int limit) {
  char batch[16], sql[1024];
  snprintf(batch, sizeof batch, "%d", limit);
  const char *params[] = {domain, batch, older_than, statuses};
  switch (step) {
    case CB_RETAIN_COMMANDS: return cb_unit_add(u, commands_sql, 4, params);
    case CB_RETAIN_BATCHES: return cb_unit_add(u, batches_sql, 3, params);
    case CB_RETAIN_ARCHIVE:
      if (cb_queue_name_valid(queue, NULL) != CB_OK) return CB_EINVAL;
      snprintf(sql, sizeof sql, archive_sql, queue, queue);
      return cb_unit_add(u, sql, 3, params);
    case CB_RETAIN_PROCESSES: return cb_unit_add(u, processes_sql, 3, params);
    case CB_RETAIN_DEDUP: return cb_unit_add(u, dedup_sql, 2, params);
    case CB_RETAIN_SCHEDULE_RUNS: return cb_unit_add(u, schedule_runs_sql, 3, params);
    default: return CB_EINVAL;
  }
}

int64_t cb_retention_read_step(const cb_unit *u, int index, int step, cb_retention_counts *c) {
  const cb_result *r = cb_unit_result(u, index);
  if (r == NULL || cb_result_rows(r) == 0) return 0;
  int64_t n = cb_result_int(r, 0, 0);
  switch (step) {
    case CB_RETAIN_COMMANDS:
      c->commands += n;
      c->audit += cb_result_int(r, 0, 1);
      break;
    case CB_RETAIN_BATCHES:
      c->batches += n;
      c->audit += cb_result_int(r, 0, 1);
      break;
    case CB_RETAIN_ARCHIVE: c->archive += n; break;
    case CB_RETAIN_PROCESSES: c->processes += n; break;
    case CB_RETAIN_DEDUP: c->dedup_keys += n; break;
    case CB_RETAIN_SCHEDULE_RUNS: c->schedule_runs += n; break;
  }
  return n;
}

/* ---- purge -------------------------------------------------------------------------- */

/* Runs one step in batches until a batch comes back short. */
static int purge_step(cb_runtime *rt, int step, const char *domain, const char *queue, const char *older_than,
                      const char *statuses, cb_retention_counts *removed, cb_err *err) {
  for (;;) {
    cb_unit *u = cb_unit_new();
    if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
    cb_add_keyed_begin(u, PURGE_STATEMENT_TIMEOUT);
    int at = cb_retention_add_step(u, step, domain, queue, older_than, statuses, CB_RETENTION_BATCH);
    int rc = at < 0 ? cb_err_set(err, at, "cannot build a purge statement") : cb_runtime_exec(rt, u, err);
    int64_t n = rc == CB_OK ? cb_retention_read_step(u, at, step, removed) : 0;
    cb_unit_free(u);
    if (rc != CB_OK) return rc;
    if (n < CB_RETENTION_BATCH) return CB_OK;
  }
}

/* What a purge removed (also when it stopped at a failure: its batches
 * before that are committed). */
static void log_purge(const cb_purge_spec *spec, const cb_retention_counts *c, int rc) {
  if (cb_retention_counts_total(c) == 0 && rc == CB_OK) return;
  cb_log(rc == CB_OK ? CB_LOG_INFO : CB_LOG_WARN,
         "purge of %s%s: removed %lld command(s) with %lld audit row(s), %lld archived message(s), %lld batch(es), "
         "%lld process(es), %lld dedup key(s), %lld schedule record(s)",
         spec->domain, rc == CB_OK ? "" : " (stopped by a failure)", (long long)c->commands, (long long)c->audit,
         (long long)c->archive, (long long)c->batches, (long long)c->processes, (long long)c->dedup_keys,
         (long long)c->schedule_runs);
}

int cb_retention_purge(cb_runtime *rt, const cb_purge_spec *spec, cb_retention_counts *removed, cb_err *err) {
  memset(removed, 0, sizeof *removed);
  int rc = cb_domain_valid(spec->domain, err);
  if (rc != CB_OK) return rc;
  if (!(spec->older_than >= 0 && spec->older_than < 1e12))
    return cb_err_set(err, CB_EINVAL, "older_than must be a number of seconds >= 0");
  cb_strbuf statuses = {0};
  for (size_t i = 0; i < spec->nstatuses; i++) {
    const char *s = spec->statuses[i];
    if (s == NULL || (strcmp(s, "COMPLETED") != 0 && strcmp(s, "FAILED") != 0 && strcmp(s, "CANCELED") != 0)) {
      cb_strbuf_free(&statuses);
      return cb_err_set(err, CB_EINVAL,
                        "status `%.40s` cannot be purged: only finished commands (COMPLETED, FAILED, CANCELED) are",
                        s ? s : "");
    }
    cb_strbuf_putc(&statuses, i ? ',' : '{');
    cb_strbuf_puts(&statuses, s);
  }
  if (spec->statuses) cb_strbuf_putc(&statuses, '}');
  char older[32];
  snprintf(older, sizeof older, "%.3f", spec->older_than);
  if (spec->statuses) {
    rc = statuses.failed ? cb_err_set(err, CB_ENOMEM, "out of memory")
                         : purge_step(rt, CB_RETAIN_COMMANDS, spec->domain, NULL, older,
                                      spec->nstatuses ? statuses.data : "{}", removed, err);
    cb_strbuf_free(&statuses);
    log_purge(spec, removed, rc);
    return rc;
  }
  cb_unit *queues = cb_unit_new();
  if (queues == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  cb_retention_add_queues(queues, spec->domain);
  rc = cb_runtime_exec(rt, queues, err);
  for (int step = 0; step < CB_RETAIN_STEPS && rc == CB_OK; step++) {
    if (step != CB_RETAIN_ARCHIVE) {
      rc = purge_step(rt, step, spec->domain, NULL, older, NULL, removed, err);
      continue;
    }
    const cb_result *r = cb_unit_result(queues, 0);
    for (int i = 0; i < cb_result_rows(r) && rc == CB_OK; i++)
      rc = purge_step(rt, step, spec->domain, cb_result_value(r, i, 0), older, NULL, removed, err);
  }
  cb_unit_free(queues);
  log_purge(spec, removed, rc);
  return rc;
}
