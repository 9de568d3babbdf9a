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

typedef struct handler_ctx {
  cb_worker *w;
  cb_work *work; /* NULL once the handler returned */
} handler_ctx;

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
  cb_engine_stop(cb_worker_engine(check_ctx(L)->w));
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

/* lua_pushlstring rather than lua_pushstring: the latter first looks the
 * pointer up in Lua 5.4's string cache, comparing the text with what is
 * cached there, which a fresh id never is. */
static void set_string(lua_State *L, const char *k, const char *v) {
  if (v == NULL) return;
  lua_pushlstring(L, v, strlen(v));
  lua_setfield(L, -2, k);
}

/* The command table a handler gets. Sized for exactly its fields: a hash
 * part holds a power of two, so the hint of all nine (16 slots) would
 * double the table's allocation whenever one of the three optional fields
 * is absent, which for most commands one is (reply_to). Returns 0, with the
 * decoder's error in the table's place, when lua-cjson cannot decode the
 * data (another producer may store JSON nested deeper than it goes). */
static int push_command(lua_State *L, const cb_work *work) {
  lua_createtable(L, 0, 6 + !!work->correlation_id + !!work->reply_to + !!work->batch_id);
  set_string(L, "id", work->command_id);
  set_string(L, "type", work->command_type);
  if (!cbL_json_decode(L, work->data_json)) {
    lua_remove(L, -2);
    return 0;
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
  return 1;
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
    int outcome = !kind                                ? CB_OUTCOME_NONE
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

/* classify_error under lua_pcall, with the error value at 1 and the work at
 * 2: reading the value may raise (an object whose __index or __tostring
 * raises), and on a lane's thread nothing catches that but a panic. */
static int classify_protected(lua_State *L) {
  cb_work *work = lua_touserdata(L, 2);
  lua_settop(L, 1);
  classify_error(L, work);
  return 0;
}

/* Runs the handler for work from the handlers table at index `handlers` and
 * sets the outcome. Leaves the stack as it found it. */
static void run_handler(lua_State *L, int handlers, cb_worker *w, cb_work *work) {
  int top = lua_gettop(L);
  lua_pushcfunction(L, traceback);
  lua_getfield(L, handlers, work->command_type);
  if (!lua_isfunction(L, -1)) {
    /* Whole: the type is UTF-8 from the database, and a cut at a fixed size
     * could split a character, which PostgreSQL refuses to store. */
    const char *msg = lua_pushfstring(L, "no handler for command type `%s`", work->command_type);
    cb_work_fail(work, CB_OUTCOME_PERMANENT, "NO_HANDLER", msg, NULL);
    cb_log(CB_LOG_WARN, "worker %s: %s (command %s goes to the troubleshooting queue)",
           cb_engine_domain(cb_worker_engine(w)), msg, work->command_id);
    lua_settop(L, top);
    return;
  }
  /* The context stays on the stack under the call (at top + 2, the handler
   * moved above it): it is invalidated when the handler returns, with no
   * registry reference to take and give back for each command. */
  handler_ctx *ctx = lua_newuserdata(L, sizeof *ctx);
  ctx->w = w;
  ctx->work = work;
  luaL_getmetatable(L, CTX_MT);
  lua_setmetatable(L, -2);
  lua_insert(L, -2); /* traceback, ctx, handler */
  if (!push_command(L, work)) {
    /* Set aside: a handler run on other data than the command's could act
     * on it. The decoder's message says why (nesting depth, position). */
    lua_pushfstring(L, "the command's data cannot be decoded: %s", cbL_tostring(L, -1));
    const char *msg = cbL_storable_text(L, -1);
    cb_work_fail(work, CB_OUTCOME_PERMANENT, "DATA_UNDECODABLE", msg, NULL);
    cb_log(CB_LOG_WARN, "worker %s: command %s: %s (it goes to the troubleshooting queue)",
           cb_engine_domain(cb_worker_engine(w)), work->command_id, msg);
    ctx->work = NULL;
    lua_settop(L, top);
    return;
  }
  lua_pushvalue(L, top + 2);
  if (lua_pcall(L, 2, 1, top + 1) != 0) {
    lua_pushcfunction(L, classify_protected);
    lua_insert(L, -2);
    lua_pushlightuserdata(L, work);
    if (lua_pcall(L, 2, 0, 0) != 0) { /* classify_error sets no outcome before it has read everything */
      lua_pushfstring(L, "the handler raised an error value that cannot be read: %s",
                      lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1));
      cb_work_fail(work, CB_OUTCOME_TRANSIENT, "HANDLER_ERROR", cbL_storable_text(L, -1), NULL);
    }
  } else if (lua_isnil(L, -1)) {
    cb_work_succeed(work, NULL);
  } else if (cbL_json_encode(L, -1)) {
    cb_work_succeed(work, lua_tostring(L, -1));
  } else {
    cb_work_fail(work, CB_OUTCOME_PERMANENT, "BAD_RESULT", lua_tostring(L, -1), NULL);
  }
  ctx->work = NULL; /* a kept ctx cannot reach freed work */
  lua_settop(L, top);
}

/* One round of a lane: takes a command, runs its handler, hands it back.
 * Without a state (the module failed to load) every command fails
 * transiently, so that nothing waits forever. */
static int lane_round(lua_State *L, int handlers, void *worker, int lane, int timeout_ms) {
  cb_worker *w = worker;
  cb_work *work;
  int n = cb_worker_take(w, lane, &work, 1, timeout_ms);
  if (n > 0) {
    if (L) run_handler(L, handlers, w, work);
    else cb_work_fail(work, CB_OUTCOME_TRANSIENT, "HANDLER_UNAVAILABLE", "the handler module failed to load", NULL);
    cb_worker_done(w, work);
  }
  return n >= 0;
}

/* The worker's own field of health(): what its retention passes did. */
static void health(lua_State *L, void *worker) {
  cb_worker_health h;
  cb_worker_health_get(worker, &h);
  cbL_push_upkeep_stats(L, &h.upkeep);
  lua_setfield(L, -2, "retention");
  lua_pushinteger(L, h.held);
  lua_setfield(L, -2, "held");
}

static void free_worker(void *w) { cb_worker_free(w); }

static const cbL_runner_class worker_class = {WORKER_MT,   "worker",   "worker", "handlers",
                                              free_worker, lane_round, health};

/* ---- the worker object ---------------------------------------------------------------- */

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

/* The background jobs of the options at idx: retention = false, true or
 * {interval = seconds}; schedules = false or true. */
static int upkeep_options(lua_State *L, int idx, cb_worker_options *o) {
  lua_getfield(L, idx, "retention");
  int type = lua_type(L, -1);
  int ok = 1;
  if (type == LUA_TBOOLEAN) o->retention = lua_toboolean(L, -1);
  else if (type == LUA_TTABLE)
    ok = cbL_opt_number(L, lua_gettop(L), "interval", o->retention_interval, CBL_TIMING_MIN, CBL_TIMING_MAX,
                        &o->retention_interval);
  else if (type != LUA_TNIL)
    luaL_error(L, "bad option 'retention': false or {interval = seconds} expected, got %s", lua_typename(L, type));
  if (!ok) {
    lua_remove(L, -3); /* the retention table, under nil, err */
    return 0;
  }
  lua_pop(L, 1);
  o->schedules = cbL_opt_boolean(L, idx, "schedules", o->schedules);
  return 1;
}

/* bus:worker{domain=, handlers=, concurrency=, visibility_timeout=30,
 *            statement_timeout=25, poll_interval=1, drain_timeout=30,
 *            retry={max_attempts=, backoff={10, 60, 300}},
 *            retention={interval=60} or false, schedules=true}
 * -> worker | nil, err */
static int l_bus_worker(lua_State *L) {
  cb_worker_options o;
  cb_worker_options_init(&o);
  cbL_runner *lr = cbL_runner_begin(L, &worker_class, &o.domain, &o.lanes, &o.visibility_timeout, &o.statement_timeout,
                                    &o.poll_interval);
  if (lr == NULL || !cbL_opt_number(L, 2, "drain_timeout", o.drain_timeout, 0, CBL_TIMING_MAX, &o.drain_timeout) ||
      !retry_option(L, 2, &o) || !upkeep_options(L, 2, &o))
    return 2;
  cb_worker *w;
  cb_err err;
  if (cb_worker_new(cbL_runner_runtime(lr), &o, &w, &err) != CB_OK) return cbL_pusherror(L, &err);
  return cbL_runner_adopt(L, lr, w, cb_worker_engine(w));
}

void cbL_open_worker(lua_State *L) {
  open_ctx(L);
  cbL_runner_open(L, &worker_class, l_bus_worker);
}
