/* commandbus Lua binding: error objects and small argument helpers.
 *
 * Runtime failures come back as `nil, err`, where err is a table with `code`
 * (a stable string such as "CONNECTION"), `message`, and `sqlstate` when
 * PostgreSQL gave one; tostring(err) reads "CODE: message". Misuse (a wrong
 * argument type) raises at once instead. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"

#define ERROR_MT "commandbus.error"

static int error_tostring(lua_State *L) {
  lua_getfield(L, 1, "code");
  lua_getfield(L, 1, "message");
  lua_getfield(L, 1, "sqlstate");
  const char *code = lua_tostring(L, -3);
  const char *message = lua_tostring(L, -2);
  const char *sqlstate = lua_tostring(L, -1);
  if (sqlstate && *sqlstate)
    lua_pushfstring(L, "%s: %s (SQLSTATE %s)", code ? code : "ERROR", message ? message : "", sqlstate);
  else
    lua_pushfstring(L, "%s: %s", code ? code : "ERROR", message ? message : "");
  return 1;
}

void cbL_open_errors(lua_State *L) {
  luaL_newmetatable(L, ERROR_MT);
  lua_pushcfunction(L, error_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
}

void cbL_push_error_metatable(lua_State *L) { luaL_getmetatable(L, ERROR_MT); }

int cbL_pusherror(lua_State *L, const cb_err *err) {
  lua_pushnil(L);
  lua_createtable(L, 0, 3);
  lua_pushstring(L, cb_strerror(err->code));
  lua_setfield(L, -2, "code");
  lua_pushstring(L, err->message[0] ? err->message : cb_strerror(err->code));
  lua_setfield(L, -2, "message");
  if (err->sqlstate[0]) {
    lua_pushstring(L, err->sqlstate);
    lua_setfield(L, -2, "sqlstate");
  }
  luaL_getmetatable(L, ERROR_MT);
  lua_setmetatable(L, -2);
  return 2;
}

int cbL_pusherrorcode(lua_State *L, int code, const char *fmt, ...) {
  cb_err err;
  cb_err_clear(&err);
  err.code = code;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err.message, sizeof err.message, fmt, ap);
  va_end(ap);
  return cbL_pusherror(L, &err);
}

int64_t cbL_toint64(lua_State *L, int idx, int *ok) {
  *ok = 0;
  if (lua_type(L, idx) == LUA_TNUMBER) {
#if LUA_VERSION_NUM >= 503
    if (lua_isinteger(L, idx)) {
      *ok = 1;
      return (int64_t)lua_tointeger(L, idx);
    }
#endif
    lua_Number n = lua_tonumber(L, idx);
    if (n == (lua_Number)(int64_t)n) {
      *ok = 1;
      return (int64_t)n;
    }
    return 0;
  }
  if (lua_type(L, idx) == LUA_TSTRING) {
    const char *s = lua_tostring(L, idx);
    char *end;
    long long v = strtoll(s, &end, 10);
    if (*s && *end == '\0') {
      *ok = 1;
      return (int64_t)v;
    }
  }
  return 0;
}

int64_t cbL_checkint64(lua_State *L, int idx) {
  int ok;
  int64_t v = cbL_toint64(L, idx, &ok);
  if (!ok) luaL_argerror(L, idx, lua_pushfstring(L, "integer id expected, got %s", luaL_typename(L, idx)));
  return v;
}

static int field(lua_State *L, int idx, const char *name) {
  if (lua_isnoneornil(L, idx)) return 0;
  lua_getfield(L, idx, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  return 1;
}

double cbL_optfield_number(lua_State *L, int idx, const char *name, double def) {
  if (!field(L, idx, name)) return def;
  if (lua_type(L, -1) != LUA_TNUMBER)
    luaL_error(L, "bad option '%s': number expected, got %s", name, luaL_typename(L, -1));
  double v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

int cbL_optfield_int(lua_State *L, int idx, const char *name, int def) {
  double v = cbL_optfield_number(L, idx, name, def);
  if (v != (double)(int)v) luaL_error(L, "bad option '%s': integer expected, got %f", name, v);
  return (int)v;
}

const char *cbL_optfield_string(lua_State *L, int idx, const char *name, const char *def) {
  if (!field(L, idx, name)) return def;
  if (lua_type(L, -1) != LUA_TSTRING)
    luaL_error(L, "bad option '%s': string expected, got %s", name, luaL_typename(L, -1));
  const char *s = lua_tostring(L, -1);
  lua_pop(L, 1); /* still referenced by the options table */
  return s;
}

const char *cbL_tostring(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  lua_getglobal(L, "tostring");
  lua_pushvalue(L, idx);
  lua_call(L, 1, 1);
  const char *s = lua_tostring(L, -1);
  return s ? s : "?";
}

void cbL_new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc,
                   lua_CFunction tostring) {
  luaL_newmetatable(L, name);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  if (gc) {
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
#if LUA_VERSION_NUM >= 504
    lua_pushcfunction(L, gc); /* a <close> variable ends the object like the GC */
    lua_setfield(L, -2, "__close");
#endif
  }
  if (tostring) {
    lua_pushcfunction(L, tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
}
