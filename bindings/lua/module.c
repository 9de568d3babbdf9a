/* commandbus Lua binding: the module `commandbus.core`. The friendly API is
 * lua/commandbus/init.lua, which builds on this. */
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/schema.h"

#define COMMANDBUS_VERSION "0.1.0"

/* The arguments of connect and shared: ([dsn], [options]).
 * dsn: a libpq conninfo or URI; else DATABASE_URL; else libpq's PG* variables.
 * options: pool_size, connect_timeout (seconds), application_name. */
static cb_runtime_options connect_options(lua_State *L) {
  const char *dsn = luaL_optstring(L, 1, NULL);
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  if (dsn == NULL) dsn = getenv("DATABASE_URL");
  cb_runtime_options o = {0};
  o.conninfo = dsn ? dsn : "";
  o.pool_size = cbL_optfield_int(L, 2, "pool_size", 2);
  o.connect_timeout_ms = (int)(cbL_optfield_number(L, 2, "connect_timeout", 5.0) * 1000.0);
  o.application_name = cbL_optfield_string(L, 2, "application_name", "commandbus");
  if (o.pool_size < 1 || o.pool_size > 64) luaL_argerror(L, 2, "pool_size must be between 1 and 64");
  if (o.connect_timeout_ms <= 0) luaL_argerror(L, 2, "connect_timeout must be positive");
  return o;
}

/* core.connect([dsn], [options]) -> bus | nil, err: a bus with its own
 * runtime (loop thread and connections). */
static int l_connect(lua_State *L) {
  cb_runtime_options o = connect_options(L);
  cbL_bus *bus = cbL_newbus(L);
  cb_err err;
  if (cb_runtime_new(&o, &bus->rt, &err) != CB_OK) return cbL_pusherror(L, &err);
  return 1;
}

/* core.shared([dsn], [options]) -> bus | nil, err: this Lua state's handle
 * on the process's shared runtime for these parameters (see bus.c). */
static int l_shared(lua_State *L) {
  cb_runtime_options o = connect_options(L);
  return cbL_bus_shared(L, &o);
}

/* core.close_shared() -> n: closes the process's shared runtimes. */
static int l_close_shared(lua_State *L) {
  lua_pushinteger(L, cbL_close_shared());
  return 1;
}

/* core.configure{threads = N}: the default number of handler lanes. */
static int l_configure(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "threads");
  if (!lua_isnil(L, -1)) {
    int ok;
    int64_t n = cbL_toint64(L, -1, &ok);
    if (!ok || n < 1 || n > 1024) luaL_argerror(L, 1, "threads must be an integer between 1 and 1024");
    cb_set_default_threads((int)n);
  }
  lua_pop(L, 1);
  return 0;
}

static int l_default_threads(lua_State *L) {
  lua_pushinteger(L, cb_default_threads());
  return 1;
}

static int l_schema_version(lua_State *L) {
  lua_pushinteger(L, cb_schema_version());
  return 1;
}

int luaopen_commandbus_core(lua_State *L) {
  cbL_open_errors(L);
  cbL_open_json(L);
  cbL_open_bus(L);
  cbL_open_queue(L);
  cbL_open_commands(L);
  cbL_open_process(L);
  cbL_open_worker(L);
  cbL_open_reply_router(L);
  cbL_open_router(L);
  static const luaL_Reg functions[] = {
      {"connect", l_connect},
      {"shared", l_shared},
      {"close_shared", l_close_shared},
      {"configure", l_configure},
      {"default_threads", l_default_threads},
      {"schema_version", l_schema_version},
      {"message_router", cbL_message_router},
      {NULL, NULL},
  };
  luaL_newlib(L, functions);
  lua_pushstring(L, COMMANDBUS_VERSION);
  lua_setfield(L, -2, "_VERSION");
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_getfield(L, -1, "__index");
  lua_setfield(L, -3, "bus_methods"); /* for the Lua layer to extend */
  lua_pop(L, 1);
  cbL_push_error_metatable(L);
  lua_setfield(L, -2, "error_metatable"); /* for errors that crossed from another Lua state */
  return 1;
}
