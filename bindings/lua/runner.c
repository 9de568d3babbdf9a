/* commandbus Lua binding: runners, what a worker and a reply router share as
 * Lua objects: run(), start(), stop(), health(), in_flight() and close(),
 * their lanes and run()'s tick. Each kind (worker.c, reply_router.c) adds
 * its constructor and what one round of a lane does; the core's engine
 * (commandbus/engine.h) drives both alike.
 *
 * Code given as a module name runs on lane threads, each loading the module
 * in its own lua_State (lanes.c); code given as a table runs on the thread
 * that calls run(), as the only lane, between ticks. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/log.h"

struct cbL_runner {
  const cbL_runner_class *cls;
  void *runner;      /* the core's worker or reply router; NULL once closed */
  cb_engine *engine; /* its engine */
  cb_runtime *rt;
  int bus_ref;
  int code_ref;          /* table mode: the code table; LUA_NOREF in module mode */
  char *module;          /* module mode */
  int code, self;        /* while the constructor runs: the stack indexes of the code and the object */
  int ran;               /* run() or start() was called (a runner runs once) */
  int in_run;            /* run() has not returned yet */
  int close_pending;     /* close() was called from inside run() */
  cbL_lanes *background; /* start(): the lanes running while the caller goes on */
};

static cbL_runner *check_runner(lua_State *L) {
  const cbL_runner_class *cls = lua_touserdata(L, lua_upvalueindex(1));
  return luaL_checkudata(L, 1, cls->mt);
}

cbL_runner *cbL_runner_begin(lua_State *L, const cbL_runner_class *cls, const char **domain, int *lanes,
                             double *visibility_timeout, double *statement_timeout, double *poll_interval) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  int type;
  if (!cbL_field_text(L, 2, "domain", domain) || !cbL_opt_int(L, 2, "concurrency", 0, 1, CBL_THREADS_MAX, lanes) ||
      !cbL_opt_number(L, 2, "visibility_timeout", *visibility_timeout, CBL_TIMING_MIN, CBL_TIMING_MAX,
                      visibility_timeout) ||
      !cbL_opt_number(L, 2, "statement_timeout", *statement_timeout, CBL_TIMING_MIN, CBL_TIMING_MAX,
                      statement_timeout) ||
      !cbL_opt_number(L, 2, "poll_interval", *poll_interval, CBL_TIMING_MIN, CBL_TIMING_MAX, poll_interval) ||
      !cbL_opt_module(L, 2, cls->code, &type))
    return NULL;
  int code = lua_gettop(L);
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return NULL;
  if (type == LUA_TTABLE) *lanes = 1; /* the code runs on run()'s thread */
  cbL_runner *lr = lua_newuserdata(L, sizeof *lr);
  memset(lr, 0, sizeof *lr);
  lr->cls = cls;
  lr->rt = rt;
  lr->code = code;
  lr->self = lua_gettop(L);
  lr->bus_ref = lr->code_ref = LUA_NOREF;
  luaL_getmetatable(L, cls->mt);
  lua_setmetatable(L, -2);
  return lr;
}

cb_runtime *cbL_runner_runtime(const cbL_runner *lr) { return lr->rt; }

int cbL_runner_adopt(lua_State *L, cbL_runner *lr, void *runner, cb_engine *engine) {
  lr->runner = runner;
  lr->engine = engine;
  lua_pushvalue(L, 1);
  lr->bus_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (lua_istable(L, lr->code)) {
    lua_pushvalue(L, lr->code);
    lr->code_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  } else {
    lr->module = strdup(lua_tostring(L, lr->code));
  }
  lua_pushvalue(L, lr->self);
  return 1;
}

/* The {tick=fn, tick_interval=0.5} options (argument 2) of run(): the
 * interval in milliseconds; raises when tick is not a function. */
static int run_options(lua_State *L, int *tick_ms) {
  cbL_opt_table(L, 2);
  double interval;
  if (!cbL_opt_number(L, 2, "tick_interval", 0.5, CBL_TIMING_MIN, CBL_TIMING_MAX, &interval)) return 0;
  *tick_ms = (int)(interval * 1000 + 0.5);
  if (lua_istable(L, 2)) {
    lua_getfield(L, 2, "tick");
    if (!lua_isnil(L, -1) && !lua_isfunction(L, -1))
      luaL_error(L, "bad option 'tick': function expected, got %s", luaL_typename(L, -1));
    lua_pop(L, 1);
  }
  return 1;
}

/* ---- lanes and ticks ------------------------------------------------------------ */

/* Between rounds on run()'s thread: hands queued process events to the sink
 * of the bus (bus_ref), then calls the tick (the function at idx; 0 or nil:
 * none). 0 when the runner should stop: the tick returned false, or raised
 * (logged). */
static int tick(lua_State *L, int idx, const cbL_runner *lr) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, lr->bus_ref); /* the bus's process event sink, if any */
  cbL_dispatch_events(L, -1, 1 << 30);
  lua_pop(L, 1);
  if (idx == 0 || lua_isnoneornil(L, idx)) return 1;
  lua_pushvalue(L, idx);
  int keep = 1;
  if (lua_pcall(L, 0, 1, 0) != 0) {
    cb_log(CB_LOG_ERROR, "%s %s: run()'s tick raised: %s; stopping", lr->cls->name, cb_engine_domain(lr->engine),
           lua_tostring(L, -1));
    keep = 0;
  } else if (!lua_isnil(L, -1) && !lua_toboolean(L, -1)) {
    keep = 0;
  }
  lua_pop(L, 1);
  return keep;
}

/* The loop of one lane: rounds until the runner ends the lane. In table
 * mode (tick_idx > 0) the tick runs between rounds. */
static void lane_loop(const cbL_runner *lr, lua_State *L, int code, int lane, int tick_idx, int tick_ms) {
  while (lr->cls->lane_round(L, code, lr->runner, lane, tick_idx ? tick_ms : 1000))
    if (tick_idx && !tick(L, tick_idx, lr)) cb_engine_stop(lr->engine);
}

static void module_lane(lua_State *L, int lane, void *arg) {
  const cbL_runner *lr = arg;
  if (L && !lua_istable(L, 1)) {
    cb_log(CB_LOG_ERROR, "%s %s: the %s module did not return a table", lr->cls->name, cb_engine_domain(lr->engine),
           lr->cls->code);
    L = NULL;
  }
  lane_loop(lr, L, 1, lane, 0, 0);
}

/* A start that failed: the runner is stopped, its lanes end and are joined.
 * Pushes nil, err; returns 0. */
static int abandon(lua_State *L, cbL_runner *lr, cbL_lanes *lanes, const cb_err *err) {
  cb_engine_stop(lr->engine);
  cbL_lanes_join(lanes);
  cbL_pusherror(L, err);
  return 0;
}

/* Starts one lane thread per lane in module mode (none in table mode: the
 * caller runs the only lane), then the runner. 1 and the lanes; or 0 after
 * pushing nil, err, with nothing left running. */
static int start(lua_State *L, cbL_runner *lr, cbL_lanes **lanes) {
  cb_err err;
  int want = cb_engine_lanes(lr->engine);
  *lanes = NULL;
  lr->ran = 1;
  if (lr->module) {
    cbL_lanes *started = cbL_lanes_start(L, want, lr->module, module_lane, lr, &err);
    if (started == NULL) return abandon(L, lr, NULL, &err);
    int running = cbL_lanes_running(started);
    if (running != want) { /* a lane nobody runs would hold its work forever: refuse to start */
      cb_err_set(&err, CB_ENOMEM, "could start only %d of %d lane threads", running, want);
      return abandon(L, lr, started, &err);
    }
    *lanes = started;
  }
  if (cb_engine_start(lr->engine, &err) != CB_OK) {
    abandon(L, lr, *lanes, &err);
    *lanes = NULL;
    return 0;
  }
  return 1;
}

/* ---- methods ---------------------------------------------------------------------- */

static void close_runner(lua_State *L, cbL_runner *lr);

/* runner:run{tick=fn, tick_interval=0.5}: runs until stopped (stop(), a
 * handler's ctx:stop_worker(), SIGINT/SIGTERM, or tick returning false);
 * drains what it took, then returns true. */
static int l_run(lua_State *L) {
  cbL_runner *lr = check_runner(L);
  int tick_ms;
  if (!run_options(L, &tick_ms)) return 2;
  if (lr->runner == NULL || lr->ran) return cbL_pusherrorcode(L, CB_ESTATE, "the %s already ran", lr->cls->name);
  lua_settop(L, 2);
  if (lua_istable(L, 2)) lua_getfield(L, 2, "tick");
  else lua_pushnil(L);
  cb_engine *e = lr->engine;
  lr->in_run = 1;
  cb_engine_watch_signals(e);
  cbL_lanes *lanes;
  if (!start(L, lr, &lanes)) {
    lr->in_run = 0;
    return 2;
  }
  if (lr->module) {
    while (!cb_engine_wait(e, tick_ms))
      if (!tick(L, 3, lr)) cb_engine_stop(e);
    cbL_lanes_join(lanes);
  } else {
    lua_rawgeti(L, LUA_REGISTRYINDEX, lr->code_ref);
    lane_loop(lr, L, lua_gettop(L), 0, 3, tick_ms);
    cb_engine_wait(e, -1);
  }
  tick(L, 0, lr); /* events of the drain reach the sink too */
  lr->in_run = 0;
  if (lr->close_pending) close_runner(L, lr);
  lua_settop(L, 1);
  lua_pushboolean(L, 1);
  return 1;
}

/* runner:start() -> true | nil, err: runs in the background (its module on
 * lane threads) while the caller goes on, as inside nginx. stop() asks it to
 * stop; close() stops it, waits for the drain and joins the lanes. */
static int l_start(lua_State *L) {
  cbL_runner *lr = check_runner(L);
  const cbL_runner_class *cls = lr->cls;
  if (lr->runner == NULL || lr->ran) return cbL_pusherrorcode(L, CB_ESTATE, "the %s already ran", cls->name);
  if (lr->module == NULL)
    luaL_error(L,
               "%s:start() runs %s on lane threads: give %s as a module name (a %s table runs only on run()'s "
               "thread)",
               cls->type, cls->code, cls->code, cls->code);
  if (!start(L, lr, &lr->background)) return 2;
  lua_pushboolean(L, 1);
  return 1;
}

static int l_stop(lua_State *L) {
  cbL_runner *lr = check_runner(L);
  if (lr->runner) cb_engine_stop(lr->engine);
  return 0;
}

/* runner:health() -> {state=, in_flight=, the kind's counters (see
 * cbL_set_runner_counters), and the kind's own fields} */
static int l_health(lua_State *L) {
  cbL_runner *lr = check_runner(L);
  if (lr->runner == NULL) return cbL_pusherrorcode(L, CB_ECLOSED, "the %s is closed", lr->cls->name);
  cb_runner_stat s;
  cb_engine_report(lr->engine, &s);
  lua_createtable(L, 0, 12);
  lua_pushstring(L, s.state);
  lua_setfield(L, -2, "state");
  lua_pushinteger(L, s.in_flight);
  lua_setfield(L, -2, "in_flight");
  cbL_set_runner_counters(L, &s);
  if (lr->cls->health) lr->cls->health(L, lr->runner);
  return 1;
}

static int l_in_flight(lua_State *L) {
  cbL_runner *lr = check_runner(L);
  cb_runner_stat s = {0};
  if (lr->runner) cb_engine_report(lr->engine, &s);
  lua_pushinteger(L, s.in_flight);
  return 1;
}

static void close_runner(lua_State *L, cbL_runner *lr) {
  if (lr->in_run) {
    /* Called from a tick or a table-mode handler: run() still uses the
     * runner. Stop it now, free it when run() returns. */
    if (lr->runner) cb_engine_stop(lr->engine);
    lr->close_pending = 1;
    return;
  }
  if (lr->background) { /* stop, wait for the drain, join the lanes */
    cb_engine_stop(lr->engine);
    cb_engine_wait(lr->engine, -1);
    cbL_lanes_join(lr->background);
    lr->background = NULL;
  }
  if (lr->runner) {
    lr->cls->free(lr->runner);
    lr->runner = NULL;
    lr->engine = NULL;
  }
  luaL_unref(L, LUA_REGISTRYINDEX, lr->code_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, lr->bus_ref);
  lr->code_ref = lr->bus_ref = LUA_NOREF;
  free(lr->module);
  lr->module = NULL;
}

static int l_close(lua_State *L) {
  close_runner(L, check_runner(L));
  return 0;
}

/* ---- the class ---------------------------------------------------------------------- */

void cbL_set_runner_counters(lua_State *L, const cb_runner_stat *s) {
  static const struct {
    const char *name;
    size_t offset;
    int worker; /* 1: a worker's, 0: a reply router's, -1: both */
  } counters[] = {
      {"failures", offsetof(cb_runner_stat, failures), -1},
      {"successes", offsetof(cb_runner_stat, successes), 1},
      {"retries", offsetof(cb_runner_stat, retries), 1},
      {"consecutive_failures", offsetof(cb_runner_stat, consecutive_failures), 1},
      {"stuck", offsetof(cb_runner_stat, stuck), 1},
      {"poison", offsetof(cb_runner_stat, poison), 1},
      {"scheduled", offsetof(cb_runner_stat, scheduled), 1},
      {"applied", offsetof(cb_runner_stat, applied), 0},
      {"rejected", offsetof(cb_runner_stat, rejected), 0},
  };
  int worker = strcmp(s->kind, "worker") == 0;
  for (size_t i = 0; i < sizeof counters / sizeof counters[0]; i++) {
    if (counters[i].worker >= 0 && counters[i].worker != worker) continue;
    cbL_pushint64(L, (int64_t) * (const uint64_t *)((const char *)s + counters[i].offset));
    lua_setfield(L, -2, counters[i].name);
  }
  if (worker && s->last_success_at > 0) {
    lua_pushnumber(L, s->last_success_at);
    lua_setfield(L, -2, "last_success_at");
  }
}

void cbL_runner_open(lua_State *L, const cbL_runner_class *cls, lua_CFunction constructor) {
  static const luaL_Reg methods[] = {
      {"run", l_run},     {"start", l_start}, {"stop", l_stop}, {"health", l_health}, {"in_flight", l_in_flight},
      {"close", l_close}, {NULL, NULL},
  };
  luaL_newmetatable(L, cls->mt);
  lua_newtable(L);
  lua_pushlightuserdata(L, (void *)cls);
  luaL_setfuncs(L, methods, 1); /* each method knows its class */
  lua_setfield(L, -2, "__index");
  lua_pushlightuserdata(L, (void *)cls);
  lua_pushcclosure(L, l_close, 1);
  lua_setfield(L, -2, "__gc");
#if LUA_VERSION_NUM >= 504
  lua_pushlightuserdata(L, (void *)cls);
  lua_pushcclosure(L, l_close, 1); /* a <close> variable ends the object like the GC */
  lua_setfield(L, -2, "__close");
#endif
  lua_pop(L, 1);
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_getfield(L, -1, "__index");
  lua_pushcfunction(L, constructor);
  lua_setfield(L, -2, cls->type);
  lua_pop(L, 2);
}
