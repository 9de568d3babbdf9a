/* commandbus Lua binding: the module `commandbus.core`. The friendly API is
 * lua/commandbus/init.lua, which builds on this. */
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/schema.h"

/* The release's version, given by the build from CMakeLists.txt's project(). */
#ifndef COMMANDBUS_VERSION
#error "COMMANDBUS_VERSION is defined by the build (CMakeLists.txt, project VERSION)"
#endif

/* The arguments of connect and shared: ([dsn], [options]).
 * dsn: a libpq conninfo or URI; else DATABASE_URL; else libpq's PG* variables.
 * options: pool_size (1..64), connect_timeout (seconds), application_name,
 * notify_after_commit (boolean).
 * Returns 0 after pushing nil, err for an unusable value. */
static int connect_options(lua_State *L, cb_runtime_options *o) {
  const char *dsn = NULL;
  if (!lua_isnoneornil(L, 1) && !cbL_arg_text(L, 1, "dsn", &dsn)) return 0;
  cbL_opt_table(L, 2);
  if (dsn == NULL) dsn = getenv("DATABASE_URL");
  memset(o, 0, sizeof *o);
  o->conninfo = dsn ? dsn : "";
  double connect_timeout;
  if (!cbL_opt_int(L, 2, "pool_size", 2, 1, 64, &o->pool_size) ||
      !cbL_opt_number(L, 2, "connect_timeout", 5.0, CBL_TIMING_MIN, CBL_TIMING_MAX, &connect_timeout) ||
      !cbL_opt_text(L, 2, "application_name", "commandbus", &o->application_name))
    return 0;
  o->connect_timeout_ms = (int)(connect_timeout * 1000.0 + 0.5);
  o->notify_after_commit = cbL_opt_boolean(L, 2, "notify_after_commit", 0);
  return 1;
}

/* core.connect([dsn], [options]) -> bus | nil, err: a bus with its own
 * runtime (loop thread and connections). */
static int l_connect(lua_State *L) {
  cb_runtime_options o;
  if (!connect_options(L, &o)) return 2;
  cbL_bus *bus = cbL_newbus(L);
  cb_err err;
  if (cb_runtime_new(&o, &bus->rt, &err) != CB_OK) return cbL_pusherror(L, &err);
  return 1;
}

/* core.shared([dsn], [options]) -> bus | nil, err: this Lua state's handle
 * on the process's shared runtime for these parameters (see bus.c). */
static int l_shared(lua_State *L) {
  cb_runtime_options o;
  if (!connect_options(L, &o)) return 2;
  return cbL_bus_shared(L, &o);
}

/* core.close_shared() -> n: closes the process's shared runtimes. */
static int l_close_shared(lua_State *L) {
  lua_pushinteger(L, cbL_close_shared());
  return 1;
}

/* core.configure{threads = N} -> true | nil, err: the default number of
 * handler lanes (1..1024). */
static int l_configure(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int threads;
  if (!cbL_opt_int(L, 1, "threads", 0, 1, CBL_THREADS_MAX, &threads)) return 2;
  if (threads) cb_set_default_threads(threads);
  lua_pushboolean(L, 1);
  return 1;
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
  cbL_open_upkeep(L);
  cbL_open_reply_router(L);
  cbL_open_router(L);
  cbL_open_metrics(L);
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
