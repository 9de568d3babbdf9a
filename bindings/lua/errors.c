/* commandbus Lua binding: error objects and the classes' metatables.
 *
 * Runtime failures come back as `nil, err`, where err is a table with `code`
 * (a stable string such as "CONNECTION"), `message`, and `sqlstate` when
 * PostgreSQL gave one; tostring(err) reads "CODE: message". Misuse (a wrong
 * argument type) raises at once instead (see checks.c). */
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
  else lua_pushfstring(L, "%s: %s", code ? code : "ERROR", message ? message : "");
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

const char *cbL_tostring(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  lua_getglobal(L, "tostring");
  lua_pushvalue(L, idx);
  /* Protected: the value's __tostring may raise, and on a lane's own state
   * nothing would catch it but a panic. */
  if (lua_pcall(L, 1, 1, 0) != 0) {
    const char *why = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1);
    lua_pushfstring(L, "%s (its __tostring raised: %s)", luaL_typename(L, idx), why);
    lua_remove(L, -2);
  } else if (lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    lua_pushfstring(L, "%s (its __tostring gave no string)", luaL_typename(L, idx));
  }
  return lua_tostring(L, -1);
}

void cbL_new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc, lua_CFunction tostring) {
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
