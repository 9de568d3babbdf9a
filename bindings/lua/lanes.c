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
