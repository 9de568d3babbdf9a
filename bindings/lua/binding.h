/* commandbus Lua binding: what the binding's files share, and the bridge
 * between the Lua 5.4 and LuaJIT (5.1) C APIs, so that one source builds for
 * both. */
#ifndef COMMANDBUS_BINDING_H
#define COMMANDBUS_BINDING_H

#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>
#include <stdio.h>

#include "commandbus/error.h"
#include "commandbus/runtime.h"

/* ---- compatibility ------------------------------------------------------------ */

#if LUA_VERSION_NUM < 502
#define lua_rawlen(L, i) lua_objlen((L), (i))
#define lua_absindex(L, i) ((i) > 0 || (i) <= LUA_REGISTRYINDEX ? (i) : lua_gettop(L) + (i) + 1)
#endif

/* LuaJIT numbers are doubles: integers beyond 2^53 would silently round, so
 * they travel as decimal strings there. Lua 5.4 has 64-bit integers. */
static inline void cbL_pushint64(lua_State *L, int64_t v) {
#if LUA_VERSION_NUM >= 503
  lua_pushinteger(L, (lua_Integer)v);
#else
  if (v > 9007199254740992LL || v < -9007199254740992LL) {
    char buf[24];
    snprintf(buf, sizeof buf, "%lld", (long long)v);
    lua_pushstring(L, buf);
  } else {
    lua_pushnumber(L, (lua_Number)v);
  }
#endif
}

/* An int64 from an integral number or a decimal string; 0 and *ok = 0 when
 * the value is neither. */
int64_t cbL_toint64(lua_State *L, int idx, int *ok);
int64_t cbL_checkint64(lua_State *L, int idx);
/* tostring(value at idx), pushed on the stack (luaL_tolstring is 5.2+). */
const char *cbL_tostring(lua_State *L, int idx);

/* Optional fields of an options table at idx (which may be nil). */
double cbL_optfield_number(lua_State *L, int idx, const char *field, double def);
int cbL_optfield_int(lua_State *L, int idx, const char *field, int def);
const char *cbL_optfield_string(lua_State *L, int idx, const char *field, const char *def);

/* ---- errors (errors.c) ------------------------------------------------------- */

/* Pushes nil and an error object {code=, message=, sqlstate=}; returns 2. */
int cbL_pusherror(lua_State *L, const cb_err *err);
int cbL_pusherrorcode(lua_State *L, int code, const char *fmt, ...);
void cbL_open_errors(lua_State *L);
/* Pushes the error objects' metatable. */
void cbL_push_error_metatable(lua_State *L);
/* Registers the metatable `name`: methods as __index, gc as __gc (and as
 * __close under Lua 5.4), tostring as __tostring; gc and tostring may be
 * NULL. Leaves the stack as it was. */
void cbL_new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc,
                   lua_CFunction tostring);

/* ---- JSON through a private lua-cjson instance (json.c) ----------------------- */

void cbL_open_json(lua_State *L);
/* Encodes the value at idx; pushes the JSON string and returns 1, or pushes
 * an error message and returns 0. */
int cbL_json_encode(lua_State *L, int idx);
/* Decodes a JSON text; pushes the value (or nil+message: returns 0). */
int cbL_json_decode(lua_State *L, const char *text);

/* ---- the bus (bus.c) ------------------------------------------------------- */

#define CBL_BUS_MT "commandbus.bus"

typedef struct cbL_bus {
  cb_runtime *rt;            /* NULL once freed (or detached) */
  struct cbL_shared *shared; /* a handle on the process's shared runtime; NULL: rt is the bus's own */
} cbL_bus;

cbL_bus *cbL_checkbus(lua_State *L, int idx);
void cbL_open_bus(lua_State *L);
/* Pushes a new bus object without a runtime. */
cbL_bus *cbL_newbus(lua_State *L);
/* core.shared: pushes a handle on the process's shared runtime for these
 * options, connecting it first when there is none (or nil, err). */
int cbL_bus_shared(lua_State *L, const cb_runtime_options *o);
/* core.close_shared: closes every shared runtime of the process; returns how
 * many. Handles on them then answer CLOSED; a later core.shared connects
 * anew. */
int cbL_close_shared(void);

/* ---- queues (queue.c) ---------------------------------------------------- */

void cbL_open_queue(lua_State *L);
/* bus:queue(name): pushes the queue object (or nil, err). */
int cbL_bus_queue(lua_State *L);
int cbL_bus_list_queues(lua_State *L);
/* The runtime of the open bus at idx, or NULL after pushing nil, CLOSED. */
cb_runtime *cbL_bus_runtime(lua_State *L, int idx);

/* ---- rows (rows.c) and commands (commands.c) --------------------------- */

void cbL_push_row(lua_State *L, const cb_result *r, int row);
void cbL_push_rows(lua_State *L, const cb_result *r);
/* The answer of a core query: nil, err when rc failed; else its rows (the
 * last statement of `rows`, which is freed) as one table, or as a list. */
int cbL_push_query(lua_State *L, int rc, cb_unit *rows, cb_err *err, int single);
void cbL_open_commands(lua_State *L);

/* ---- processes (process.c) ----------------------------------------------- */

void cbL_open_process(lua_State *L);
/* The await functions' flags from the options table at idx (may be nil):
 * listen = false gives CB_AWAIT_NO_LISTEN. Raises on a mistyped option. */
int cbL_await_flags(lua_State *L, int idx);
/* Hands up to max queued process events to the sink function of the bus at
 * bus_idx (see bus:on_process_event); returns how many. */
int cbL_dispatch_events(lua_State *L, int bus_idx, int max);

/* ---- lane threads (lanes.c) ----------------------------------------------- */

typedef struct cbL_lanes cbL_lanes;
/* Runs on each lane thread with its own state, where the module's value is at
 * index 1; L is NULL when the module failed to load (the lane must still run
 * its loop so that its work is handed back). */
typedef void (*cbL_lane_fn)(lua_State *L, int lane, void *arg);
cbL_lanes *cbL_lanes_start(lua_State *L, int count, const char *module, cbL_lane_fn fn, void *arg, cb_err *err);
/* Joins every lane thread and frees. */
void cbL_lanes_join(cbL_lanes *lanes);
int cbL_lanes_running(const cbL_lanes *lanes);
/* Between a run() loop's rounds on the caller's thread: hands queued process
 * events to the sink of the bus referenced by bus_ref (LUA_NOREF: none),
 * then calls run()'s tick (the function at idx; 0 or nil: none). Returns 0
 * when the runner should stop: the tick returned false, or raised (logged
 * with the domain `who`). */
int cbL_tick(lua_State *L, int idx, int bus_ref, const char *who);

/* A component that runs lanes (a worker, a reply router), as the bindings
 * drive it: in run() on the caller's thread, or in the background after
 * start(). */
typedef struct cbL_runner_ops {
  int (*lanes)(void *component);
  int (*start)(void *component, cb_err *err);
  void (*stop)(void *component);
  int (*wait)(void *component, int timeout_ms); /* 1 once stopped and drained */
  cbL_lane_fn lane;                             /* each module lane's loop */
} cbL_runner_ops;
/* Starts one lane thread per lane loading `module` (none when module is
 * NULL: the caller runs the only lane), then the component. Returns 1 and
 * the lanes; or 0 after pushing nil, err, with nothing left running. */
int cbL_runner_start(lua_State *L, const cbL_runner_ops *ops, void *component, const char *module,
                     cbL_lanes **lanes);
/* Stops the component, waits until it drained, joins its lanes. */
void cbL_runner_finish(const cbL_runner_ops *ops, void *component, cbL_lanes *lanes);

void cbL_open_worker(lua_State *L);
void cbL_open_reply_router(lua_State *L);

/* ---- message routers (router.c) ------------------------------------------ */

void cbL_open_router(lua_State *L);
/* core.message_router{...}: pushes the router object (or nil, err). */
int cbL_message_router(lua_State *L);

#endif
