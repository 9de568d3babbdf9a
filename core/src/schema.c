/* commandbus: applies the compiled-in migrations (see schema.h).
 *
 * Migrations are idempotent (IF NOT EXISTS and the like), so that they also
 * apply on top of a schema rcmd created (docs/architecture.md). Setup reads
 * the recorded version; when migrations are missing it runs them in one
 * transaction under an advisory lock, each recorded with ON CONFLICT DO
 * NOTHING, so a second process doing the same at the same time waits for
 * the lock and then changes nothing. Pipeline mode takes one SQL
 * statement per message, so each migration file is split into statements
 * here, minding quotes, dollar quotes and comments. */
#include "commandbus/schema.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "schema_migrations.h"

#define SETUP_LOCK "SELECT pg_advisory_xact_lock(7236871001)"

int cb_schema_version(void) { return cb_migrations_count ? cb_migrations[cb_migrations_count - 1].version : 0; }

/* Length of the dollar-quote tag starting at p ("$$" or "$tag$"), or 0. */
static size_t dollar_tag(const char *p) {
  if (*p != '$') return 0;
  size_t n = 1;
  while (p[n] == '_' || (p[n] >= 'a' && p[n] <= 'z') || (p[n] >= 'A' && p[n] <= 'Z') ||
         (n > 1 && p[n] >= '0' && p[n] <= '9'))
    n++;
  return p[n] == '$' ? n + 1 : 0;
}

/* Appends each statement of sql to u. Returns CB_OK or a negative code. */
static int add_statements(cb_unit *u, const char *sql) {
  size_t len = strlen(sql);
  char *buf = malloc(len + 1);
  if (buf == NULL) return CB_ENOMEM;
  size_t out = 0;
  int meaningful = 0;
  int rc = CB_OK;
  const char *p = sql;
  while (*p && rc == CB_OK) {
    size_t tag;
    if (p[0] == '-' && p[1] == '-') { /* line comment: dropped */
      while (*p && *p != '\n') p++;
      continue;
    }
    if (p[0] == '/' && p[1] == '*') {
      const char *end = strstr(p + 2, "*/");
      p = end ? end + 2 : p + strlen(p);
      continue;
    }
    if (*p == '\'' || *p == '"') { /* quoted: copied whole ('' and "" escape) */
      char q = *p;
      buf[out++] = *p++;
      while (*p) {
        if (*p == q && p[1] == q) {
          buf[out++] = *p++;
          buf[out++] = *p++;
        } else if (*p == q) {
          buf[out++] = *p++;
          break;
        } else {
          buf[out++] = *p++;
        }
      }
      meaningful = 1;
      continue;
    }
    if ((tag = dollar_tag(p)) > 0) {
      const char *body = p + tag;
      const char *end = body;
      while (*end && strncmp(end, p, tag) != 0) end++;
      if (*end) end += tag;
      memcpy(buf + out, p, (size_t)(end - p));
      out += (size_t)(end - p);
      p = end;
      meaningful = 1;
      continue;
    }
    if (*p == ';') {
      buf[out] = '\0';
      if (meaningful && cb_unit_add_flags(u, buf, 0, NULL, CB_STMT_ONESHOT) < 0) rc = CB_ENOMEM;
      out = 0;
      meaningful = 0;
      p++;
      continue;
    }
    if (*p != ' ' && *p != '\n' && *p != '\t' && *p != '\r') meaningful = 1;
    buf[out++] = *p++;
  }
  buf[out] = '\0';
  if (rc == CB_OK && meaningful && cb_unit_add_flags(u, buf, 0, NULL, CB_STMT_ONESHOT) < 0) rc = CB_ENOMEM;
  free(buf);
  return rc;
}

/* Marks in `applied[i]` each compiled-in migration the database has recorded.
 * Every unrecorded migration is applied, not only those above the highest
 * recorded version: migrations written on parallel branches may be recorded
 * out of order, and each is idempotent. */
static int recorded_versions(cb_runtime *rt, char *applied, int *missing, cb_err *err) {
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  memset(applied, 0, (size_t)cb_migrations_count);
  *missing = cb_migrations_count;
  cb_unit_add(u, "SELECT to_regclass('commandbus.schema_migrations') IS NOT NULL", 0, NULL);
  int rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_OK && cb_result_value(cb_unit_result(u, 0), 0, 0)[0] == 't') {
    cb_unit_reset(u);
    cb_unit_add(u, "SELECT version FROM commandbus.schema_migrations", 0, NULL);
    rc = cb_runtime_exec(rt, u, err);
    const cb_result *r = cb_unit_result(u, 0);
    for (int row = 0; rc == CB_OK && row < cb_result_rows(r); row++) {
      int version = (int)cb_result_int(r, row, 0);
      for (int i = 0; i < cb_migrations_count; i++)
        if (cb_migrations[i].version == version && !applied[i]) {
          applied[i] = 1;
          (*missing)--;
        }
    }
  }
  cb_unit_free(u);
  return rc;
}

int cb_schema_setup(cb_runtime *rt, int *applied, cb_err *err) {
  if (applied) *applied = 0;
  char *applied_before = malloc((size_t)cb_migrations_count + 1);
  if (applied_before == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  int missing = 0;
  int rc = recorded_versions(rt, applied_before, &missing, err);
  if (rc != CB_OK || missing == 0) {
    free(applied_before);
    return rc;
  }

  cb_unit *u = cb_unit_new();
  if (u == NULL) {
    free(applied_before);
    return cb_err_set(err, CB_ENOMEM, "out of memory");
  }
  cb_unit_add_flags(u, SETUP_LOCK, 0, NULL, CB_STMT_ONESHOT);
  cb_unit_add_flags(u, "CREATE SCHEMA IF NOT EXISTS commandbus", 0, NULL, CB_STMT_ONESHOT);
  cb_unit_add_flags(u,
                    "CREATE TABLE IF NOT EXISTS commandbus.schema_migrations ("
                    "version integer PRIMARY KEY, name text NOT NULL, "
                    "applied_at timestamptz NOT NULL DEFAULT now())",
                    0, NULL, CB_STMT_ONESHOT);
  int count = 0;
  for (int i = 0; rc == CB_OK && i < cb_migrations_count; i++) {
    const cb_migration *m = &cb_migrations[i];
    if (applied_before[i]) continue;
    rc = add_statements(u, m->sql);
    char version[16];
    snprintf(version, sizeof version, "%d", m->version);
    const char *params[] = {version, m->name};
    if (rc == CB_OK &&
        cb_unit_add_flags(u,
                          "INSERT INTO commandbus.schema_migrations (version, name) VALUES ($1::int, $2) "
                          "ON CONFLICT (version) DO NOTHING",
                          2, params, CB_STMT_ONESHOT) < 0)
      rc = CB_ENOMEM;
    count++;
  }
  free(applied_before);
  if (rc != CB_OK) {
    cb_unit_free(u);
    return cb_err_set(err, rc, "out of memory");
  }
  rc = cb_runtime_exec(rt, u, err);
  cb_unit_free(u);
  if (rc == CB_OK && applied) *applied = count;
  return rc;
}
