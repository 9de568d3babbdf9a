/* commandbus Lua binding: JSON through a private lua-cjson instance
 * (cjson.new()), so that a host script's cjson settings never change how
 * messages are encoded. The encode and decode functions live in the
 * registry. */
#include <string.h>

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

void cbL_push_json_encoder(lua_State *L) { lua_getfield(L, LUA_REGISTRYINDEX, "commandbus.json_encode"); }

static int encode_by(lua_State *L, int encoder, int idx) {
  lua_pushvalue(L, encoder);
  lua_pushvalue(L, idx);
  return lua_pcall(L, 1, 1, 0) == 0;
}

int cbL_json_encode_any(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  cbL_push_json_encoder(L);
  int ok = encode_by(L, lua_gettop(L), idx);
  lua_remove(L, -2); /* the encoder */
  return ok;
}

/* Why PostgreSQL would refuse the JSON text, or NULL. jsonb cannot hold the
 * character U+0000 (cjson writes a NUL byte of a Lua string as \u0000), and
 * the server takes UTF-8 only. Outside strings JSON has no backslash, so
 * stepping over each escape pair finds every \u0000. */
static const char *unstorable(const char *json, size_t len) {
  for (size_t i = 0; i < len; i++) {
    if (json[i] != '\\') continue;
    if (i + 5 < len && json[i + 1] == 'u' && memcmp(json + i + 2, "0000", 4) == 0)
      return "a string in it holds a NUL character (\\u0000), which PostgreSQL cannot store";
    i++;
  }
  if (cbL_utf8_invalid_at(json, len) != CBL_VALID) return "a string in it is not valid UTF-8";
  return NULL;
}

int cbL_json_encode(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  cbL_push_json_encoder(L);
  int ok = cbL_json_encode_by(L, lua_gettop(L), idx);
  lua_remove(L, -2); /* the encoder */
  return ok;
}

int cbL_json_encode_by(lua_State *L, int encoder, int idx) {
  if (!encode_by(L, lua_absindex(L, encoder), lua_absindex(L, idx))) return 0;
  size_t len;
  const char *json = lua_tolstring(L, -1, &len);
  const char *why = unstorable(json, len);
  if (why == NULL) return 1;
  lua_pop(L, 1);
  lua_pushstring(L, why);
  return 0;
}

int cbL_json_decode(lua_State *L, const char *text) {
  lua_getfield(L, LUA_REGISTRYINDEX, "commandbus.json_decode");
  lua_pushlstring(L, text, strlen(text)); /* not through the string cache (see worker.c's set_string) */
  if (lua_pcall(L, 1, 1, 0) != 0) return 0;
  return 1;
}
