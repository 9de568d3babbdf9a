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

static const char *domain_of(cb_reply_router *r) { return cb_engine_domain(cb_reply_router_engine(r)); }

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
           domain_of(r), reply->process_id, reply->process_type, cbL_tostring(L, -1));
    cb_reply_router_release(r, reply);
    lua_settop(L, top);
    return 0;
  }
  int d = lua_gettop(L);
  if (!lua_istable(L, d)) {
    cb_log(CB_LOG_WARN,
           "reply router %s: deciding about process %s returned %s, not a table; the reply comes back "
           "later",
           domain_of(r), reply->process_id, luaL_typename(L, d));
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
    cb_log(CB_LOG_WARN, "reply router %s: the state of process %s cannot be encoded: %s", domain_of(r),
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
    /* Never sent as {} in its place, nor as a list: rcmd's command data is an object. */
    const char *bad = decision->next_data_json == NULL                ? lua_tostring(L, -1)
                      : !cbL_json_is_object(decision->next_data_json) ? "not a JSON object"
                                                                      : NULL;
    if (bad) {
      cb_log(CB_LOG_WARN,
             "reply router %s: the data of the command for step %s of process %s cannot be sent: %s; the reply "
             "comes back later",
             domain_of(r), decision->step ? decision->step : "?", reply->process_id, bad);
      cb_reply_router_release(r, reply);
      lua_settop(L, top);
      return 0;
    }
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
    cb_log(CB_LOG_ERROR, "reply router %s: cannot load commandbus.process: %s", domain_of(r), lua_tostring(L, -1));
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

/* One round of a lane: takes a batch of replies and handles them; without a
 * state (the managers module failed to load) the replies are released. */
static int lane_round(lua_State *L, int managers, void *router, int lane, int timeout_ms) {
  cb_reply_router *r = router;
  cb_reply *replies[CB_REPLY_ROUTER_BATCH_MAX];
  int ended;
  int n = cb_reply_router_take_many(r, lane, replies, CB_REPLY_ROUTER_BATCH_MAX, timeout_ms, &ended);
  if (n > 0 && L) handle_replies(L, managers, r, replies, n);
  for (int i = 0; i < n && !L; i++) cb_reply_router_release(r, replies[i]);
  return !ended;
}

static void free_router(void *r) { cb_reply_router_free(r); }

static const cbL_runner_class reply_router_class = {
    REPLY_ROUTER_MT, "reply router", "reply_router", "managers", free_router, lane_round, NULL};

/* bus:reply_router{domain=, reply_queue=, managers=, concurrency=,
 *                  poll_interval=1, visibility_timeout=30, statement_timeout=25} */
static int l_bus_reply_router(lua_State *L) {
  cb_reply_router_options o;
  cb_reply_router_options_init(&o);
  cbL_runner *lr = cbL_runner_begin(L, &reply_router_class, &o.domain, &o.lanes, &o.visibility_timeout,
                                    &o.statement_timeout, &o.poll_interval);
  if (lr == NULL || !cbL_opt_text(L, 2, "reply_queue", NULL, &o.reply_queue)) return 2;
  cb_reply_router *r;
  cb_err err;
  if (cb_reply_router_new(cbL_runner_runtime(lr), &o, &r, &err) != CB_OK) return cbL_pusherror(L, &err);
  return cbL_runner_adopt(L, lr, r, cb_reply_router_engine(r));
}

void cbL_open_reply_router(lua_State *L) { cbL_runner_open(L, &reply_router_class, l_bus_reply_router); }
