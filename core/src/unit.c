/* commandbus: units of work and their results (see unit.h). */
#include "unit_internal.h"

#include <stdlib.h>
#include <string.h>

#include "commandbus/error.h"
#include "strbuf.h"

cb_unit *cb_unit_new(void) { return calloc(1, sizeof(cb_unit)); }

static void clear_results(cb_unit *u) {
  for (int i = 0; i < u->nstmts; i++) {
    if (u->results && u->results[i]) {
      PQclear(u->results[i]);
      u->results[i] = NULL;
    }
  }
}

void cb_unit_reset(cb_unit *u) {
  clear_results(u);
  u->nstmts = 0;
  u->nparam_offsets = 0;
  u->arena_len = 0;
  u->broken = 0;
  u->status = CB_OK;
  cb_err_clear(&u->err);
  u->next = NULL;
  u->group_end = 0;
  u->to_listener = 0;
  u->copy_source = NULL;
  u->copy_arg = NULL;
}

void cb_unit_free(cb_unit *u) {
  if (u == NULL) return;
  clear_results(u);
  free(u->stmts);
  free(u->param_offsets);
  free(u->arena);
  free(u->results);
  free(u);
}

/* A new arena's first size: a unit's parameters are often a few hundred
 * bytes, which cb_grow's doubling from 8 would reach in five reallocs. */
#define ARENA_FIRST 512

static size_t arena_put(cb_unit *u, const char *s) {
  size_t len = strlen(s) + 1, need = u->arena_len + len;
  if (u->arena_cap == 0 && need < ARENA_FIRST) need = ARENA_FIRST;
  if (cb_grow((void **)&u->arena, &u->arena_cap, need, 1) < 0) return PARAM_NULL;
  size_t off = u->arena_len;
  memcpy(u->arena + off, s, len);
  u->arena_len += len;
  return off;
}

/* Room for one more statement and its parameters. */
static int reserve(cb_unit *u, int nparams) {
  size_t scap = (size_t)u->stmts_cap, rcap = (size_t)u->results_cap;
  if (cb_grow((void **)&u->stmts, &scap, (size_t)u->nstmts + 1, sizeof *u->stmts) < 0) return -1;
  u->stmts_cap = (int)scap;
  if (cb_grow((void **)&u->results, &rcap, (size_t)u->nstmts + 1, sizeof *u->results) < 0) return -1;
  for (size_t i = (size_t)u->results_cap; i < rcap; i++) u->results[i] = NULL;
  u->results_cap = (int)rcap;
  return cb_grow((void **)&u->param_offsets, &u->param_offsets_cap, u->nparam_offsets + (size_t)nparams,
                 sizeof *u->param_offsets);
}

/* The unit takes nothing more and will fail with code (its message in
 * u->err, already set) when it runs. */
static int break_unit(cb_unit *u, int code) {
  u->broken = code;
  u->status = code;
  return code;
}

static int add_stmt(cb_unit *u, const char *sql, const char *kept, uint64_t hash, int nparams,
                    const char *const *params, int flags) {
  if (u->broken) return u->broken;
  if (sql == NULL)
    return break_unit(u, cb_err_set(&u->err, CB_EINVAL, "statement %d of a unit has no SQL text", u->nstmts + 1));
  if (nparams < 0 || nparams > CB_UNIT_MAX_PARAMS || (nparams > 0 && params == NULL))
    return break_unit(
        u,
        cb_err_set(&u->err, CB_EINVAL, "statement %d of a unit has %d parameters%s; a statement takes 0 to %d",
                   u->nstmts + 1, nparams, nparams > 0 && params == NULL ? " and no values" : "", CB_UNIT_MAX_PARAMS));
  /* What a failure below must take back: nothing of it may stay. */
  size_t arena_len = u->arena_len, nparam_offsets = u->nparam_offsets;
  int ok = reserve(u, nparams) == 0;
  unit_stmt *s = ok ? &u->stmts[u->nstmts] : NULL;
  if (ok && kept) {
    s->sql = 0;
  } else if (ok) {
    s->sql = arena_put(u, sql);
    ok = s->sql != PARAM_NULL;
  }
  for (int i = 0; ok && i < nparams; i++) {
    size_t off = PARAM_NULL;
    if (params[i] != NULL && (off = arena_put(u, params[i])) == PARAM_NULL) ok = 0;
    else u->param_offsets[u->nparam_offsets++] = off;
  }
  if (!ok) {
    u->arena_len = arena_len;
    u->nparam_offsets = nparam_offsets;
    return break_unit(u, cb_err_set(&u->err, CB_ENOMEM, "out of memory adding statement %d of a unit", u->nstmts + 1));
  }
  s->kept = kept;
  s->hash = hash;
  s->params = nparam_offsets;
  s->nparams = nparams;
  s->flags = flags;
  u->results[u->nstmts] = NULL;
  return u->nstmts++;
}

int cb_unit_add_flags(cb_unit *u, const char *sql, int nparams, const char *const *params, int flags) {
  return add_stmt(u, sql, NULL, 0, nparams, params, flags);
}

int cb__unit_add_kept(cb_unit *u, const char *sql, uint64_t hash, int nparams, const char *const *params) {
  return add_stmt(u, sql, sql, hash, nparams, params, 0);
}

int cb_unit_add(cb_unit *u, const char *sql, int nparams, const char *const *params) {
  return cb_unit_add_flags(u, sql, nparams, params, 0);
}

int cb_unit_append(cb_unit *dst, const cb_unit *src) {
  if (src->broken) {
    if (!dst->broken) {
      dst->err = src->err;
      break_unit(dst, src->broken);
    }
    return src->broken;
  }
  for (int i = 0; i < src->nstmts; i++) {
    const unit_stmt *s = &src->stmts[i];
    const char *params[CB_UNIT_MAX_PARAMS];
    for (int p = 0; p < s->nparams; p++) {
      size_t off = src->param_offsets[s->params + (size_t)p];
      params[p] = off == PARAM_NULL ? NULL : src->arena + off;
    }
    int rc = add_stmt(dst, cb__stmt_sql(src, s), NULL, s->hash, s->nparams, params, s->flags);
    if (rc < 0) return rc;
  }
  return CB_OK;
}

int cb_unit_count(const cb_unit *u) { return u->nstmts; }
int cb_unit_status(const cb_unit *u) { return u->status; }
const cb_err *cb_unit_error(const cb_unit *u) { return &u->err; }

const cb_result *cb_unit_result(const cb_unit *u, int i) {
  if (i < 0 || i >= u->nstmts) return NULL;
  return u->results[i];
}

void cb__unit_copy_source(cb_unit *u, cb__copy_source source, void *arg) {
  u->copy_source = source;
  u->copy_arg = arg;
}

void cb_unit_on_done(cb_unit *u, cb_unit_done done, void *arg) {
  u->done = done;
  u->done_arg = arg;
}

void cb__unit_complete(cb_unit *u, int status, const cb_err *err) {
  if (status != CB_OK && u->status == CB_OK) {
    u->status = status;
    if (err) u->err = *err;
    else cb_err_set(&u->err, status, "%s", cb_strerror(status));
  }
  u->next = NULL;
  if (u->done) u->done(u, u->done_arg);
}

/* ---- results ------------------------------------------------------------ */

int cb_result_rows(const cb_result *r) { return r ? PQntuples(r) : 0; }
int cb_result_columns(const cb_result *r) { return r ? PQnfields(r) : 0; }
const char *cb_result_value(const cb_result *r, int row, int col) { return PQgetvalue(r, row, col); }
int cb_result_is_null(const cb_result *r, int row, int col) { return PQgetisnull(r, row, col); }
/* PostgreSQL writes an integer as an optional '-' and digits: up to 18 of
 * them cannot overflow, and are read here in a loop; anything else (more
 * digits, NULL's "") goes to strtoll. A worker reads several a command. */
int64_t cb_result_int(const cb_result *r, int row, int col) {
  const char *s = PQgetvalue(r, row, col);
  const char *p = s + (*s == '-');
  int64_t v = 0;
  int n = 0;
  for (; p[n] >= '0' && p[n] <= '9'; n++) {
    if (n == 18) return strtoll(s, NULL, 10);
    v = v * 10 + (p[n] - '0');
  }
  if (n == 0 || p[n] != '\0') return strtoll(s, NULL, 10);
  return *s == '-' ? -v : v;
}
int64_t cb_result_affected(const cb_result *r) {
  const char *s = r ? PQcmdTuples((PGresult *)r) : "";
  return *s ? strtoll(s, NULL, 10) : 0;
}

void *cb_result_pack(const cb_result *r, int row, size_t size, const int *cols, const size_t *offsets, int n) {
  size_t len = size;
  for (int i = 0; i < n; i++) len += strlen(cb_result_value(r, row, cols[i])) + 1;
  char *record = calloc(1, len);
  if (record == NULL) return NULL;
  char *p = record + size;
  for (int i = 0; i < n; i++) {
    const char *v = cb_result_value(r, row, cols[i]);
    size_t vlen = strlen(v) + 1;
    memcpy(p, v, vlen);
    *(const char **)(record + offsets[i]) = cb_result_is_null(r, row, cols[i]) ? NULL : p;
    p += vlen;
  }
  return record;
}

const char *cb_result_column_name(const cb_result *r, int col) { return PQfname(r, col); }

int cb_result_column_kind(const cb_result *r, int col) {
  switch (PQftype(r, col)) {
    case 20:
    case 21:
    case 23:
    case 26: return CB_COL_INT; /* int8, int2, int4, oid */
    case 700:
    case 701:
    case 1700: return CB_COL_FLOAT; /* float4, float8, numeric */
    case 16: return CB_COL_BOOL;
    case 114:
    case 3802: return CB_COL_JSON; /* json, jsonb */
    default: return CB_COL_TEXT;
  }
}
