/* commandbus Lua binding: JSON through a private lua-cjson instance
 * (cjson.new()), so that a host script's cjson settings never change how
 * messages are encoded. The encode and decode functions live in the
 * registry. */
#include "binding.h"


void cbL_open_json(lua_State *L) {
  lua_getglobal(L, "require");
  lua_pushstring(L, "cjson");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "new");
  if (lua_isfunction(L, -1)) {
    lua_call(L, 0, 1);
    lua_remove(L, -2);
  } else {
    lua_pop(L, 1);
  }
  lua_getfield(L, -1, "encode");
  lua_getfield(L, -2, "decode");
  /* One registry slot per Lua state: each lane's state loads the module
   * afresh, so the refs are looked up by name, not cached in C globals. */
  lua_setfield(L, LUA_REGISTRYINDEX, "commandbus.json_decode");
  lua_setfield(L, LUA_REGISTRYINDEX, "commandbus.json_encode");
  lua_pop(L, 1);
}

int cbL_json_encode(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  lua_getfield(L, LUA_REGISTRYINDEX, "commandbus.json_encode");
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 1, 0) != 0) return 0;
  return 1;
}

int cbL_json_decode(lua_State *L, const char *text) {
  lua_getfield(L, LUA_REGISTRYINDEX, "commandbus.json_decode");
  lua_pushstring(L, text);
  if (lua_pcall(L, 1, 1, 0) != 0) return 0;
  return 1;
}
