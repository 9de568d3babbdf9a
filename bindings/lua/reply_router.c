/* commandbus Lua binding: the process reply router, `bus:reply_router{...}`.
 *
 * managers = "module.name": each lane thread loads the module in its own
 * lua_State (a table from process type to definition); managers = a table:
 * replies are handled on the thread that calls run(). Each lane takes a batch
 * of replies, hands each to commandbus.process.decide, and applies the
 * decisions together in one transaction (a reply whose batch fails is applied
 * again on its own: see cb_reply_router_apply_many). */
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/log.h"
#include "commandbus/reply_router.h"

#define REPLY_ROUTER_MT "commandbus.reply_router"

typedef struct cbL_reply_router {
  cb_reply_router *r;
  int bus_ref;
  int managers_ref; /* table mode */
  char *module;     /* module mode */
  int ran, in_run, close_pending;
  cbL_lanes *background; /* start(): the lanes running while the caller goes on */
} cbL_reply_router;

static cbL_reply_router *check_router(lua_State *L) { return luaL_checkudata(L, 1, REPLY_ROUTER_MT); }

static int decode_into(lua_State *L, const char *json) {
  if (cbL_json_decode(L, json)) return 1;
  lua_pop(L, 1);
  lua_newtable(L);
  return 0;
}

/* The string field k of the table at idx, or NULL; the string is also stored
 * in the anchor table (at the next slot) so that it outlives the call even if
 * a later hook changes the table. */
static const char *anchored_field(lua_State *L, int idx, const char *k, int anchor, int *slot) {
  lua_getfield(L, idx, k);
  const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
  if (s) lua_rawseti(L, anchor, ++*slot);
  else lua_pop(L, 1);
  return s;
}

/* Encodes the value at idx (a table, or nil meaning {} when if_nil is given);
 * the JSON is anchored as anchored_field's strings are. NULL (the message
 * left on the stack) when it cannot be encoded. */
static const char *anchored_json(lua_State *L, int idx, const char *if_nil, int anchor, int *slot) {
  if (if_nil && lua_isnil(L, idx)) return if_nil;
  if (!cbL_json_encode(L, idx)) return NULL;
  const char *json = lua_tostring(L, -1);
  lua_rawseti(L, anchor, ++*slot);
  return json;
}

/* Runs commandbus.process.decide (at index `decide`) on one reply with the
 * managers table at index `managers`, and fills *decision, whose strings are
 * kept alive by the anchor table. Returns 1 when decided; 0 when the reply
 * was rejected or released instead (and so consumed). Leaves the stack as
 * found. */
static int decide_reply(lua_State *L, int managers, int decide, int anchor, int *slot, cb_reply_router *r,
                        cb_reply *reply, cb_reply_decision *decision) {
  int top = lua_gettop(L);
  lua_getfield(L, managers, reply->process_type);
  if (lua_isnil(L, -1)) {
    char why[160];
    snprintf(why, sizeof why, "no process manager for type `%s`", reply->process_type);
    cb_reply_router_reject(r, reply, why);
    lua_settop(L, top);
    return 0;
  }
  int manager = lua_gettop(L);
  lua_pushvalue(L, decide);
  lua_pushvalue(L, manager);
  lua_createtable(L, 0, 4); /* p */
  lua_pushstring(L, reply->status);
  lua_setfield(L, -2, "status");
  lua_pushstring(L, reply->step_name);
  lua_setfield(L, -2, "step");
  decode_into(L, reply->state_json);
  lua_setfield(L, -2, "state");
  decode_into(L, reply->completed_steps_json);
  lua_setfield(L, -2, "completed_steps");
  decode_into(L, reply->message_json);
  if (lua_pcall(L, 3, 1, 0) != 0) {
    cb_log(CB_LOG_WARN, "reply router %s: a hook of process %s (%s) raised: %s; the reply comes back later",
           cb_reply_router_domain(r), reply->process_id, reply->process_type, cbL_tostring(L, -1));
    cb_reply_router_release(r, reply);
    lua_settop(L, top);
    return 0;
  }
  int d = lua_gettop(L);
  if (!lua_istable(L, d)) {
    cb_log(CB_LOG_WARN, "reply router %s: deciding about process %s returned %s, not a table; the reply comes back "
           "later", cb_reply_router_domain(r), reply->process_id, luaL_typename(L, d));
    cb_reply_router_release(r, reply);
    lua_settop(L, top);
    return 0;
  }
  memset(decision, 0, sizeof *decision);
  decision->status = anchored_field(L, d, "status", anchor, slot);
  decision->step = anchored_field(L, d, "step", anchor, slot);
  decision->error_code = anchored_field(L, d, "error_code", anchor, slot);
  decision->error_message = anchored_field(L, d, "error_message", anchor, slot);
  lua_getfield(L, d, "state");
  decision->state_json = anchored_json(L, -1, NULL, anchor, slot);
  if (decision->state_json == NULL) {
    cb_log(CB_LOG_WARN, "reply router %s: the state of process %s cannot be encoded: %s", cb_reply_router_domain(r),
           reply->process_id, lua_tostring(L, -1));
    cb_reply_router_release(r, reply);
    lua_settop(L, top);
    return 0;
  }
  lua_getfield(L, d, "command");
  if (lua_istable(L, -1)) {
    int cmd = lua_gettop(L);
    decision->next_type = anchored_field(L, cmd, "type", anchor, slot);
    lua_getfield(L, cmd, "data");
    decision->next_data_json = anchored_json(L, -1, "{}", anchor, slot);
    if (decision->next_data_json == NULL) decision->next_data_json = "{}";
  }
  lua_settop(L, top);
  return 1;
}

/* Decides each of n replies, then applies the decided ones together (one
 * transaction when all goes well; see cb_reply_router_apply_many). Every
 * reply is consumed. Leaves the stack as found. */
static void handle_replies(lua_State *L, int managers, cb_reply_router *r, cb_reply **replies, int n) {
  int top = lua_gettop(L);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "commandbus.process");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    cb_log(CB_LOG_ERROR, "reply router %s: cannot load commandbus.process: %s", cb_reply_router_domain(r),
           lua_tostring(L, -1));
    for (int i = 0; i < n; i++) cb_reply_router_release(r, replies[i]);
    lua_settop(L, top);
    return;
  }
  lua_getfield(L, -1, "decide");
  int decide = lua_gettop(L);
  lua_createtable(L, 8 * n, 0); /* anchor: the decisions' strings */
  int anchor = lua_gettop(L), slot = 0;
  cb_reply *decided[CB_REPLY_ROUTER_BATCH_MAX];
  cb_reply_decision decisions[CB_REPLY_ROUTER_BATCH_MAX];
  int m = 0;
  for (int i = 0; i < n; i++)
    if (decide_reply(L, managers, decide, anchor, &slot, r, replies[i], &decisions[m])) decided[m++] = replies[i];
  cb_err err;
  cb_reply_router_apply_many(r, decided, decisions, m, &err); /* consumes them; logs its own failures */
  lua_settop(L, top);
}

static void lane_loop(lua_State *L, int managers, cb_reply_router *r, int lane, int tick_idx, int tick_ms,
                      int bus_ref) {
  cb_reply *replies[CB_REPLY_ROUTER_BATCH_MAX];
  for (;;) {
    int ended;
    int n = cb_reply_router_take_many(r, lane, replies, CB_REPLY_ROUTER_BATCH_MAX, tick_idx ? tick_ms : 1000, &ended);
    if (ended) break;
    if (n > 0 && L) handle_replies(L, managers, r, replies, n);
    for (int i = 0; i < n && !L; i++) cb_reply_router_release(r, replies[i]); /* the managers module failed to load */
    if (tick_idx && !cbL_tick(L, tick_idx, bus_ref, cb_reply_router_domain(r))) cb_reply_router_stop(r);
  }
}

static void module_lane(lua_State *L, int lane, void *arg) {
  cb_reply_router *r = arg;
  if (L && !lua_istable(L, 1)) {
    cb_log(CB_LOG_ERROR, "reply router %s: the managers module did not return a table", cb_reply_router_domain(r));
    L = NULL;
  }
  lane_loop(L, 1, r, lane, 0, 0, LUA_NOREF);
}

static int runner_lanes(void *r) { return cb_reply_router_lanes(r); }
static int runner_start(void *r, cb_err *err) { return cb_reply_router_start(r, err); }
static void runner_stop(void *r) { cb_reply_router_stop(r); }
static int runner_wait(void *r, int timeout_ms) { return cb_reply_router_wait(r, timeout_ms); }
static const cbL_runner_ops runner = {runner_lanes, runner_start, runner_stop, runner_wait, module_lane};

/* bus:reply_router{domain=, reply_queue=, managers=, concurrency=,
 *                  poll_interval=1, visibility_timeout=30, statement_timeout=25} */
static int l_bus_reply_router(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  cb_reply_router_options o;
  cb_reply_router_options_init(&o);
  int managers_type;
  if (!cbL_field_text(L, 2, "domain", &o.domain) || !cbL_opt_text(L, 2, "reply_queue", NULL, &o.reply_queue) ||
      !cbL_runner_options(L, 2, &o.lanes, &o.visibility_timeout, &o.statement_timeout, &o.poll_interval) ||
      !cbL_opt_module(L, 2, "managers", &managers_type))
    return 2;
  int managers_idx = lua_gettop(L);
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  if (managers_type == LUA_TTABLE) o.lanes = 1;
  cbL_reply_router *lr = lua_newuserdata(L, sizeof *lr);
  memset(lr, 0, sizeof *lr);
  lr->bus_ref = lr->managers_ref = LUA_NOREF;
  luaL_getmetatable(L, REPLY_ROUTER_MT);
  lua_setmetatable(L, -2);
  cb_err err;
  if (cb_reply_router_new(rt, &o, &lr->r, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushvalue(L, 1);
  lr->bus_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (managers_type == LUA_TTABLE) {
    lua_pushvalue(L, managers_idx);
    lr->managers_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  } else {
    lr->module = strdup(lua_tostring(L, managers_idx));
  }
  return 1;
}

static int l_gc(lua_State *L);

/* router:run{tick=fn, tick_interval=0.5}: runs until stop(), SIGINT/SIGTERM
 * or tick returning false; drains what it took, then returns true. */
static int l_run(lua_State *L) {
  cbL_reply_router *lr = check_router(L);
  int tick_ms;
  if (!cbL_run_options(L, &tick_ms)) return 2;
  if (lr->r == NULL || lr->ran) return cbL_pusherrorcode(L, CB_ESTATE, "the reply router already ran");
  lua_settop(L, 2);
  if (lua_istable(L, 2)) lua_getfield(L, 2, "tick");
  else lua_pushnil(L);
  lr->ran = lr->in_run = 1;
  cb_reply_router *r = lr->r;
  cb_reply_router_watch_signals(r);
  cbL_lanes *lanes;
  if (!cbL_runner_start(L, &runner, r, lr->module, &lanes)) {
    lr->in_run = 0;
    return 2;
  }
  if (lr->module) {
    while (!cb_reply_router_wait(r, tick_ms))
      if (!cbL_tick(L, 3, lr->bus_ref, cb_reply_router_domain(r))) cb_reply_router_stop(r);
    cbL_lanes_join(lanes);
  } else {
    lua_rawgeti(L, LUA_REGISTRYINDEX, lr->managers_ref);
    lane_loop(L, lua_gettop(L), r, 0, 3, tick_ms, lr->bus_ref);
    cb_reply_router_wait(r, -1);
  }
  cbL_tick(L, 0, lr->bus_ref, cb_reply_router_domain(r)); /* events of the drain reach the sink too */
  lr->in_run = 0;
  if (lr->close_pending) {
    lua_settop(L, 1);
    l_gc(L);
  }
  lua_settop(L, 1);
  lua_pushboolean(L, 1);
  return 1;
}

/* router:start() -> true | nil, err: runs the router in the background (its
 * managers module on lane threads) while the caller goes on, as inside
 * nginx. router:stop() asks it to stop; router:close() stops it, waits for
 * the drain and joins the lanes. */
static int l_start(lua_State *L) {
  cbL_reply_router *lr = check_router(L);
  if (lr->r == NULL || lr->ran) return cbL_pusherrorcode(L, CB_ESTATE, "the reply router already ran");
  if (lr->module == NULL)
    luaL_error(L, "reply_router:start() runs managers on lane threads: give managers as a module name (a managers "
                  "table runs only on run()'s thread)");
  lr->ran = 1;
  if (!cbL_runner_start(L, &runner, lr->r, lr->module, &lr->background)) return 2;
  lua_pushboolean(L, 1);
  return 1;
}

static int l_stop(lua_State *L) {
  cbL_reply_router *lr = check_router(L);
  if (lr->r) cb_reply_router_stop(lr->r);
  return 0;
}

/* router:health() -> {state=, applied=, failures=, rejected=, in_flight=} */
static int l_health(lua_State *L) {
  cbL_reply_router *lr = check_router(L);
  if (lr->r == NULL) return cbL_pusherrorcode(L, CB_ECLOSED, "the reply router is closed");
  cb_reply_router_health h;
  cb_reply_router_health_get(lr->r, &h);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, h.state);
  lua_setfield(L, -2, "state");
  cbL_pushint64(L, (int64_t)h.applied);
  lua_setfield(L, -2, "applied");
  cbL_pushint64(L, (int64_t)h.failures);
  lua_setfield(L, -2, "failures");
  cbL_pushint64(L, (int64_t)h.rejected);
  lua_setfield(L, -2, "rejected");
  lua_pushinteger(L, h.in_flight);
  lua_setfield(L, -2, "in_flight");
  return 1;
}

static int l_in_flight(lua_State *L) {
  cbL_reply_router *lr = check_router(L);
  cb_reply_router_health h = {0};
  if (lr->r) cb_reply_router_health_get(lr->r, &h);
  lua_pushinteger(L, h.in_flight);
  return 1;
}

static int l_gc(lua_State *L) {
  cbL_reply_router *lr = check_router(L);
  if (lr->in_run) { /* from a tick or a table-mode hook: finish when run() returns */
    if (lr->r) cb_reply_router_stop(lr->r);
    lr->close_pending = 1;
    return 0;
  }
  if (lr->background) {
    cbL_runner_finish(&runner, lr->r, lr->background);
    lr->background = NULL;
  }
  if (lr->r) {
    cb_reply_router_free(lr->r);
    lr->r = NULL;
  }
  luaL_unref(L, LUA_REGISTRYINDEX, lr->managers_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, lr->bus_ref);
  lr->managers_ref = lr->bus_ref = LUA_NOREF;
  free(lr->module);
  lr->module = NULL;
  return 0;
}

void cbL_open_reply_router(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"run", l_run}, {"start", l_start}, {"stop", l_stop}, {"health", l_health}, {"in_flight", l_in_flight}, {"close", l_gc}, {NULL, NULL},
  };
  cbL_new_class(L, REPLY_ROUTER_MT, methods, l_gc, NULL);
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_getfield(L, -1, "__index");
  lua_pushcfunction(L, l_bus_reply_router);
  lua_setfield(L, -2, "reply_router");
  lua_pop(L, 2);
}
