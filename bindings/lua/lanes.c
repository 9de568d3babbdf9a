/* commandbus Lua binding: lane threads, each with a lua_State of its own.
 *
 * A lane state is a fresh interpreter with the standard libraries and the
 * creating state's package.path/cpath, which loads one module (the handlers
 * or process managers) and keeps its return value. Lanes are joined before
 * their owner is freed. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

#include "binding.h"
#include "commandbus/log.h"
#include "commandbus/thread.h"

struct cbL_lanes {
  int count;
  pthread_t *threads;
  int *started;
  char *module;
  char *path, *cpath;
  cbL_lane_fn fn;
  void *arg;
};

typedef struct lane_start {
  cbL_lanes *lanes;
  int index;
} lane_start;

static char *field_copy(lua_State *L, const char *lib, const char *field) {
  lua_getglobal(L, lib);
  char *s = NULL;
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, field);
    if (lua_isstring(L, -1)) s = strdup(lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return s;
}

/* A new state that has loaded the module; its value is left on the stack
 * (index 1). NULL (and a log line) when the module fails to load. */
static lua_State *lane_state(cbL_lanes *lanes, int index) {
  lua_State *L = luaL_newstate();
  if (L == NULL) return NULL;
  luaL_openlibs(L);
  lua_getglobal(L, "package");
  if (lanes->path) {
    lua_pushstring(L, lanes->path);
    lua_setfield(L, -2, "path");
  }
  if (lanes->cpath) {
    lua_pushstring(L, lanes->cpath);
    lua_setfield(L, -2, "cpath");
  }
  lua_pop(L, 1);
  /* The binding first: its JSON functions live in each state's registry, and
   * a handler module need not require commandbus itself. */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "commandbus.core");
  if (lua_pcall(L, 1, 0, 0) != 0) {
    cb_log(CB_LOG_ERROR, "lane %d: cannot load commandbus.core: %s", index, lua_tostring(L, -1));
    lua_close(L);
    return NULL;
  }
  lua_getglobal(L, "require");
  lua_pushstring(L, lanes->module);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    cb_log(CB_LOG_ERROR, "lane %d: cannot load module `%s`: %s", index, lanes->module, lua_tostring(L, -1));
    lua_close(L);
    return NULL;
  }
  return L;
}

static void *lane_main(void *arg) {
  lane_start *s = arg;
  cbL_lanes *lanes = s->lanes;
  int index = s->index;
  free(s);
  lua_State *L = lane_state(lanes, index);
  lanes->fn(L, index, lanes->arg); /* L NULL: the lane must still drain its work */
  if (L) lua_close(L);
  return NULL;
}

cbL_lanes *cbL_lanes_start(lua_State *L, int count, const char *module, cbL_lane_fn fn, void *arg, cb_err *err) {
  cbL_lanes *lanes = calloc(1, sizeof *lanes);
  if (lanes == NULL) {
    cb_err_set(err, CB_ENOMEM, "out of memory");
    return NULL;
  }
  lanes->count = count;
  lanes->threads = calloc((size_t)count, sizeof *lanes->threads);
  lanes->started = calloc((size_t)count, sizeof *lanes->started);
  lanes->module = strdup(module);
  lanes->path = field_copy(L, "package", "path");
  lanes->cpath = field_copy(L, "package", "cpath");
  lanes->fn = fn;
  lanes->arg = arg;
  if (!lanes->threads || !lanes->started || !lanes->module) {
    cbL_lanes_join(lanes);
    cb_err_set(err, CB_ENOMEM, "out of memory");
    return NULL;
  }
  for (int i = 0; i < count; i++) {
    lane_start *s = malloc(sizeof *s);
    if (s == NULL) break;
    s->lanes = lanes;
    s->index = i;
    if (cb_thread_start(&lanes->threads[i], lane_main, s) != 0) {
      free(s);
      cb_log(CB_LOG_ERROR, "cannot start lane thread %d of %d", i, count);
      break;
    }
    lanes->started[i] = 1;
  }
  return lanes;
}

void cbL_lanes_join(cbL_lanes *lanes) {
  if (lanes == NULL) return;
  for (int i = 0; i < lanes->count; i++)
    if (lanes->started && lanes->started[i]) pthread_join(lanes->threads[i], NULL);
  free(lanes->threads);
  free(lanes->started);
  free(lanes->module);
  free(lanes->path);
  free(lanes->cpath);
  free(lanes);
}

int cbL_lanes_running(const cbL_lanes *lanes) {
  int n = 0;
  for (int i = 0; lanes && i < lanes->count; i++) n += lanes->started[i];
  return n;
}

/* A start that failed: the component is stopped, its lanes end and are
 * joined. Pushes nil, err; returns 0. */
static int abandon(lua_State *L, const cbL_runner_ops *ops, void *component, cbL_lanes *lanes, const cb_err *err) {
  ops->stop(component);
  cbL_lanes_join(lanes);
  cbL_pusherror(L, err);
  return 0;
}

int cbL_runner_start(lua_State *L, const cbL_runner_ops *ops, void *component, const char *module,
                     cbL_lanes **lanes) {
  cb_err err;
  int want = ops->lanes(component);
  *lanes = NULL;
  if (module) {
    cbL_lanes *started = cbL_lanes_start(L, want, module, ops->lane, component, &err);
    if (started == NULL) return abandon(L, ops, component, NULL, &err);
    int running = cbL_lanes_running(started);
    if (running != want) { /* a lane nobody runs would hold its work forever: refuse to start */
      cb_err_set(&err, CB_ENOMEM, "could start only %d of %d lane threads", running, want);
      return abandon(L, ops, component, started, &err);
    }
    *lanes = started;
  }
  if (ops->start(component, &err) != CB_OK) {
    abandon(L, ops, component, *lanes, &err);
    *lanes = NULL;
    return 0;
  }
  return 1;
}

void cbL_runner_finish(const cbL_runner_ops *ops, void *component, cbL_lanes *lanes) {
  ops->stop(component);
  ops->wait(component, -1);
  cbL_lanes_join(lanes);
}

int cbL_tick(lua_State *L, int idx, int bus_ref, const char *who) {
  if (bus_ref != LUA_NOREF && bus_ref != LUA_REFNIL) { /* the bus's process event sink, if any */
    lua_rawgeti(L, LUA_REGISTRYINDEX, bus_ref);
    cbL_dispatch_events(L, -1, 1 << 30);
    lua_pop(L, 1);
  }
  if (idx == 0 || lua_isnoneornil(L, idx)) return 1;
  lua_pushvalue(L, idx);
  int keep = 1;
  if (lua_pcall(L, 0, 1, 0) != 0) {
    cb_log(CB_LOG_ERROR, "%s: run()'s tick raised: %s; stopping", who, lua_tostring(L, -1));
    keep = 0;
  } else if (!lua_isnil(L, -1) && !lua_toboolean(L, -1)) {
    keep = 0;
  }
  lua_pop(L, 1);
  return keep;
}

int cbL_run_options(lua_State *L, int *tick_ms) {
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

int cbL_runner_options(lua_State *L, int idx, int *lanes, double *visibility_timeout, double *statement_timeout,
                       double *poll_interval) {
  return cbL_opt_int(L, idx, "concurrency", 0, 1, CBL_THREADS_MAX, lanes) &&
         cbL_opt_number(L, idx, "visibility_timeout", *visibility_timeout, CBL_TIMING_MIN, CBL_TIMING_MAX,
                        visibility_timeout) &&
         cbL_opt_number(L, idx, "statement_timeout", *statement_timeout, CBL_TIMING_MIN, CBL_TIMING_MAX,
                        statement_timeout) &&
         cbL_opt_number(L, idx, "poll_interval", *poll_interval, CBL_TIMING_MIN, CBL_TIMING_MAX, poll_interval);
}
