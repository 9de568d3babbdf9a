/* commandbus Lua binding: the bus's command methods (send, send_batch and the
 * queries). Arguments are checked here, before anything reaches the core:
 * wrong types raise, values the core refuses come back as nil, err. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/awaiter.h"
#include "commandbus/bus.h"
#include "commandbus/tsq.h"

/* What a message calls the command read by read_spec: `what`, or "command
 * #i" when what is NULL (an item of a list). Made only when a message needs
 * it: formatting it for every command of a large send_batch costs time.
 * Pushes the string when it makes one. */
static const char *spec_name(lua_State *L, const char *what, int i) {
  return what ? what : lua_pushfstring(L, "command #%d", i);
}

/* Raises "bad <name><rest>". The caller evaluates the arguments (type
 * names at relative indices included) before anything is pushed here. */
static int spec_raise(lua_State *L, const char *what, int i, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  const char *rest = lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  const char *name = spec_name(L, what, i);
  return luaL_error(L, "bad %s%s", name, rest);
}

/* Reads one command table at idx into spec; what names it in messages (NULL:
 * "command #i"). Strings stay owned by Lua: the table is referenced from the
 * caller's arguments; encoded data goes into the anchor table at anchor_idx
 * (slot i). Raises on wrong types; returns 0 after pushing nil, err when data
 * cannot be encoded. */
static int read_spec(lua_State *L, int idx, int anchor_idx, int i, cb_command_spec *spec, const char *what) {
  idx = lua_absindex(L, idx);
  memset(spec, 0, sizeof *spec);
  if (lua_type(L, idx) != LUA_TTABLE) spec_raise(L, what, i, ": table expected, got %s", luaL_typename(L, idx));
  struct {
    const char *name;
    const char **out;
  } strings[] = {{"type", &spec->command_type},
                 {"id", &spec->command_id},
                 {"correlation_id", &spec->correlation_id},
                 {"reply_to", &spec->reply_to},
                 {"batch_id", &spec->batch_id}};
  for (size_t k = 0; k < sizeof strings / sizeof strings[0]; k++) {
    lua_getfield(L, idx, strings[k].name);
    if (!lua_isnil(L, -1)) {
      if (lua_type(L, -1) != LUA_TSTRING)
        spec_raise(L, what, i, " field '%s': string expected, got %s", strings[k].name, luaL_typename(L, -1));
      *strings[k].out = lua_tostring(L, -1);
    }
    lua_pop(L, 1);
  }
  if (spec->command_type == NULL) spec_raise(L, what, i, ": field 'type' is required");
  lua_getfield(L, idx, "max_attempts");
  if (!lua_isnil(L, -1)) {
    int ok;
    int64_t v = cbL_toint64(L, -1, &ok);
    if (!ok || v < 1) spec_raise(L, what, i, " field 'max_attempts': positive integer expected");
    spec->max_attempts = (int)v;
  }
  lua_pop(L, 1);
  lua_getfield(L, idx, "data");
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TTABLE)
      spec_raise(L, what, i, " field 'data': table expected, got %s", luaL_typename(L, -1));
    if (!cbL_json_encode(L, -1)) {
      const char *why = lua_tostring(L, -1);
      const char *name = spec_name(L, what, i);
      cbL_pusherrorcode(L, CB_EINVAL, "cannot encode %s data as JSON: %s", name, why ? why : "?");
      return 0;
    }
    spec->data_json = lua_tostring(L, -1);
    lua_rawseti(L, anchor_idx, i); /* keeps the string alive */
  }
  lua_pop(L, 1);
  return 1;
}

static void push_result(lua_State *L, const cb_send_result *r) {
  lua_createtable(L, 0, 3);
  lua_pushstring(L, r->command_id);
  lua_setfield(L, -2, "command_id");
  if (r->duplicate) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "duplicate");
  } else {
    cbL_pushint64(L, r->msg_id);
    lua_setfield(L, -2, "msg_id");
  }
}

/* Reads the list of command tables at `list` into userdata arrays (so that a
 * raise on a bad field leaks nothing): specs and results for n commands.
 * Returns 0 after pushing nil, err when a command's data cannot be encoded. */
static int read_specs(lua_State *L, int list, int anchor, size_t n, cb_command_spec **specs,
                      cb_send_result **results) {
  *specs = lua_newuserdata(L, n * sizeof **specs);
  *results = lua_newuserdata(L, n * sizeof **results);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, list, (int)i + 1);
    if (!read_spec(L, -1, anchor, (int)i + 1, &(*specs)[i], NULL)) return 0;
    lua_pop(L, 1);
  }
  return 1;
}

static void push_results(lua_State *L, const cb_send_result *results, size_t n) {
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    push_result(L, &results[i]);
    lua_rawseti(L, -2, (int)i + 1);
  }
}

static const char *check_domain_field(lua_State *L, int idx) {
  lua_getfield(L, idx, "domain");
  if (lua_type(L, -1) != LUA_TSTRING)
    luaL_error(L, "bad field 'domain': string expected, got %s", luaL_typename(L, -1));
  const char *d = lua_tostring(L, -1);
  lua_pop(L, 1);
  return d;
}

static double check_delay(lua_State *L, int idx) {
  double delay = cbL_optfield_number(L, idx, "delay", 0);
  if (delay < 0) luaL_error(L, "bad field 'delay': must not be negative");
  return delay;
}

/* bus:send{domain=, type=, data=, id=, correlation_id=, reply_to=,
 *          max_attempts=, delay=, batch_id=} -> {command_id=, msg_id=} | nil, err */
static int l_send(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  const char *domain = check_domain_field(L, 2);
  double delay = check_delay(L, 2);
  lua_newtable(L);
  int anchor = lua_gettop(L);
  cb_command_spec spec;
  if (!read_spec(L, 2, anchor, 1, &spec, "command")) return 2;
  cb_send_result result;
  cb_err err;
  if (cb_bus_send(rt, domain, &spec, 1, delay, &result, &err) != CB_OK) return cbL_pusherror(L, &err);
  push_result(L, &result);
  return 1;
}

/* bus:send_batch{domain=, commands={{type=, data=, ...}, ...}, delay=}
 * -> {{command_id=, msg_id=} or {command_id=, duplicate=true}, ...} | nil, err
 * One round trip and one transaction for all. */
static int l_send_batch(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  const char *domain = check_domain_field(L, 2);
  double delay = check_delay(L, 2);
  lua_getfield(L, 2, "commands");
  if (lua_type(L, -1) != LUA_TTABLE) luaL_error(L, "bad field 'commands': table expected");
  int list = lua_gettop(L);
  size_t n = lua_rawlen(L, list);
  lua_createtable(L, (int)n, 0);
  int anchor = lua_gettop(L);
  if (n == 0) {
    lua_newtable(L);
    return 1;
  }
  cb_command_spec *specs;
  cb_send_result *results;
  if (!read_specs(L, list, anchor, n, &specs, &results)) return 2;
  cb_err err;
  if (cb_bus_send(rt, domain, specs, n, delay, results, &err) != CB_OK) return cbL_pusherror(L, &err);
  push_results(L, results, n);
  return 1;
}

/* bus:get_command(domain, id) -> record | nil, err (NOT_FOUND) */
static int l_get_command(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
  const char *id = luaL_checkstring(L, 3);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_bus_get_command(rt, domain, id, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* bus:list_commands{domain=, status=, type=, correlation_id=, batch_id=, limit=, offset=} */
static int l_list_commands(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  cb_command_filter f = {0};
  f.domain = check_domain_field(L, 2);
  f.status = cbL_optfield_string(L, 2, "status", NULL);
  f.command_type = cbL_optfield_string(L, 2, "type", NULL);
  f.correlation_id = cbL_optfield_string(L, 2, "correlation_id", NULL);
  f.batch_id = cbL_optfield_string(L, 2, "batch_id", NULL);
  f.limit = cbL_optfield_int(L, 2, "limit", 100);
  f.offset = cbL_optfield_int(L, 2, "offset", 0);
  cb_unit *rows;
  cb_err err;
  int rc = cb_bus_list_commands(rt, &f, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* bus:audit(domain, id) -> {{audit_id=, event_type=, ts=, details=}, ...} */
static int l_audit(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
  const char *id = luaL_checkstring(L, 3);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_bus_audit(rt, domain, id, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* bus:create_batch{domain=, name=, custom_data=, commands={...}}
 * -> {batch_id=, commands={{command_id=, msg_id=}, ...}} | nil, err */
static int l_create_batch(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  const char *domain = check_domain_field(L, 2);
  const char *name = cbL_optfield_string(L, 2, "name", NULL);
  lua_getfield(L, 2, "commands");
  if (lua_type(L, -1) != LUA_TTABLE) luaL_error(L, "bad field 'commands': table expected");
  int list = lua_gettop(L);
  size_t n = lua_rawlen(L, list);
  lua_newtable(L);
  int anchor = lua_gettop(L);
  const char *custom = NULL;
  lua_getfield(L, 2, "custom_data");
  if (!lua_isnil(L, -1)) {
    if (!lua_istable(L, -1)) luaL_error(L, "bad field 'custom_data': table expected");
    if (!cbL_json_encode(L, -1)) return cbL_pusherrorcode(L, CB_EINVAL, "cannot encode custom_data as JSON");
    custom = lua_tostring(L, -1);
    lua_rawseti(L, anchor, 0);
  }
  lua_pop(L, 1);
  if (n == 0) return cbL_pusherrorcode(L, CB_EINVAL, "a batch needs at least one command");
  cb_command_spec *specs;
  cb_send_result *results;
  if (!read_specs(L, list, anchor, n, &specs, &results)) return 2;
  char batch_id[CB_UUID_LEN + 1];
  cb_err err;
  if (cb_bus_create_batch(rt, domain, name, custom, specs, n, results, batch_id, &err) != CB_OK)
    return cbL_pusherror(L, &err);
  lua_createtable(L, 0, 2);
  lua_pushstring(L, batch_id);
  lua_setfield(L, -2, "batch_id");
  push_results(L, results, n);
  lua_setfield(L, -2, "commands");
  return 1;
}

/* bus:get_batch(domain, id) -> batch with exact counts | nil, err */
static int l_get_batch(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
  const char *id = luaL_checkstring(L, 3);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_bus_get_batch(rt, domain, id, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* bus:list_batches{domain=, status=, limit=, offset=} */
static int l_list_batches(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  const char *domain = check_domain_field(L, 2);
  cb_unit *rows;
  cb_err err;
  int rc = cb_bus_list_batches(rt, domain, cbL_optfield_string(L, 2, "status", NULL),
                               cbL_optfield_int(L, 2, "limit", 100), cbL_optfield_int(L, 2, "offset", 0), &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* bus:tsq_list{domain=, type=, limit=, offset=} -> {items={...}, total=n} */
static int l_tsq_list(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  const char *domain = check_domain_field(L, 2);
  cb_unit *rows;
  int64_t total;
  cb_err err;
  int rc = cb_tsq_list(rt, domain, cbL_optfield_string(L, 2, "type", NULL), cbL_optfield_int(L, 2, "limit", 100),
                       cbL_optfield_int(L, 2, "offset", 0), &rows, &total, &err);
  if (rc != CB_OK) return cbL_pusherror(L, &err);
  lua_createtable(L, 0, 2);
  cbL_push_rows(L, cb_unit_result(rows, 1));
  lua_setfield(L, -2, "items");
  cbL_pushint64(L, total);
  lua_setfield(L, -2, "total");
  cb_unit_free(rows);
  return 1;
}

/* An operator action's options at idx (may be nil): {operator=, reason=}. */
static const char *opt_operator(lua_State *L, int idx, const char **reason) {
  if (lua_isnoneornil(L, idx)) return NULL;
  luaL_checktype(L, idx, LUA_TTABLE);
  if (reason) *reason = cbL_optfield_string(L, idx, "reason", NULL);
  return cbL_optfield_string(L, idx, "operator", NULL);
}

/* bus:tsq_retry(domain, id, {operator=, reason=}) -> new msg_id | nil, err */
static int l_tsq_retry(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
  const char *id = luaL_checkstring(L, 3);
  const char *reason = NULL;
  const char *op = opt_operator(L, 4, &reason);
  if (rt == NULL) return 2;
  int64_t msg_id;
  cb_err err;
  if (cb_tsq_retry(rt, domain, id, op, reason, &msg_id, &err) != CB_OK) return cbL_pusherror(L, &err);
  cbL_pushint64(L, msg_id);
  return 1;
}

/* bus:tsq_cancel(domain, id, reason, {operator=}) -> true | nil, err */
static int l_tsq_cancel(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
  const char *id = luaL_checkstring(L, 3);
  const char *reason = luaL_optstring(L, 4, "");
  const char *op = opt_operator(L, 5, NULL);
  if (rt == NULL) return 2;
  cb_err err;
  if (cb_tsq_cancel(rt, domain, id, reason, op, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* bus:tsq_complete(domain, id, result, {operator=, reason=}) -> true | nil, err */
static int l_tsq_complete(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
  const char *id = luaL_checkstring(L, 3);
  const char *result = NULL;
  if (!lua_isnoneornil(L, 4)) {
    luaL_checktype(L, 4, LUA_TTABLE);
    if (!cbL_json_encode(L, 4)) return cbL_pusherrorcode(L, CB_EINVAL, "cannot encode the result as JSON");
    result = lua_tostring(L, -1);
    lua_replace(L, 4);
  }
  const char *reason = NULL;
  const char *op = opt_operator(L, 5, &reason);
  if (rt == NULL) return 2;
  cb_err err;
  if (cb_tsq_complete(rt, domain, id, result, op, reason, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* bus:await(domain, command_id, {timeout=30, listen=true}) -> the command once
 * it is COMPLETED, FAILED, CANCELED or in the TSQ | nil, err (TIMEOUT,
 * NOT_FOUND). Blocks only the calling thread; listen as for await_process. */
static int l_await(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
  const char *id = luaL_checkstring(L, 3);
  if (!lua_isnoneornil(L, 4)) luaL_checktype(L, 4, LUA_TTABLE);
  double timeout = cbL_optfield_number(L, 4, "timeout", 30);
  if (timeout < 0) luaL_argerror(L, 4, "timeout must not be negative");
  int flags = cbL_await_flags(L, 4);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_await_command(rt, domain, id, timeout, flags, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

void cbL_open_commands(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"send", l_send},
      {"send_batch", l_send_batch},
      {"get_command", l_get_command},
      {"list_commands", l_list_commands},
      {"audit", l_audit},
      {"create_batch", l_create_batch},
      {"get_batch", l_get_batch},
      {"list_batches", l_list_batches},
      {"tsq_list", l_tsq_list},
      {"tsq_retry", l_tsq_retry},
      {"tsq_cancel", l_tsq_cancel},
      {"tsq_complete", l_tsq_complete},
      {"await", l_await},
      {NULL, NULL},
  };
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_getfield(L, -1, "__index");
  luaL_setfuncs(L, methods, 0);
  lua_pop(L, 2);
}
