/* commandbus Lua binding: the bus's methods for a bus that lives for months:
 * schedules, retention and purges, and limits per command type. Wrong types
 * raise; values the core refuses come back as nil, err. */
#include <math.h>
#include <string.h>

#include "binding.h"
#include "commandbus/bus.h"
#include "commandbus/limits.h"
#include "commandbus/retention.h"
#include "commandbus/schedule.h"

/* A required string field of the table at idx (raises when missing). */
static const char *need_string(lua_State *L, int idx, const char *field, const char *what) {
  lua_getfield(L, idx, field);
  if (lua_type(L, -1) != LUA_TSTRING)
    luaL_error(L, "bad %s field '%s': string expected, got %s", what, field, luaL_typename(L, -1));
  const char *s = lua_tostring(L, -1);
  lua_pop(L, 1); /* still referenced by the table */
  return s;
}

/* An optional integer field in [min, max] (def when nil). */
static int opt_int(lua_State *L, int idx, const char *field, const char *what, int def, int min, int max) {
  lua_getfield(L, idx, field);
  int v = def;
  if (!lua_isnil(L, -1)) {
    int ok;
    int64_t n = cbL_toint64(L, -1, &ok);
    if (!ok || n < min || n > max)
      luaL_error(L, "bad %s field '%s': integer between %d and %d expected", what, field, min, max);
    v = (int)n;
  }
  lua_pop(L, 1);
  return v;
}

/* ---- schedules ------------------------------------------------------------------- */

/* bus:schedule{name=, domain=, type=, data=, cron= | every=seconds,
 *              timezone="UTC", missed="skip"|"catch_up", priority=0}
 * -> the schedule | nil, err */
static int l_schedule(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  cb_schedule_spec s = {0};
  s.name = need_string(L, 2, "name", "schedule");
  s.domain = need_string(L, 2, "domain", "schedule");
  s.command_type = need_string(L, 2, "type", "schedule");
  s.cron = cbL_optfield_string(L, 2, "cron", NULL);
  s.every = cbL_optfield_number(L, 2, "every", 0);
  if (s.cron == NULL && !(s.every > 0)) luaL_error(L, "bad schedule: cron (string) or every (seconds > 0) expected");
  if (s.cron != NULL && s.every != 0) luaL_error(L, "bad schedule: cron and every exclude each other");
  s.timezone = cbL_optfield_string(L, 2, "timezone", "UTC");
  const char *missed = cbL_optfield_string(L, 2, "missed", "skip");
  if (strcmp(missed, "skip") != 0 && strcmp(missed, "catch_up") != 0)
    luaL_error(L, "bad schedule field 'missed': \"skip\" or \"catch_up\" expected, got \"%s\"", missed);
  s.catch_up = strcmp(missed, "catch_up") == 0;
  s.priority = opt_int(L, 2, "priority", "schedule", 0, CB_PRIORITY_MIN, CB_PRIORITY_MAX);
  lua_getfield(L, 2, "data");
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TTABLE)
      luaL_error(L, "bad schedule field 'data': table expected, got %s", luaL_typename(L, -1));
    if (!cbL_json_encode(L, -1)) return cbL_pusherrorcode(L, CB_EINVAL, "cannot encode schedule data as JSON");
    s.data_json = lua_tostring(L, -1); /* stays on the stack */
  }
  cb_unit *rows;
  cb_err err;
  int rc = cb_schedule_set(rt, &s, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* bus:unschedule(name) -> true (it existed) | false | nil, err */
static int l_unschedule(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *name = luaL_checkstring(L, 2);
  if (rt == NULL) return 2;
  int existed;
  cb_err err;
  if (cb_schedule_remove(rt, name, &existed, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, existed);
  return 1;
}

static int pause_or_resume(lua_State *L, int paused) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *name = luaL_checkstring(L, 2);
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
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  const char *domain = cbL_optfield_string(L, 2, "domain", NULL);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_schedule_list(rt, domain, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* ---- retention ---------------------------------------------------------------------- */

static void push_counts(lua_State *L, const cb_retention_counts *c) {
  lua_createtable(L, 0, 7);
  const struct {
    const char *name;
    int64_t value;
  } fields[] = {{"commands", c->commands},     {"audit", c->audit},           {"archive", c->archive},
                {"batches", c->batches},       {"processes", c->processes},   {"dedup_keys", c->dedup_keys},
                {"schedule_runs", c->schedule_runs}};
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    cbL_pushint64(L, fields[i].value);
    lua_setfield(L, -2, fields[i].name);
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
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  cb_purge_spec spec = {0};
  spec.domain = need_string(L, 2, "domain", "purge");
  lua_getfield(L, 2, "older_than");
  if (lua_type(L, -1) != LUA_TNUMBER)
    luaL_error(L, "bad purge field 'older_than': number of seconds expected, got %s", luaL_typename(L, -1));
  spec.older_than = lua_tonumber(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 2, "statuses");
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TTABLE) luaL_error(L, "bad purge field 'statuses': list of statuses expected");
    size_t n = lua_rawlen(L, -1);
    const char **statuses = lua_newuserdata(L, (n ? n : 1) * sizeof *statuses);
    for (size_t i = 0; i < n; i++) {
      lua_rawgeti(L, -2, (int)i + 1);
      if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "bad purge field 'statuses': strings expected");
      statuses[i] = lua_tostring(L, -1);
      lua_pop(L, 1); /* still referenced by the list */
    }
    spec.statuses = statuses;
    spec.nstatuses = n;
  }
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
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  const char *domain = need_string(L, 2, "domain", "retention");
  cb_retention_policy p;
  memset(&p, 0, sizeof p);
  const struct {
    const char *name;
    cb_retention_age *age;
  } fields[] = {{"commands", &p.commands}, {"archive", &p.archive}, {"batches", &p.batches}, {"processes", &p.processes}};
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    lua_getfield(L, 2, fields[i].name);
    int t = lua_type(L, -1);
    if (t == LUA_TNUMBER && lua_tonumber(L, -1) >= 0) {
      fields[i].age->set = 1;
      fields[i].age->seconds = lua_tonumber(L, -1);
    } else if (t == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
      fields[i].age->set = 1;
      fields[i].age->seconds = -1;
    } else if (t != LUA_TNIL) {
      luaL_error(L, "bad retention field '%s': seconds (>= 0) or false expected, got %s", fields[i].name,
                 luaL_typename(L, -1));
    }
    lua_pop(L, 1);
  }
  cb_err err;
  if (cb_retention_set(rt, domain, &p, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* bus:retention(domain) -> {domain=, commands=, archive=, batches=,
 * processes=}: seconds, or false for forever */
static int l_retention(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
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
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  const char *domain = need_string(L, 2, "domain", "limit");
  const char *type = need_string(L, 2, "type", "limit");
  int per_second = opt_int(L, 2, "per_second", "limit", 0, 0, 1000000000);
  int concurrency = opt_int(L, 2, "concurrency", "limit", 0, 0, 1000000000);
  cb_err err;
  if (cb_limits_set(rt, domain, type, per_second, concurrency, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* bus:limits(domain) -> {{type=, per_second=, concurrency=, in_flight=}, ...} */
static int l_limits(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
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
