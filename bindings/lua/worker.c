/* commandbus Lua binding: workers, `bus:worker{...}`.
 *
 * handlers = "module.name": each lane thread loads the module in its own
 * lua_State (true parallelism); handlers = {Type = fn, ...}: handlers run on
 * the thread that calls worker:run(), while the loop thread keeps fetching
 * and acknowledging. A handler is fn(cmd, ctx): it returns a result (table
 * or nil) or raises; commandbus.transient/permanent/business_rule errors say
 * what kind of failure it was, anything else counts as transient. */
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/log.h"
#include "commandbus/worker.h"

#define WORKER_MT "commandbus.worker"
#define CTX_MT "commandbus.handler_context"

typedef struct cbL_worker {
  cb_worker *w;
  int bus_ref;
  int handlers_ref; /* table mode: the handlers table; LUA_NOREF in module mode */
  char *module;     /* module mode */
  int running;      /* run() or start() was called (a worker runs once) */
  int in_run;       /* run() has not returned yet */
  int close_pending; /* close() was called from inside run() */
  cbL_lanes *background; /* start(): the lanes running while the caller goes on */
} cbL_worker;

typedef struct handler_ctx {
  cb_worker *w;
  cb_work *work; /* NULL once the handler returned */
} handler_ctx;

static cbL_worker *check_worker(lua_State *L) { return luaL_checkudata(L, 1, WORKER_MT); }

/* ---- running one handler (any thread, any state) ------------------------------- */

static handler_ctx *check_ctx(lua_State *L) {
  handler_ctx *c = luaL_checkudata(L, 1, CTX_MT);
  if (c->work == NULL) luaL_error(L, "the handler context is no longer valid (its handler returned)");
  return c;
}

/* ctx:extend_visibility(seconds) -> true | nil, err */
static int ctx_extend_visibility(lua_State *L) {
  handler_ctx *c = check_ctx(L);
  double seconds;
  if (!cbL_arg_number(L, 2, "seconds", CBL_TIMING_MIN, CBL_TIMING_MAX, &seconds)) return 2;
  cb_err err;
  if (cb_worker_extend_visibility(c->w, c->work, seconds, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* ctx:stop_worker(): asks the worker running this handler to stop. */
static int ctx_stop_worker(lua_State *L) {
  cb_worker_stop(check_ctx(L)->w);
  return 0;
}

static void open_ctx(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"extend_visibility", ctx_extend_visibility},
      {"stop_worker", ctx_stop_worker},
      {NULL, NULL},
  };
  luaL_newmetatable(L, CTX_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

static void set_string(lua_State *L, const char *k, const char *v) {
  if (v == NULL) return;
  lua_pushstring(L, v);
  lua_setfield(L, -2, k);
}

static void push_command(lua_State *L, const cb_work *work) {
  lua_createtable(L, 0, 9);
  set_string(L, "id", work->command_id);
  set_string(L, "type", work->command_type);
  if (!cbL_json_decode(L, work->data_json)) {
    lua_pop(L, 1);
    lua_newtable(L);
  }
  lua_setfield(L, -2, "data");
  lua_pushinteger(L, work->attempt);
  lua_setfield(L, -2, "attempt");
  lua_pushinteger(L, work->max_attempts);
  lua_setfield(L, -2, "max_attempts");
  set_string(L, "correlation_id", work->correlation_id);
  set_string(L, "reply_to", work->reply_to);
  set_string(L, "batch_id", work->batch_id);
  cbL_pushint64(L, work->msg_id);
  lua_setfield(L, -2, "msg_id");
}

static int traceback(lua_State *L) {
  if (lua_type(L, 1) != LUA_TSTRING) return 1; /* error objects travel as they are */
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}

/* The string field k of the table at idx, made storable (a handler's text
 * may hold anything), left on the stack; NULL, nothing pushed, when it is
 * not a string. */
static const char *string_field(lua_State *L, int idx, const char *k) {
  lua_getfield(L, idx, k);
  if (lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    return NULL;
  }
  const char *s = cbL_storable_text(L, -1);
  lua_remove(L, -2);
  return s;
}

/* Reads a raised error value (at the top) into the work's outcome. */
static void classify_error(lua_State *L, cb_work *work) {
  int idx = lua_gettop(L);
  if (lua_istable(L, idx)) {
    const char *kind = string_field(L, idx, "kind");
    int outcome = !kind                              ? CB_OUTCOME_NONE
                  : strcmp(kind, "transient") == 0     ? CB_OUTCOME_TRANSIENT
                  : strcmp(kind, "permanent") == 0     ? CB_OUTCOME_PERMANENT
                  : strcmp(kind, "business_rule") == 0 ? CB_OUTCOME_BUSINESS_RULE
                                                       : CB_OUTCOME_NONE;
    if (outcome != CB_OUTCOME_NONE) {
      const char *details = NULL;
      lua_getfield(L, idx, "details");
      if (!lua_isnil(L, -1)) {
        if (cbL_json_encode(L, -1)) details = lua_tostring(L, -1);
      }
      cb_work_fail(work, outcome, string_field(L, idx, "code"), string_field(L, idx, "message"), details);
      lua_settop(L, idx);
      return;
    }
  }
  cbL_tostring(L, idx);
  const char *msg = cbL_storable_text(L, -1);
  cb_work_fail(work, CB_OUTCOME_TRANSIENT, "HANDLER_ERROR", msg, NULL);
  lua_settop(L, idx);
}

/* Runs the handler for work from the handlers table at index `handlers` and
 * sets the outcome. Leaves the stack as it found it. */
static void run_handler(lua_State *L, int handlers, cb_worker *w, cb_work *work) {
  int top = lua_gettop(L);
  lua_pushcfunction(L, traceback);
  lua_getfield(L, handlers, work->command_type);
  if (!lua_isfunction(L, -1)) {
    char msg[256];
    snprintf(msg, sizeof msg, "no handler for command type `%s`", work->command_type);
    cb_work_fail(work, CB_OUTCOME_PERMANENT, "NO_HANDLER", msg, NULL);
    cb_log(CB_LOG_WARN, "worker %s: %s (command %s goes to the troubleshooting queue)", cb_worker_domain(w), msg,
           work->command_id);
    lua_settop(L, top);
    return;
  }
  push_command(L, work);
  handler_ctx *ctx = lua_newuserdata(L, sizeof *ctx);
  ctx->w = w;
  ctx->work = work;
  luaL_getmetatable(L, CTX_MT);
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  int ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (lua_pcall(L, 2, 1, top + 1) != 0) {
    classify_error(L, work);
  } else if (lua_isnil(L, -1)) {
    cb_work_succeed(work, NULL);
  } else if (cbL_json_encode(L, -1)) {
    cb_work_succeed(work, lua_tostring(L, -1));
  } else {
    cb_work_fail(work, CB_OUTCOME_PERMANENT, "BAD_RESULT", lua_tostring(L, -1), NULL);
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, ctx_ref);
  ((handler_ctx *)lua_touserdata(L, -1))->work = NULL; /* a kept ctx cannot reach freed work */
  luaL_unref(L, LUA_REGISTRYINDEX, ctx_ref);
  lua_settop(L, top);
}

/* The loop of one lane: take, run, hand back, until the worker ends the lane.
 * Without a state (the module failed to load) every command fails
 * transiently, so that nothing waits forever. */
static void lane_loop(lua_State *L, int handlers, cb_worker *w, int lane, lua_State *tick_state, int tick_idx,
                      int tick_ms, int bus_ref) {
  cb_work *work;
  for (;;) {
    int n = cb_worker_take(w, lane, &work, 1, tick_state ? tick_ms : 1000);
    if (n < 0) break;
    if (n > 0) {
      if (L) run_handler(L, handlers, w, work);
      else cb_work_fail(work, CB_OUTCOME_TRANSIENT, "HANDLER_UNAVAILABLE", "the handler module failed to load", NULL);
      cb_worker_done(w, work);
    }
    /* Table mode: the caller's tick runs between handlers. */
    if (tick_state && !cbL_tick(tick_state, tick_idx, bus_ref, cb_worker_domain(w))) cb_worker_stop(w);
  }
}

static void module_lane(lua_State *L, int lane, void *arg) {
  cb_worker *w = arg;
  if (L && !lua_istable(L, 1)) {
    cb_log(CB_LOG_ERROR, "worker %s: the handler module did not return a table", cb_worker_domain(w));
    L = NULL;
  }
  lane_loop(L, 1, w, lane, NULL, 0, 0, LUA_NOREF);
}

static int runner_lanes(void *w) { return cb_worker_lanes(w); }
static int runner_start(void *w, cb_err *err) { return cb_worker_start(w, err); }
static void runner_stop(void *w) { cb_worker_stop(w); }
static int runner_wait(void *w, int timeout_ms) { return cb_worker_wait(w, timeout_ms); }
static const cbL_runner_ops runner = {runner_lanes, runner_start, runner_stop, runner_wait, module_lane};

/* ---- the worker object ---------------------------------------------------------------- */

/* The timing options of the worker at idx (ranges in the README). */
static int timing_options(lua_State *L, int idx, cb_worker_options *o) {
  return cbL_runner_options(L, idx, &o->lanes, &o->visibility_timeout, &o->statement_timeout, &o->poll_interval) &&
         cbL_opt_number(L, idx, "drain_timeout", o->drain_timeout, 0, CBL_TIMING_MAX, &o->drain_timeout);
}

/* retry = {backoff = {seconds, ...}} of the options at idx. */
static int retry_option(lua_State *L, int idx, cb_worker_options *o) {
  lua_getfield(L, idx, "retry");
  if (!lua_isnil(L, -1)) {
    if (!lua_istable(L, -1)) luaL_error(L, "bad option 'retry': table expected, got %s", luaL_typename(L, -1));
    lua_getfield(L, -1, "backoff");
    if (!lua_isnil(L, -1)) {
      if (!lua_istable(L, -1))
        luaL_error(L, "bad option 'retry.backoff': list of seconds expected, got %s", luaL_typename(L, -1));
      int n = (int)lua_rawlen(L, -1);
      if (n > CB_MAX_BACKOFF) {
        cbL_pusherrorcode(L, CB_EINVAL, "option 'retry.backoff' has %d entries; at most %d allowed", n, CB_MAX_BACKOFF);
        return 0;
      }
      o->nbackoff = n;
      for (int i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "retry.backoff[%d]", i + 1);
        lua_rawgeti(L, -1, i + 1);
        if (!cbL_number_at(L, -1, name, 0, CBL_TIMING_MAX, &o->backoff[i])) return 0;
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return 1;
}

/* bus:worker{domain=, handlers=, concurrency=, visibility_timeout=30,
 *            statement_timeout=25, poll_interval=1, drain_timeout=30,
 *            retry={max_attempts=, backoff={10, 60, 300}}}
 * -> worker | nil, err */
static int l_bus_worker(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  cb_worker_options o;
  cb_worker_options_init(&o);
  int handlers_type;
  if (!cbL_field_text(L, 2, "domain", &o.domain) || !cbL_opt_module(L, 2, "handlers", &handlers_type)) return 2;
  int handlers_idx = lua_gettop(L);
  if (!timing_options(L, 2, &o) || !retry_option(L, 2, &o)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  if (handlers_type == LUA_TTABLE) o.lanes = 1; /* handlers run on the caller's thread */

  cbL_worker *lw = lua_newuserdata(L, sizeof *lw);
  memset(lw, 0, sizeof *lw);
  lw->bus_ref = lw->handlers_ref = LUA_NOREF;
  luaL_getmetatable(L, WORKER_MT);
  lua_setmetatable(L, -2);
  cb_err err;
  if (cb_worker_new(rt, &o, &lw->w, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushvalue(L, 1);
  lw->bus_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (handlers_type == LUA_TTABLE) {
    lua_pushvalue(L, handlers_idx);
    lw->handlers_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  } else {
    lw->module = strdup(lua_tostring(L, handlers_idx));
  }
  return 1;
}

/* worker:run{tick=fn, tick_interval=0.5}: runs until stopped (worker:stop(),
 * ctx:stop_worker(), SIGINT/SIGTERM, or tick returning false); drains what is
 * in flight, then returns true. */
static int l_gc(lua_State *L);

static int l_run(lua_State *L) {
  cbL_worker *lw = check_worker(L);
  int tick_ms;
  if (!cbL_run_options(L, &tick_ms)) return 2;
  if (lw->w == NULL || lw->running) return cbL_pusherrorcode(L, CB_ESTATE, "the worker already ran");
  lua_settop(L, 2);
  if (lua_istable(L, 2)) lua_getfield(L, 2, "tick");
  else lua_pushnil(L);
  if (!lua_isnil(L, 3) && !lua_isfunction(L, 3)) luaL_error(L, "bad option 'tick': function expected");
  cb_worker *w = lw->w;
  lw->running = 1;
  lw->in_run = 1;
  cb_worker_watch_signals(w);
  cbL_lanes *lanes;
  if (!cbL_runner_start(L, &runner, w, lw->module, &lanes)) {
    lw->in_run = 0;
    return 2;
  }
  if (lw->module) {
    while (!cb_worker_wait(w, tick_ms))
      if (!cbL_tick(L, 3, lw->bus_ref, cb_worker_domain(w))) cb_worker_stop(w);
    cbL_lanes_join(lanes);
  } else {
    lua_rawgeti(L, LUA_REGISTRYINDEX, lw->handlers_ref);
    int handlers = lua_gettop(L);
    lane_loop(L, handlers, w, 0, L, 3, tick_ms, lw->bus_ref);
    cb_worker_wait(w, -1);
  }
  cbL_tick(L, 0, lw->bus_ref, cb_worker_domain(w)); /* events of the drain reach the sink too */
  lw->in_run = 0;
  if (lw->close_pending) {
    lua_settop(L, 1);
    l_gc(L);
  }
  lua_settop(L, 1);
  lua_pushboolean(L, 1);
  return 1;
}

/* worker:start() -> true | nil, err: runs the worker in the background (its
 * handler module on lane threads) while the caller goes on, as inside nginx.
 * worker:stop() asks it to stop; worker:close() stops it, waits for the
 * drain and joins the lanes. */
static int l_start(lua_State *L) {
  cbL_worker *lw = check_worker(L);
  if (lw->w == NULL || lw->running) return cbL_pusherrorcode(L, CB_ESTATE, "the worker already ran");
  if (lw->module == NULL)
    luaL_error(L, "worker:start() runs handlers on lane threads: give handlers as a module name (a handlers table "
                  "runs only on run()'s thread)");
  lw->running = 1;
  if (!cbL_runner_start(L, &runner, lw->w, lw->module, &lw->background)) return 2;
  lua_pushboolean(L, 1);
  return 1;
}

static int l_stop(lua_State *L) {
  cbL_worker *lw = check_worker(L);
  if (lw->w) cb_worker_stop(lw->w);
  return 0;
}

/* worker:health() -> {state=, successes=, failures=, retries=,
 *                     consecutive_failures=, stuck=, poison=, last_success_at=, in_flight=} */
static int l_health(lua_State *L) {
  cbL_worker *lw = check_worker(L);
  if (lw->w == NULL) return cbL_pusherrorcode(L, CB_ECLOSED, "the worker is closed");
  cb_worker_health h;
  cb_worker_health_get(lw->w, &h);
  lua_createtable(L, 0, 9);
  set_string(L, "state", h.state);
  cbL_pushint64(L, (int64_t)h.successes);
  lua_setfield(L, -2, "successes");
  cbL_pushint64(L, (int64_t)h.failures);
  lua_setfield(L, -2, "failures");
  cbL_pushint64(L, (int64_t)h.retries);
  lua_setfield(L, -2, "retries");
  cbL_pushint64(L, (int64_t)h.consecutive_failures);
  lua_setfield(L, -2, "consecutive_failures");
  cbL_pushint64(L, (int64_t)h.stuck);
  lua_setfield(L, -2, "stuck");
  cbL_pushint64(L, (int64_t)h.poison);
  lua_setfield(L, -2, "poison");
  if (h.last_success_at > 0) {
    lua_pushnumber(L, h.last_success_at);
    lua_setfield(L, -2, "last_success_at");
  }
  lua_pushinteger(L, h.in_flight);
  lua_setfield(L, -2, "in_flight");
  return 1;
}

static int l_in_flight(lua_State *L) {
  cbL_worker *lw = check_worker(L);
  lua_pushinteger(L, lw->w ? cb_worker_in_flight(lw->w) : 0);
  return 1;
}

static int l_gc(lua_State *L) {
  cbL_worker *lw = check_worker(L);
  if (lw->in_run) {
    /* Called from a tick or a table-mode handler: run() still uses the
     * worker. Stop it now, free it when run() returns. */
    if (lw->w) cb_worker_stop(lw->w);
    lw->close_pending = 1;
    return 0;
  }
  if (lw->background) {
    cbL_runner_finish(&runner, lw->w, lw->background);
    lw->background = NULL;
  }
  if (lw->w) {
    cb_worker_free(lw->w);
    lw->w = NULL;
  }
  luaL_unref(L, LUA_REGISTRYINDEX, lw->handlers_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, lw->bus_ref);
  lw->handlers_ref = lw->bus_ref = LUA_NOREF;
  free(lw->module);
  lw->module = NULL;
  return 0;
}

void cbL_open_worker(lua_State *L) {
  open_ctx(L);
  static const luaL_Reg methods[] = {
      {"run", l_run}, {"start", l_start}, {"stop", l_stop}, {"health", l_health}, {"in_flight", l_in_flight}, {"close", l_gc}, {NULL, NULL},
  };
  cbL_new_class(L, WORKER_MT, methods, l_gc, NULL);
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_getfield(L, -1, "__index");
  lua_pushcfunction(L, l_bus_worker);
  lua_setfield(L, -2, "worker");
  lua_pop(L, 2);
}
