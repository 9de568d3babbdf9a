/* commandbus Lua binding: the bus's process methods. process_start is the
 * primitive under lua/commandbus/process.lua's manager:start (which runs the
 * definition's hooks); the queries read processes and their steps back.
 * Wrong types raise; values the core refuses come back as nil, err. */
#include <string.h>

#include "binding.h"
#include "commandbus/process.h"

/* A required string field of the table at idx (raises when missing). */
static const char *check_string_field(lua_State *L, int idx, const char *field, const char *what) {
  lua_getfield(L, idx, field);
  if (lua_type(L, -1) != LUA_TSTRING)
    luaL_error(L, "bad %s field '%s': string expected, got %s", what, field, luaL_typename(L, -1));
  const char *s = lua_tostring(L, -1);
  lua_pop(L, 1); /* still referenced by the table */
  return s;
}

/* Encodes the table in field `field` of the table at idx, or leaves *out NULL
 * when the field is nil. The JSON text is left on the stack (the caller's
 * anchor) and 1 returned; 0 after pushing nil, err when it cannot be encoded. */
static int encode_field(lua_State *L, int idx, const char *field, const char *what, const char **out) {
  *out = NULL;
  lua_getfield(L, idx, field);
  if (lua_isnil(L, -1)) return 1;
  if (lua_type(L, -1) != LUA_TTABLE)
    luaL_error(L, "bad %s field '%s': table expected, got %s", what, field, luaL_typename(L, -1));
  if (!cbL_json_encode(L, -1)) {
    const char *why = lua_tostring(L, -1);
    cbL_pusherrorcode(L, CB_EINVAL, "cannot encode %s %s as JSON: %s", what, field, why ? why : "?");
    return 0;
  }
  *out = lua_tostring(L, -1);
  return 1;
}

/* The command table at idx: type (required), data, id, max_attempts. */
static int read_command(lua_State *L, int idx, cb_command_spec *spec) {
  idx = lua_absindex(L, idx);
  memset(spec, 0, sizeof *spec);
  if (lua_type(L, idx) != LUA_TTABLE)
    luaL_error(L, "bad field 'command': table expected, got %s", luaL_typename(L, idx));
  spec->command_type = check_string_field(L, idx, "type", "command");
  spec->command_id = cbL_optfield_string(L, idx, "id", NULL);
  lua_getfield(L, idx, "max_attempts");
  if (!lua_isnil(L, -1)) {
    int ok;
    int64_t v = cbL_toint64(L, -1, &ok);
    if (!ok || v < 1) luaL_error(L, "bad command field 'max_attempts': positive integer expected");
    spec->max_attempts = (int)v;
  }
  lua_pop(L, 1);
  return encode_field(L, idx, "data", "command", &spec->data_json);
}

/* bus:process_start{domain=, type=, step=, state=, reply_to=, batch_id=,
 *                   command={type=, data=, id=, max_attempts=}}
 * -> process_id, {command_id=, msg_id=} | nil, err
 * One transaction: the process row (WAITING at `step`), the command (its
 * correlation_id is the process id) and the step's process_audit row. */
static int l_process_start(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  cb_process_start_spec spec = {0};
  spec.domain = check_string_field(L, 2, "domain", "process");
  spec.process_type = check_string_field(L, 2, "type", "process");
  spec.step_name = check_string_field(L, 2, "step", "process");
  spec.batch_id = cbL_optfield_string(L, 2, "batch_id", NULL);
  const char *reply_to = check_string_field(L, 2, "reply_to", "process");
  if (!encode_field(L, 2, "state", "process", &spec.state_json)) return 2;
  lua_getfield(L, 2, "command");
  cb_command_spec command;
  if (!read_command(L, -1, &command)) return 2;
  command.reply_to = reply_to;
  char process_id[CB_UUID_LEN + 1];
  cb_send_result result;
  cb_err err;
  if (cb_process_start(rt, &spec, &command, process_id, &result, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushstring(L, process_id);
  lua_createtable(L, 0, 2);
  lua_pushstring(L, result.command_id);
  lua_setfield(L, -2, "command_id");
  cbL_pushint64(L, result.msg_id);
  lua_setfield(L, -2, "msg_id");
  return 2;
}

/* bus:get_process(domain, id) -> record | nil, err (NOT_FOUND) */
static int l_get_process(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
  const char *id = luaL_checkstring(L, 3);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_process_get(rt, domain, id, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* bus:list_processes{domain=, type=, status=, limit=100, offset=0}, newest first */
static int l_list_processes(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (rt == NULL) return 2;
  cb_process_filter f = {0};
  f.domain = check_string_field(L, 2, "domain", "filter");
  f.process_type = cbL_optfield_string(L, 2, "type", NULL);
  f.status = cbL_optfield_string(L, 2, "status", NULL);
  f.limit = cbL_optfield_int(L, 2, "limit", 100);
  f.offset = cbL_optfield_int(L, 2, "offset", 0);
  cb_unit *rows;
  cb_err err;
  int rc = cb_process_list(rt, &f, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* bus:process_audit(domain, id) -> {{id=, step_name=, command_id=, ...}, ...}
 * oldest first | nil, err (NOT_FOUND) */
static int l_process_audit(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  const char *domain = luaL_checkstring(L, 2);
  const char *id = luaL_checkstring(L, 3);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_process_audit(rt, domain, id, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

void cbL_open_process(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"process_start", l_process_start},
      {"get_process", l_get_process},
      {"list_processes", l_list_processes},
      {"process_audit", l_process_audit},
      {NULL, NULL},
  };
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_getfield(L, -1, "__index");
  luaL_setfuncs(L, methods, 0);
  lua_pop(L, 2);
}
