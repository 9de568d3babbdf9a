/* commandbus: schedules (see schedule.h). The cron expression is parsed here
 * into the lists of values it allows; the due times are computed in
 * PostgreSQL from those lists (commandbus.schedule_times), in the schedule's
 * time zone, so that every worker computes the same times. */
#include "commandbus/schedule.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commandbus/bus.h"

/* ---- cron ----------------------------------------------------------------------- */

typedef struct cron_field {
  const char *what;
  int min, max;
  const char *const *names; /* three-letter names of min, min+1, ... or NULL */
} cron_field;

static const char *const month_names[] = {"jan", "feb", "mar", "apr", "may", "jun", "jul",
                                          "aug", "sep", "oct", "nov", "dec", NULL};
static const char *const day_names[] = {"sun", "mon", "tue", "wed", "thu", "fri", "sat", NULL};

static const cron_field fields[5] = {
    {"minute", 0, 59, NULL},          {"hour", 0, 23, NULL},
    {"day of month", 1, 31, NULL},    {"month", 1, 12, month_names},
    {"day of week", 0, 7, day_names}, /* 7 is Sunday too */
};

/* Reads a number or a name at *p; advances *p. 0 when there is neither. */
static int read_value(const char **p, const cron_field *f, int *out) {
  const char *s = *p;
  if (isdigit((unsigned char)*s)) {
    long v = 0;
    while (isdigit((unsigned char)*s) && v < 1000) v = v * 10 + (*s++ - '0');
    *out = (int)v;
    *p = s;
    return 1;
  }
  if (f->names && isalpha((unsigned char)s[0]) && isalpha((unsigned char)s[1]) && isalpha((unsigned char)s[2])) {
    for (int i = 0; f->names[i]; i++) {
      if (tolower((unsigned char)s[0]) == f->names[i][0] && tolower((unsigned char)s[1]) == f->names[i][1] &&
          tolower((unsigned char)s[2]) == f->names[i][2]) {
        *out = f->min + i;
        *p = s + 3;
        return 1;
      }
    }
  }
  return 0;
}

/* One field: a comma-separated list of `*`, `v`, `a-b`, each with an
 * optional `/step` (`v/step` runs from v to the field's maximum). */
static int parse_field(const char *text, const cron_field *f, uint64_t *bits, cb_err *err) {
  *bits = 0;
  const char *p = text;
  for (;;) {
    int lo, hi, step = 1, single = 0;
    if (*p == '*') {
      lo = f->min;
      hi = f->max;
      p++;
    } else {
      if (!read_value(&p, f, &lo)) return cb_err_set(err, CB_EINVAL, "%s field `%s`: a number expected", f->what, text);
      hi = lo;
      single = 1;
      if (*p == '-') {
        p++;
        if (!read_value(&p, f, &hi))
          return cb_err_set(err, CB_EINVAL, "%s field `%s`: a number expected after -", f->what, text);
        single = 0;
      }
    }
    if (*p == '/') {
      p++;
      if (!isdigit((unsigned char)*p) || !read_value(&p, &fields[0], &step) || step < 1)
        return cb_err_set(err, CB_EINVAL, "%s field `%s`: a step of at least 1 expected after /", f->what, text);
      if (single) hi = f->max;
    }
    if (lo < f->min || hi > f->max || lo > hi)
      return cb_err_set(err, CB_EINVAL, "%s field `%s`: values must lie in %d-%d, low before high", f->what, text,
                        f->min, f->max);
    for (int v = lo; v <= hi; v += step) *bits |= 1ULL << v;
    if (*p == '\0') break;
    if (*p != ',') return cb_err_set(err, CB_EINVAL, "%s field `%s`: unexpected `%c`", f->what, text, *p);
    p++;
  }
  return CB_OK;
}

static const char *expand_shorthand(const char *text) {
  static const char *const table[][2] = {
      {"@yearly", "0 0 1 1 *"}, {"@annually", "0 0 1 1 *"}, {"@monthly", "0 0 1 * *"}, {"@weekly", "0 0 * * 0"},
      {"@daily", "0 0 * * *"},  {"@midnight", "0 0 * * *"}, {"@hourly", "0 * * * *"},
  };
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
    if (strcmp(text, table[i][0]) == 0) return table[i][1];
  return text;
}

int cb_cron_parse(const char *text, cb_cron *out, cb_err *err) {
  memset(out, 0, sizeof *out);
  if (text == NULL) return cb_err_set(err, CB_EINVAL, "cron expression expected, got nothing");
  const char *expr = expand_shorthand(text);
  char copy[256], *tokens[6];
  if (strlen(expr) >= sizeof copy) return cb_err_set(err, CB_EINVAL, "cron expression is too long");
  snprintf(copy, sizeof copy, "%s", expr);
  int n = 0;
  for (char *save = NULL, *t = strtok_r(copy, " \t", &save); t; t = strtok_r(NULL, " \t", &save)) {
    if (n == 5) {
      n++;
      break;
    }
    tokens[n++] = t;
  }
  if (n != 5)
    return cb_err_set(err, CB_EINVAL, "cron `%.100s`: 5 fields expected (minute hour day-of-month month day-of-week)",
                      text);
  uint64_t bits[5];
  for (int i = 0; i < 5; i++) {
    cb_err why;
    if (parse_field(tokens[i], &fields[i], &bits[i], &why) != CB_OK)
      return cb_err_set(err, CB_EINVAL, "cron `%.100s`: %s", text, why.message);
  }
  out->minutes = bits[0];
  out->hours = (uint32_t)bits[1];
  out->days = (uint32_t)bits[2];
  out->months = (uint16_t)bits[3];
  out->weekdays = (uint8_t)((bits[4] | (bits[4] >> 7)) & 0x7f); /* 7 is Sunday */
  out->days_restricted = tokens[2][0] != '*';
  out->weekdays_restricted = tokens[4][0] != '*';
  return CB_OK;
}

/* The set bits of a field as a PostgreSQL array literal: "{0,15,30,45}". */
static void bits_array(char *out, size_t len, uint64_t bits, int min, int max) {
  size_t n = (size_t)snprintf(out, len, "{");
  for (int v = min; v <= max && n < len; v++)
    if (bits & (1ULL << v)) n += (size_t)snprintf(out + n, len - n, "%s%d", n > 1 ? "," : "", v);
  if (n < len) snprintf(out + n, len - n, "}");
}

/* ---- the API ------------------------------------------------------------------------ */

#define SCHEDULE_COLUMNS                                                                                         \
  "name, domain, command_type AS type, data, priority, cron, every_seconds AS every, timezone, missed, "         \
  "paused, next_due_at::text AS next_due_at, last_due_at::text AS last_due_at, created_at::text AS created_at, " \
  "updated_at::text AS updated_at"

static int check_name(const char *name, cb_err *err) {
  if (name == NULL || name[0] == '\0' || strlen(name) > CB_SCHEDULE_NAME_MAX)
    return cb_err_set(err, CB_EINVAL, "a schedule name of 1 to %d bytes expected", CB_SCHEDULE_NAME_MAX);
  return CB_OK;
}

static int check_spec(const cb_schedule_spec *s, cb_cron *cron, cb_err *err) {
  int rc = check_name(s->name, err);
  if (rc == CB_OK) rc = cb_domain_valid(s->domain, err);
  if (rc != CB_OK) return rc;
  if (s->command_type == NULL || s->command_type[0] == '\0') return cb_err_set(err, CB_EINVAL, "type is required");
  if ((s->cron != NULL) == (s->every > 0))
    return cb_err_set(err, CB_EINVAL, "a schedule needs either cron or every (seconds), not both");
  if (s->cron == NULL && !(s->every < 1e9)) return cb_err_set(err, CB_EINVAL, "every must be a number of seconds");
  if (s->priority < CB_PRIORITY_MIN || s->priority > CB_PRIORITY_MAX)
    return cb_err_set(err, CB_EINVAL, "priority %d is outside %d..%d", s->priority, CB_PRIORITY_MIN, CB_PRIORITY_MAX);
  return s->cron ? cb_cron_parse(s->cron, cron, err) : CB_OK;
}

int cb_schedule_set(cb_runtime *rt, const cb_schedule_spec *s, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  cb_cron cron = {0}; /* all clear for a schedule by `every` */
  int rc = check_spec(s, &cron, err);
  if (rc != CB_OK) return rc;
  char priority[16], every[32], lists[5][200];
  snprintf(priority, sizeof priority, "%d", s->priority);
  snprintf(every, sizeof every, "%.6f", s->every);
  bits_array(lists[0], sizeof lists[0], cron.minutes, 0, 59);
  bits_array(lists[1], sizeof lists[1], cron.hours, 0, 23);
  bits_array(lists[2], sizeof lists[2], cron.days, 1, 31);
  bits_array(lists[3], sizeof lists[3], cron.months, 1, 12);
  bits_array(lists[4], sizeof lists[4], cron.weekdays, 0, 6);
  const char *tz = s->timezone ? s->timezone : "UTC";
  const char *params[] = {s->name,
                          s->domain,
                          s->command_type,
                          s->data_json,
                          priority,
                          s->cron,
                          s->cron ? NULL : every,
                          tz,
                          s->cron ? lists[0] : NULL,
                          s->cron ? lists[1] : NULL,
                          s->cron ? lists[2] : NULL,
                          s->cron ? lists[3] : NULL,
                          s->cron ? lists[4] : NULL,
                          cron.days_restricted ? "true" : "false",
                          cron.weekdays_restricted ? "true" : "false",
                          s->catch_up ? "catch_up" : "skip"};
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *tz_param[] = {tz};
  cb_unit_add(u, "SELECT now() AT TIME ZONE $1", 1, tz_param); /* an unknown zone fails here (22023) */
  /* A replacement with the same timing keeps its next due time (and its
   * anchor), so that redefining a schedule at every deploy loses nothing. */
  cb_unit_add(u,
              "INSERT INTO commandbus.schedule AS s (name, domain, command_type, data, priority, cron, every_seconds,"
              " timezone, minutes, hours, days, months, weekdays, days_restricted, weekdays_restricted, missed,"
              " next_due_at) VALUES ($1, $2, $3, coalesce($4::jsonb, '{}'::jsonb), $5::int, $6, $7::float8, $8,"
              " $9::int[], $10::int[], $11::int[], $12::int[], $13::int[], $14::boolean, $15::boolean, $16,"
              " 'infinity') ON CONFLICT (name) DO UPDATE SET domain = excluded.domain,"
              " command_type = excluded.command_type, data = excluded.data, priority = excluded.priority,"
              " cron = excluded.cron, every_seconds = excluded.every_seconds, timezone = excluded.timezone,"
              " minutes = excluded.minutes, hours = excluded.hours, days = excluded.days, months = excluded.months,"
              " weekdays = excluded.weekdays, days_restricted = excluded.days_restricted,"
              " weekdays_restricted = excluded.weekdays_restricted, missed = excluded.missed, updated_at = now(),"
              " anchor = CASE WHEN s.every_seconds IS NOT DISTINCT FROM excluded.every_seconds THEN s.anchor"
              " ELSE now() END,"
              " next_due_at = CASE WHEN (s.cron, s.every_seconds, s.timezone) IS NOT DISTINCT FROM"
              " (excluded.cron, excluded.every_seconds, excluded.timezone) THEN s.next_due_at ELSE 'infinity' END",
              16, params);
  const char *name_param[] = {s->name};
  cb_unit_add(u,
              "UPDATE commandbus.schedule s SET next_due_at = commandbus.schedule_next(s, now())"
              " WHERE s.name = $1 AND s.next_due_at = 'infinity'",
              1, name_param);
  cb_unit_add(u, "SELECT " SCHEDULE_COLUMNS " FROM commandbus.schedule WHERE name = $1", 1, name_param);
  rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22023") == 0)
    rc = cb_err_set(err, CB_EINVAL, "unknown time zone `%.100s`", tz);
  else if (rc == CB_EDATABASE && strcmp(err->sqlstate, "23502") == 0)
    rc = cb_err_set(err, CB_EINVAL, "cron `%.100s` is never due", s->cron ? s->cron : "");
  else if (rc == CB_EDATABASE && strcmp(err->sqlstate, "22P02") == 0)
    rc = cb_err_set(err, CB_EINVAL, "invalid schedule data: %s", err->message);
  if (rc != CB_OK) {
    cb_unit_free(u);
    return rc;
  }
  *rows = u;
  return CB_OK;
}

int cb_schedule_remove(cb_runtime *rt, const char *name, int *existed, cb_err *err) {
  *existed = 0;
  int rc = check_name(name, err);
  if (rc != CB_OK) return rc;
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {name};
  int at = cb_unit_add(u,
                       "WITH s AS (DELETE FROM commandbus.schedule WHERE name = $1 RETURNING name),"
                       " r AS (DELETE FROM commandbus.schedule_run WHERE name = $1)"
                       " SELECT count(*) FROM s",
                       1, params);
  rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_OK) *existed = cb_result_int(cb_unit_result(u, at), 0, 0) > 0;
  cb_unit_free(u);
  return rc;
}

int cb_schedule_pause(cb_runtime *rt, const char *name, int paused, cb_err *err) {
  int rc = check_name(name, err);
  if (rc != CB_OK) return rc;
  cb_unit *u = cb_unit_new();
  if (u == NULL) return cb_err_set(err, CB_ENOMEM, "out of memory");
  const char *params[] = {name, paused ? "true" : "false"};
  int at = cb_unit_add(u,
                       "UPDATE commandbus.schedule SET paused = $2::boolean, updated_at = now() WHERE name = $1"
                       " RETURNING name",
                       2, params);
  rc = cb_runtime_exec(rt, u, err);
  if (rc == CB_OK && cb_result_rows(cb_unit_result(u, at)) == 0)
    rc = cb_err_set(err, CB_ENOTFOUND, "unknown schedule `%.200s`", name);
  cb_unit_free(u);
  return rc;
}

int cb_schedule_list(cb_runtime *rt, const char *domain, cb_unit **rows, cb_err *err) {
  *rows = NULL;
  if (domain) {
    int rc = cb_domain_valid(domain, err);
    if (rc != CB_OK) return rc;
  }
  const char *params[] = {domain};
  return cb_bus_query(rt,
                      "SELECT " SCHEDULE_COLUMNS
                      " FROM commandbus.schedule WHERE $1::text IS NULL OR domain = $1"
                      " ORDER BY name",
                      1, params, rows, err);
}

/* ---- the pass ------------------------------------------------------------------------ */

#define PASS_SCHEDULES "20" /* schedules per pass; more wait for the next one */

int cb_schedule_add_pass(cb_unit *u, const char *domain) {
  /* Due schedules are locked (SKIP LOCKED: a schedule another worker is
   * sending is left to it), their due times claimed in schedule_run (the
   * key admits each once), their next due time moved past what was
   * claimed, and one command per claimed time sent, all in this
   * statement's transaction: a worker that dies before its commit leaves
   * the due times to the next one. catch_up sends at most 100 per pass;
   * then the next due time is the one after the last sent, still due. */
  static const char prefix[] =
      " s AS (SELECT * FROM commandbus.schedule WHERE domain = $2 AND NOT paused AND next_due_at <= now()"
      " ORDER BY next_due_at LIMIT $1::int FOR UPDATE SKIP LOCKED),"
      " due AS (SELECT s.name, t.due_at FROM s CROSS JOIN LATERAL commandbus.schedule_due(s, now()) AS t(due_at)),"
      " claimed AS (INSERT INTO commandbus.schedule_run (name, due_at, command_id)"
      " SELECT name, due_at, gen_random_uuid() FROM due ON CONFLICT DO NOTHING RETURNING name, due_at, command_id),"
      " advanced AS (UPDATE commandbus.schedule x SET updated_at = now(),"
      " last_due_at = greatest(x.last_due_at, d.last),"
      " next_due_at = coalesce(commandbus.schedule_next(x, CASE WHEN x.missed = 'catch_up' AND d.n >= 100"
      " THEN d.last ELSE greatest(now(), d.last) END), 'infinity')"
      " FROM s LEFT JOIN (SELECT name, max(due_at) AS last, count(*) AS n FROM due GROUP BY name) d USING (name)"
      " WHERE x.name = s.name),";
  char source[512];
  snprintf(source, sizeof source,
           "(SELECT jsonb_build_object('id', c.command_id, 'corr', gen_random_uuid(), 'type', s.command_type,"
           " 'data', s.data, 'max', %d, 'prio', s.priority), row_number() OVER (ORDER BY c.due_at, c.name)"
           " FROM claimed c JOIN s USING (name))",
           CB_DEFAULT_MAX_ATTEMPTS);
  const char *params[] = {PASS_SCHEDULES, domain, "0"};
  return cb_bus_add_send_from(u, domain, prefix, source, 3, params);
}
