/* commandbus Lua binding: the bus's methods for a bus that lives for months:
 * schedules, retention and purges, and limits per command type. Wrong types
 * raise; values the core refuses come back as nil, err. */
#include <string.h>

#include "binding.h"
#include "commandbus/bus.h"
#include "commandbus/limits.h"
#include "commandbus/retention.h"
#include "commandbus/schedule.h"

/* A required number field (a wrong type raises; nil raises too). */
static int need_number(lua_State *L, int idx, const char *name, double min, double max, double *out) {
  lua_getfield(L, idx, name);
  int type = lua_type(L, -1);
  lua_pop(L, 1);
  if (type != LUA_TNUMBER) luaL_error(L, "bad option '%s': number expected, got %s", name, lua_typename(L, type));
  return cbL_opt_number(L, idx, name, 0, min, max, out);
}

/* ---- schedules ------------------------------------------------------------------- */

/* bus:schedule{name=, domain=, type=, data=, cron= | every=seconds,
 *              timezone="UTC", missed="skip"|"catch_up", priority=0}
 * -> the schedule | nil, err */
static int l_schedule(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  cb_schedule_spec s;
  memset(&s, 0, sizeof s);
  const char *missed;
  if (!cbL_field_text(L, 2, "name", &s.name) || !cbL_field_text(L, 2, "domain", &s.domain) ||
      !cbL_field_text(L, 2, "type", &s.command_type) || !cbL_opt_text(L, 2, "cron", NULL, &s.cron) ||
      !cbL_opt_number(L, 2, "every", 0, 1, CBL_DELAY_MAX, &s.every) ||
      !cbL_opt_text(L, 2, "timezone", "UTC", &s.timezone) || !cbL_opt_text(L, 2, "missed", "skip", &missed) ||
      !cbL_opt_int(L, 2, "priority", 0, CB_PRIORITY_MIN, CB_PRIORITY_MAX, &s.priority) ||
      !cbL_opt_json(L, 2, "data", &s.data_json))
    return 2;
  if (s.data_json && !cbL_json_is_object(s.data_json)) luaL_error(L, "bad option 'data': " CBL_DATA_NOT_OBJECT);
  if ((s.cron == NULL) == (s.every == 0))
    luaL_error(L, "bad schedule: either cron (a string) or every (seconds) expected");
  if (strcmp(missed, "skip") != 0 && strcmp(missed, "catch_up") != 0)
    return cbL_pusherrorcode(L, CB_EINVAL, "option 'missed' is `%s`; \"skip\" or \"catch_up\" expected", missed);
  s.catch_up = strcmp(missed, "catch_up") == 0;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_schedule_set(rt, &s, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* bus:unschedule(name) -> true (it existed) | false | nil, err */
static int l_unschedule(lua_State *L) {
  cbL_checkbus(L, 1);
  const char *name;
  if (!cbL_arg_text(L, 2, "name", &name)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  int existed;
  cb_err err;
  if (cb_schedule_remove(rt, name, &existed, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, existed);
  return 1;
}

static int pause_or_resume(lua_State *L, int paused) {
  cbL_checkbus(L, 1);
  const char *name;
  if (!cbL_arg_text(L, 2, "name", &name)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_err err;
  if (cb_schedule_pause(rt, name, paused, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* bus:pause_schedule(name), bus:resume_schedule(name) -> true | nil, err (NOT_FOUND) */
static int l_pause_schedule(lua_State *L) { return pause_or_resume(L, 1); }
static int l_resume_schedule(lua_State *L) { return pause_or_resume(L, 0); }

/* bus:list_schedules([{domain=}]) -> {schedule, ...} */
static int l_list_schedules(lua_State *L) {
  cbL_checkbus(L, 1);
  cbL_opt_table(L, 2);
  const char *domain;
  if (!cbL_opt_text(L, 2, "domain", NULL, &domain)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_schedule_list(rt, domain, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* ---- retention ---------------------------------------------------------------------- */

/* {commands=, audit=, archive=, batches=, processes=, dedup_keys=, schedule_runs=} */
static void push_counts(lua_State *L, const cb_retention_counts *c) {
  int64_t values[CB_RETENTION_KINDS];
  cb_retention_counts_values(c, values);
  lua_createtable(L, 0, CB_RETENTION_KINDS + 2);
  for (int k = 0; k < CB_RETENTION_KINDS; k++) {
    cbL_pushint64(L, values[k]);
    lua_setfield(L, -2, cb_retention_kinds[k]);
  }
}

void cbL_push_upkeep_stats(lua_State *L, const cb_upkeep_stats *s) {
  push_counts(L, &s->removed);
  cbL_pushint64(L, (int64_t)s->retention_passes);
  lua_setfield(L, -2, "passes");
  if (s->last_retention_at > 0) {
    lua_pushnumber(L, s->last_retention_at);
    lua_setfield(L, -2, "last_pass_at");
  }
}

/* bus:purge{domain=, older_than=seconds, statuses={...}} -> counts | nil, err */
static int l_purge(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  cb_purge_spec spec;
  memset(&spec, 0, sizeof spec);
  if (!cbL_field_text(L, 2, "domain", &spec.domain) ||
      !need_number(L, 2, "older_than", 0, CBL_AGE_MAX, &spec.older_than))
    return 2;
  lua_getfield(L, 2, "statuses");
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TTABLE)
      luaL_error(L, "bad option 'statuses': list of statuses expected, got %s", luaL_typename(L, -1));
    size_t n = lua_rawlen(L, -1);
    const char **statuses = lua_newuserdata(L, (n ? n : 1) * sizeof *statuses);
    for (size_t i = 0; i < n; i++) {
      lua_rawgeti(L, -2, (int)i + 1);
      if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "bad option 'statuses': strings expected, got %s", luaL_typename(L, -1));
      size_t len;
      statuses[i] = lua_tolstring(L, -1, &len);
      if (strlen(statuses[i]) != len) /* read whole: "COMPLETED\0..." is not COMPLETED */
        return cbL_pusherrorcode(L, CB_EINVAL, "option 'statuses' holds a string with a NUL byte (status #%d)",
                                 (int)i + 1);
      lua_pop(L, 1); /* still referenced by the list */
    }
    spec.statuses = statuses;
    spec.nstatuses = n;
  }
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_retention_counts removed;
  cb_err err;
  if (cb_retention_purge(rt, &spec, &removed, &err) != CB_OK) return cbL_pusherror(L, &err);
  push_counts(L, &removed);
  return 1;
}

/* bus:set_retention{domain=, commands=, archive=, batches=, processes=}: each
 * a number of seconds, or false to keep forever; absent ones keep their
 * value. -> true | nil, err */
static int l_set_retention(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  const char *domain;
  if (!cbL_field_text(L, 2, "domain", &domain)) return 2;
  cb_retention_policy p;
  memset(&p, 0, sizeof p);
  const struct {
    const char *name;
    cb_retention_age *age;
  } fields[] = {
      {"commands", &p.commands}, {"archive", &p.archive}, {"batches", &p.batches}, {"processes", &p.processes}};
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    lua_getfield(L, 2, fields[i].name);
    int type = lua_type(L, -1), forever = type == LUA_TBOOLEAN && !lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (type == LUA_TNIL) continue;
    if (type != LUA_TNUMBER && !forever)
      luaL_error(L, "bad option '%s': seconds or false expected, got %s", fields[i].name, lua_typename(L, type));
    fields[i].age->set = 1;
    fields[i].age->seconds = -1;
    if (!forever && !cbL_opt_number(L, 2, fields[i].name, 0, 0, CBL_AGE_MAX, &fields[i].age->seconds)) return 2;
  }
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_err err;
  if (cb_retention_set(rt, domain, &p, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* bus:retention(domain) -> {domain=, commands=, archive=, batches=,
 * processes=}: seconds, or false for forever */
static int l_retention(lua_State *L) {
  cbL_checkbus(L, 1);
  const char *domain;
  if (!cbL_arg_text(L, 2, "domain", &domain)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_retention_get(rt, domain, &rows, &err);
  if (rc != CB_OK) return cbL_pusherror(L, &err);
  cbL_push_row(L, cb_unit_result(rows, 0), 0);
  cb_unit_free(rows);
  static const char *const ages[] = {"commands", "archive", "batches", "processes"};
  for (int i = 0; i < 4; i++) {
    lua_getfield(L, -1, ages[i]);
    int forever = lua_isnil(L, -1);
    lua_pop(L, 1);
    if (forever) {
      lua_pushboolean(L, 0);
      lua_setfield(L, -2, ages[i]);
    }
  }
  return 1;
}

/* ---- limits ---------------------------------------------------------------------------- */

/* bus:set_limit{domain=, type=, per_second=, concurrency=}: nil or 0 is no
 * limit of that kind (both: the type is no longer limited). -> true | nil, err */
static int l_set_limit(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  const char *domain, *type;
  int per_second, concurrency;
  if (!cbL_field_text(L, 2, "domain", &domain) || !cbL_field_text(L, 2, "type", &type) ||
      !cbL_opt_int(L, 2, "per_second", 0, 0, 1000000000, &per_second) ||
      !cbL_opt_int(L, 2, "concurrency", 0, 0, 1000000000, &concurrency))
    return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_err err;
  if (cb_limits_set(rt, domain, type, per_second, concurrency, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* bus:limits(domain) -> {{type=, per_second=, concurrency=, in_flight=}, ...} */
static int l_limits(lua_State *L) {
  cbL_checkbus(L, 1);
  const char *domain;
  if (!cbL_arg_text(L, 2, "domain", &domain)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_limits_list(rt, domain, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

void cbL_open_upkeep(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"schedule", l_schedule},
      {"unschedule", l_unschedule},
      {"pause_schedule", l_pause_schedule},
      {"resume_schedule", l_resume_schedule},
      {"list_schedules", l_list_schedules},
      {"purge", l_purge},
      {"set_retention", l_set_retention},
      {"retention", l_retention},
      {"set_limit", l_set_limit},
      {"limits", l_limits},
      {NULL, NULL},
  };
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_getfield(L, -1, "__index");
  for (const luaL_Reg *m = methods; m->name; m++) {
    lua_pushcfunction(L, m->func);
    lua_setfield(L, -2, m->name);
  }
  lua_pop(L, 2);
}
