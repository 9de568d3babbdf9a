/* commandbus Lua binding: the bus object (a runtime and its connections). */
#include "binding.h"
#include "commandbus/schema.h"

cbL_bus *cbL_checkbus(lua_State *L, int idx) { return luaL_checkudata(L, idx, CBL_BUS_MT); }

/* The runtime of an open bus, or NULL after pushing nil, CLOSED. */
static cb_runtime *open_runtime(lua_State *L, cbL_bus *bus) {
  if (bus->rt == NULL || cb_runtime_is_closed(bus->rt)) {
    cbL_pusherrorcode(L, CB_ECLOSED, "the bus is closed");
    return NULL;
  }
  return bus->rt;
}

/* bus:close(): joins the loop thread and closes every connection. Calls on a
 * closed bus return nil, err with err.code == "CLOSED". Idempotent. */
static int l_close(lua_State *L) {
  cbL_bus *bus = cbL_checkbus(L, 1);
  if (bus->rt) cb_runtime_close(bus->rt);
  return 0;
}

static int l_gc(lua_State *L) {
  cbL_bus *bus = cbL_checkbus(L, 1);
  if (bus->rt) {
    cb_runtime_free(bus->rt);
    bus->rt = NULL;
  }
  return 0;
}

static int l_is_closed(lua_State *L) {
  cbL_bus *bus = cbL_checkbus(L, 1);
  lua_pushboolean(L, bus->rt == NULL || cb_runtime_is_closed(bus->rt));
  return 1;
}

/* bus:setup() -> true, applied | nil, err: applies missing migrations. */
static int l_setup(lua_State *L) {
  cb_runtime *rt = open_runtime(L, cbL_checkbus(L, 1));
  if (rt == NULL) return 2;
  cb_err err;
  int applied = 0;
  if (cb_schema_setup(rt, &applied, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  lua_pushinteger(L, applied);
  return 2;
}

static int l_tostring(lua_State *L) {
  cbL_bus *bus = cbL_checkbus(L, 1);
  lua_pushfstring(L, "commandbus.bus (%s)", bus->rt && !cb_runtime_is_closed(bus->rt) ? "open" : "closed");
  return 1;
}

void cbL_open_bus(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"close", l_close},
      {"is_closed", l_is_closed},
      {"setup", l_setup},
      {"queue", cbL_bus_queue},
      {"list_queues", cbL_bus_list_queues},
      {"queue_metrics", cbL_bus_queue_metrics},
      {NULL, NULL},
  };
  cbL_new_class(L, CBL_BUS_MT, methods, l_gc, l_tostring);
}

cb_runtime *cbL_bus_runtime(lua_State *L, int idx) { return open_runtime(L, cbL_checkbus(L, idx)); }
