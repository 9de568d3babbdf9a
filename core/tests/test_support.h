/* Shared by the C tests that need PostgreSQL: the DSN of the database the
 * test command started (DATABASE_URL). A missing DATABASE_URL fails the test
 * instead of skipping it, so a misconfigured run cannot pass silently. */
#ifndef COMMANDBUS_TEST_SUPPORT_H
#define COMMANDBUS_TEST_SUPPORT_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commandbus/runtime.h"

static inline const char *test_dsn(void) {
  const char *dsn = getenv("DATABASE_URL");
  if (dsn == NULL || *dsn == '\0') {
    fprintf(stderr, "DATABASE_URL is not set: run the tests with `make test`\n");
    exit(2);
  }
  return dsn;
}

static inline cb_runtime *test_runtime(int pool) {
  cb_runtime_options o = {0};
  o.conninfo = test_dsn();
  o.pool_size = pool;
  cb_runtime *rt = NULL;
  cb_err err;
  if (cb_runtime_new(&o, &rt, &err) != CB_OK) {
    fprintf(stderr, "cannot connect: %s: %s\n", cb_strerror(err.code), err.message);
    exit(2);
  }
  return rt;
}

/* A name unique to this process (tests of one binary run in parallel under
 * plain, sanitizer and valgrind builds): prefix + "_" + pid. */
static inline const char *test_name(const char *prefix) {
  static char names[8][64];
  static int next;
  char *s = names[next++ % 8];
  snprintf(s, 64, "%s_%d", prefix, (int)getpid());
  return s;
}

/* Runs one SQL statement without parameters; returns the unit (caller frees). */
static inline cb_unit *test_sql(cb_runtime *rt, const char *sql) {
  cb_unit *u = cb_unit_new();
  cb_unit_add_flags(u, sql, 0, NULL, CB_STMT_ONESHOT);
  cb_err err;
  cb_runtime_exec(rt, u, &err);
  return u;
}

#endif
