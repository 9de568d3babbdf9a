/* commandbus Lua binding: message routers, `commandbus.message_router{...}`.
 *
 * A Lua face on the C message router (commandbus/message_router.h): route()
 * sends a JSON-encodable value to the lane of its key, and each lane hands
 * its values over in batches, either to a Lua function running on a lane
 * thread with its own lua_State (handler = "module.name", via lanes.c), or to
 * whoever calls router:take(lane, ...) (no handler).
 *
 * Values cross threads, so route() encodes each one with the binding's
 * private cjson into a malloc'd router_item; whoever takes it from its lane
 * decodes it into its own state and frees it. The C router never frees what
 * it carries, and an item it drops after accepting it (a full lane) is simply
 * forgotten, so every live item is also linked into the router's `held` list:
 * close and __gc free whatever is still there once every thread has stopped.
 */
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/log.h"
#include "commandbus/message_router.h"

#define ROUTER_MT "commandbus.message_router"

/* One routed value: its JSON text, owned by the router from route() until a
 * consumer takes it (then by the consumer, who frees it). prev/next are
 * guarded by the router's held_lock. */
typedef struct router_item {
  struct router_item *prev, *next;
  char json[]; /* NUL-terminated */
} router_item;

/* What the lane threads share with the Lua object. Allocated by
 * message_router{}, freed by close/__gc after the lanes are joined. router,
 * batch_size, lane_capacity and policy are fixed after creation; held is
 * guarded by held_lock; handler_errors is atomic. */
typedef struct router_shared {
  cb_message_router *router;
  size_t batch_size;
  size_t lane_capacity;
  cb_message_router_policy policy;
  pthread_mutex_t held_lock;
  router_item held; /* sentinel of a circular list of accepted items */
  _Atomic uint64_t handler_errors;
} router_shared;

/* The Lua object. Touched only by the Lua state that owns it. */
typedef struct cbL_router {
  router_shared *shared; /* NULL once closed */
  char *handler;         /* module name, or NULL: consumers call take() */
  cbL_lanes *lanes;      /* handler lanes, between start and stop */
  int started, stopped;
} cbL_router;

/* ---- items ---------------------------------------------------------------- */

static router_item *item_new(router_shared *s, const char *json, size_t len) {
  router_item *item = malloc(sizeof *item + len + 1);
  if (item == NULL) return NULL;
  memcpy(item->json, json, len + 1);
  pthread_mutex_lock(&s->held_lock);
  item->next = s->held.next;
  item->prev = &s->held;
  s->held.next->prev = item;
  s->held.next = item;
  pthread_mutex_unlock(&s->held_lock);
  return item;
}

static void unlink_locked(router_item *item) {
  item->prev->next = item->next;
  item->next->prev = item->prev;
}

/* Frees n items taken from a lane (or refused by route), one lock for all. */
static void items_free(router_shared *s, void **items, size_t n) {
  pthread_mutex_lock(&s->held_lock);
  for (size_t i = 0; i < n; i++) unlink_locked(items[i]);
  pthread_mutex_unlock(&s->held_lock);
  for (size_t i = 0; i < n; i++) free(items[i]);
}

/* Pushes a Lua array of the decoded items and frees them. A value that does
 * not decode (it cannot happen: we encoded it) is logged and skipped. */
static void push_items(lua_State *L, router_shared *s, void **items, size_t n) {
  lua_createtable(L, (int)n, 0);
  int at = 0;
  for (size_t i = 0; i < n; i++) {
    router_item *item = items[i];
    if (cbL_json_decode(L, item->json)) {
      lua_rawseti(L, -2, ++at);
    } else {
      cb_log(CB_LOG_ERROR, "message router: cannot decode a routed value: %s", lua_tostring(L, -1));
      lua_pop(L, 1);
    }
  }
  items_free(s, items, n);
}

/* After every thread is gone: frees the router, whatever it still held (in
 * the ingress, in lanes nobody drained, or dropped by a full lane), and s. */
static void shared_free(router_shared *s) {
  cb_message_router_free(s->router);
  for (router_item *item = s->held.next, *next; item != &s->held; item = next) {
    next = item->next;
    free(item);
  }
  pthread_mutex_destroy(&s->held_lock);
  free(s);
}

/* ---- handler lanes (each on its own thread and lua_State) ------------------------- */

static int open_json(lua_State *L) {
  cbL_open_json(L);
  return 0;
}

static int traceback(lua_State *L) {
  if (lua_type(L, 1) != LUA_TSTRING) return 1;
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}

/* Finds on_batch (index 2) and on_stop (index 3, may be nil) in the module's
 * value at index 1, and makes sure the private cjson is in this state (the
 * module need not have required commandbus). Returns 0 after logging when
 * the lane cannot run handlers. */
static int lane_prepare(lua_State *L, int lane) {
  lua_settop(L, 1);
  if (lua_isfunction(L, 1)) {
    lua_pushvalue(L, 1);
    lua_pushnil(L);
  } else if (lua_istable(L, 1)) {
    lua_getfield(L, 1, "on_batch");
    lua_getfield(L, 1, "on_stop");
  } else {
    lua_pushnil(L);
    lua_pushnil(L);
  }
  if (!lua_isfunction(L, 2) || !(lua_isnil(L, 3) || lua_isfunction(L, 3))) {
    cb_log(CB_LOG_ERROR,
           "message router lane %d: the handler module must return function(batch, lane) or "
           "{on_batch = function, on_stop = function}",
           lane + 1);
    return 0;
  }
  lua_getfield(L, LUA_REGISTRYINDEX, "commandbus.json_decode");
  int have_json = !lua_isnil(L, -1);
  lua_settop(L, 3);
  if (have_json) return 1;
  lua_pushcfunction(L, open_json);
  if (lua_pcall(L, 0, 0, 0) != 0) {
    cb_log(CB_LOG_ERROR, "message router lane %d: cannot load cjson: %s", lane + 1, lua_tostring(L, -1));
    return 0;
  }
  return 1;
}

/* tostring(err) for a log line; never raises (a lane has no one to catch). */
static const char *error_text(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TSTRING) return lua_tostring(L, idx);
  lua_getglobal(L, "tostring");
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 1, 0) == 0 && lua_type(L, -1) == LUA_TSTRING) return lua_tostring(L, -1);
  return luaL_typename(L, idx);
}

/* Calls the function under the nargs arguments at the top; a raised error
 * is logged and counted, never propagated. Pops the function and arguments. */
static void lane_call(lua_State *L, router_shared *s, int lane, int nargs, const char *what) {
  int base = lua_gettop(L) - nargs; /* the function */
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  if (lua_pcall(L, nargs, 0, base) != 0) {
    atomic_fetch_add_explicit(&s->handler_errors, 1, memory_order_relaxed);
    cb_log(CB_LOG_ERROR, "message router lane %d: %s raised: %s", lane + 1, what, error_text(L, -1));
  }
  lua_settop(L, base - 1);
}

/* The loop of one handler lane: take a batch, call on_batch(batch, lane),
 * until the router ends the lane; then on_stop(lane). Without a usable
 * handler (L NULL: the module failed to load) batches are still taken and
 * freed, each counted as a handler error, so that stop() never waits on a
 * lane nobody drains. */
static void handler_lane(lua_State *L, int lane, void *arg) {
  router_shared *s = arg;
  void **items = malloc(s->batch_size * sizeof *items);
  if (L && !lane_prepare(L, lane)) L = NULL;
  if (items == NULL) {
    cb_log(CB_LOG_ERROR, "message router lane %d: out of memory; its values stay queued", lane + 1);
    return;
  }
  for (;;) {
    int n = cb_message_router_take(s->router, lane, items, s->batch_size, -1);
    if (n < 0) break; /* CB_MESSAGE_ROUTER_END */
    if (n == 0) continue;
    if (L == NULL) {
      items_free(s, items, (size_t)n);
      atomic_fetch_add_explicit(&s->handler_errors, 1, memory_order_relaxed);
      continue;
    }
    lua_pushvalue(L, 2);
    push_items(L, s, items, (size_t)n);
    lua_pushinteger(L, lane + 1);
    lane_call(L, s, lane, 2, "on_batch");
  }
  if (L && lua_isfunction(L, 3)) {
    lua_pushvalue(L, 3);
    lua_pushinteger(L, lane + 1);
    lane_call(L, s, lane, 1, "on_stop");
  }
  free(items);
}

/* ---- the router object ------------------------------------------------------------ */

static cbL_router *check_router(lua_State *L) { return luaL_checkudata(L, 1, ROUTER_MT); }

/* Default names, "router_1", "router_2", ...: every router shows in metrics. */
static atomic_int routers_named;

/* core.message_router{lanes=, batch_size=100, batch_timeout_ms=10,
 *                     queue_size=10000, lane_queue_size=5000, policy="drop",
 *                     block_timeout_ms=1000, handler="module.name", name=}
 * -> router | nil, err. lanes defaults to core.default_threads(); the sizes
 * are at most CBL_COUNT_MAX (their rings are allocated up front); name (its
 * label in metrics, unique among live routers) to "router_<n>". */
int cbL_message_router(lua_State *L) {
  cbL_opt_table(L, 1);
  cb_message_router_config cfg;
  cb_message_router_config_init(&cfg);
  int default_lanes = cb_default_threads();
  if (default_lanes > CB_MESSAGE_ROUTER_MAX_LANES) default_lanes = CB_MESSAGE_ROUTER_MAX_LANES;
  int batch_size, ingress_capacity, lane_capacity;
  const char *policy, *handler, *name;
  if (!cbL_opt_int(L, 1, "lanes", default_lanes, 1, CB_MESSAGE_ROUTER_MAX_LANES, &cfg.lanes) ||
      !cbL_opt_int(L, 1, "batch_size", CB_MESSAGE_ROUTER_DEFAULT_BATCH_SIZE, 1, CBL_COUNT_MAX, &batch_size) ||
      !cbL_opt_int(L, 1, "batch_timeout_ms", CB_MESSAGE_ROUTER_DEFAULT_BATCH_TIMEOUT_MS, 0, INT_MAX,
                   &cfg.batch_timeout_ms) ||
      !cbL_opt_int(L, 1, "queue_size", CB_MESSAGE_ROUTER_DEFAULT_INGRESS_CAPACITY, 1, CBL_COUNT_MAX,
                   &ingress_capacity) ||
      !cbL_opt_int(L, 1, "lane_queue_size", CB_MESSAGE_ROUTER_DEFAULT_LANE_CAPACITY, 1, CBL_COUNT_MAX,
                   &lane_capacity) ||
      !cbL_opt_int(L, 1, "block_timeout_ms", CB_MESSAGE_ROUTER_DEFAULT_BLOCK_TIMEOUT_MS, -1, INT_MAX,
                   &cfg.block_timeout_ms) ||
      !cbL_opt_text(L, 1, "policy", "drop", &policy) || !cbL_opt_text(L, 1, "handler", NULL, &handler) ||
      !cbL_opt_text(L, 1, "name", NULL, &name))
    return 2;
  cfg.batch_size = (size_t)batch_size;
  cfg.ingress_capacity = (size_t)ingress_capacity;
  cfg.lane_capacity = (size_t)lane_capacity;
  if (strcmp(policy, "drop") == 0) cfg.policy = CB_MESSAGE_ROUTER_DROP;
  else if (strcmp(policy, "block") == 0) cfg.policy = CB_MESSAGE_ROUTER_BLOCK;
  else return cbL_pusherrorcode(L, CB_EINVAL, "option 'policy' must be \"drop\" or \"block\", got \"%.40s\"", policy);
  if (cfg.ingress_capacity < cfg.batch_size)
    return cbL_pusherrorcode(L, CB_EINVAL, "option 'queue_size' (%d) must be at least batch_size (%d)",
                             ingress_capacity, batch_size);
  if (name && (name[0] == '\0' || strlen(name) > CB_MESSAGE_ROUTER_NAME_MAX))
    return cbL_pusherrorcode(L, CB_EINVAL, "option 'name' must be 1 to %d bytes long", CB_MESSAGE_ROUTER_NAME_MAX);
  /* Without a handler only this Lua state can take(), and it cannot while
   * it sits in stop() or __gc waiting forever for room in a full lane. */
  if (handler == NULL && cfg.policy == CB_MESSAGE_ROUTER_BLOCK && cfg.block_timeout_ms < 0)
    return cbL_pusherrorcode(L, CB_EINVAL, "option 'block_timeout_ms': -1 (forever) needs a handler");

  cbL_router *r = lua_newuserdata(L, sizeof *r);
  memset(r, 0, sizeof *r);
  luaL_getmetatable(L, ROUTER_MT);
  lua_setmetatable(L, -2);
  router_shared *s = calloc(1, sizeof *s);
  if (s == NULL) return cbL_pusherrorcode(L, CB_ENOMEM, "out of memory");
  s->batch_size = cfg.batch_size;
  s->lane_capacity = cfg.lane_capacity;
  s->policy = cfg.policy;
  s->held.next = s->held.prev = &s->held;
  pthread_mutex_init(&s->held_lock, NULL);
  atomic_init(&s->handler_errors, 0);
  char default_name[32];
  int rc;
  do { /* a default name someone took already: the next one */
    if (name == NULL) snprintf(default_name, sizeof default_name, "router_%d", atomic_fetch_add(&routers_named, 1) + 1);
    cfg.name = name ? name : default_name;
    rc = cb_message_router_new(&s->router, &cfg);
  } while (rc == CB_EDUPLICATE && name == NULL);
  if (rc == CB_EDUPLICATE) {
    pthread_mutex_destroy(&s->held_lock);
    free(s);
    return cbL_pusherrorcode(L, CB_EINVAL, "a message router named `%s` exists already", name);
  }
  if (rc != CB_OK) {
    pthread_mutex_destroy(&s->held_lock);
    free(s);
    return cbL_pusherrorcode(L, rc == CB_ENOMEM ? CB_ENOMEM : CB_EINVAL, "cannot create the message router: %s",
                             cb_strerror(rc));
  }
  r->shared = s;
  if (handler && (r->handler = strdup(handler)) == NULL) return cbL_pusherrorcode(L, CB_ENOMEM, "out of memory");
  return 1;
}

/* router:route(key, value) -> true | false, reason
 * reason: "full" (drop policy), "timeout" (block policy), "stopped", "closed". */
static int l_route(lua_State *L) {
  cbL_router *r = check_router(L);
  size_t key_len;
  if (lua_type(L, 2) != LUA_TSTRING)
    luaL_argerror(L, 2, lua_pushfstring(L, "string expected, got %s", luaL_typename(L, 2)));
  const char *key = lua_tolstring(L, 2, &key_len);
  luaL_checkany(L, 3);
  router_shared *s = r->shared;
  if (s == NULL) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if (!cbL_json_encode_any(L, 3))
    luaL_argerror(L, 3, lua_pushfstring(L, "cannot encode the value as JSON: %s", lua_tostring(L, -1)));
  size_t json_len;
  const char *json = lua_tolstring(L, -1, &json_len);
  router_item *item = item_new(s, json, json_len);
  if (item == NULL) return luaL_error(L, "out of memory");
  int rc = cb_message_router_route(s->router, key, key_len, item);
  if (rc == CB_OK) {
    lua_pushboolean(L, 1);
    return 1;
  }
  void *refused = item;
  items_free(s, &refused, 1);
  lua_pushboolean(L, 0);
  /* No room within the policy's wait: under drop that is a full ingress. */
  if (rc == CB_ETIMEOUT) lua_pushstring(L, s->policy == CB_MESSAGE_ROUTER_DROP ? "full" : "timeout");
  else lua_pushstring(L, rc == CB_ECLOSED ? "stopped" : cb_strerror(rc));
  return 2;
}

/* router:lane_for(key) -> 1-based lane number. */
static int l_lane_for(lua_State *L) {
  cbL_router *r = check_router(L);
  size_t len;
  if (lua_type(L, 2) != LUA_TSTRING)
    luaL_argerror(L, 2, lua_pushfstring(L, "string expected, got %s", luaL_typename(L, 2)));
  const char *key = lua_tolstring(L, 2, &len);
  if (r->shared == NULL) return cbL_pusherrorcode(L, CB_ECLOSED, "the message router is closed");
  lua_pushinteger(L, cb_message_router_lane_for(r->shared->router, key, len) + 1);
  return 1;
}

static int l_lanes(lua_State *L) {
  cbL_router *r = check_router(L);
  if (r->shared == NULL) return cbL_pusherrorcode(L, CB_ECLOSED, "the message router is closed");
  lua_pushinteger(L, cb_message_router_lanes(r->shared->router));
  return 1;
}

/* router:start() -> true | nil, err. Starts the dispatcher, and with a
 * handler one lane thread per lane. */
static int l_start(lua_State *L) {
  cbL_router *r = check_router(L);
  router_shared *s = r->shared;
  if (s == NULL) return cbL_pusherrorcode(L, CB_ECLOSED, "the message router is closed");
  if (r->started || r->stopped)
    return cbL_pusherrorcode(L, CB_ESTATE, "the message router was already started or stopped");
  if (r->handler) {
    cb_err err;
    int lanes = cb_message_router_lanes(s->router);
    r->lanes = cbL_lanes_start(L, lanes, r->handler, handler_lane, s, &err);
    if (r->lanes == NULL) return cbL_pusherror(L, &err);
    if (cbL_lanes_running(r->lanes) < lanes) {
      /* A lane without its thread would hold its values forever: end all. */
      cb_message_router_stop(s->router);
      cbL_lanes_join(r->lanes);
      r->lanes = NULL;
      r->stopped = 1;
      return cbL_pusherrorcode(L, CB_EINTERNAL, "cannot start %d message router lane threads", lanes);
    }
  }
  r->started = 1;
  if (cb_message_router_start(s->router) != CB_OK) {
    /* start failed and stopped the router: the lanes have their end */
    cbL_lanes_join(r->lanes);
    r->lanes = NULL;
    r->stopped = 1;
    return cbL_pusherrorcode(L, CB_EINTERNAL, "cannot start the message router's dispatcher thread");
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* Refuses new values, hands everything accepted to the lanes, ends every
 * lane and joins the handler lanes, which drain their lane first. Handler
 * lanes never started are started now, so that whatever was accepted reaches
 * the handler (from __gc too: a stop that drops accepted values only because
 * the object was collected would be a surprise). */
static void router_stop(lua_State *L, cbL_router *r) {
  router_shared *s = r->shared;
  if (s == NULL || r->stopped) return;
  if (r->handler && r->lanes == NULL) {
    cb_err err;
    r->lanes = cbL_lanes_start(L, cb_message_router_lanes(s->router), r->handler, handler_lane, s, &err);
    if (r->lanes == NULL) cb_log(CB_LOG_ERROR, "message router: cannot start its lanes to deliver: %s", err.message);
  }
  cb_message_router_stop(s->router);
  cbL_lanes_join(r->lanes);
  r->lanes = NULL;
  r->stopped = 1;
}

/* router:stop() -> true. Idempotent. */
static int l_stop(lua_State *L) {
  cbL_router *r = check_router(L);
  router_stop(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* router:take(lane, [max = batch_size], [timeout_ms = 0]) -> {values...}
 * (empty on timeout) | nil, "ended" once the router stopped and the lane is
 * empty | nil, "closed". Only for routers without a handler. */
static int l_take(lua_State *L) {
  cbL_router *r = check_router(L);
  router_shared *s = r->shared;
  int64_t lane, max = 0, timeout_ms = 0;
  if (!cbL_arg_integer(L, 2, "lane", 1, s ? cb_message_router_lanes(s->router) : CB_MESSAGE_ROUTER_MAX_LANES, &lane) ||
      (!lua_isnoneornil(L, 3) && !cbL_arg_integer(L, 3, "max", 1, INT_MAX, &max)) ||
      (!lua_isnoneornil(L, 4) && !cbL_arg_integer(L, 4, "timeout_ms", -1, INT_MAX, &timeout_ms)))
    return 2;
  if (s == NULL) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if (r->handler) luaL_error(L, "take() is for message routers without a handler: its lanes take the values");
  if (max == 0) max = (int64_t)s->batch_size;
  if ((uint64_t)max > s->lane_capacity) max = (int64_t)s->lane_capacity; /* a lane never holds more */
  void **items = lua_newuserdata(L, (size_t)max * sizeof *items);
  int n = cb_message_router_take(s->router, (int)lane - 1, items, (size_t)max, (int)timeout_ms);
  if (n == CB_MESSAGE_ROUTER_END) {
    lua_pushnil(L);
    lua_pushliteral(L, "ended");
    return 2;
  }
  push_items(L, s, items, n > 0 ? (size_t)n : 0);
  return 1;
}

static void set_count(lua_State *L, const char *k, uint64_t v) {
  cbL_pushint64(L, (int64_t)v);
  lua_setfield(L, -2, k);
}

/* router:stats() -> {routed, dropped, batches_sent, queue_full_events,
 * routing_errors, delivered, latency_avg_us, latency_max_us, handler_errors} */
static int l_stats(lua_State *L) {
  cbL_router *r = check_router(L);
  if (r->shared == NULL) return cbL_pusherrorcode(L, CB_ECLOSED, "the message router is closed");
  cb_message_router_stats st;
  cb_message_router_stats_get(r->shared->router, &st);
  lua_createtable(L, 0, 9);
  set_count(L, "routed", st.routed);
  set_count(L, "dropped", st.dropped);
  set_count(L, "batches_sent", st.batches_sent);
  set_count(L, "queue_full_events", st.queue_full_events);
  set_count(L, "routing_errors", st.routing_errors);
  set_count(L, "delivered", st.delivered);
  lua_pushnumber(L, (lua_Number)st.latency_avg_ns / 1000.0);
  lua_setfield(L, -2, "latency_avg_us");
  lua_pushnumber(L, (lua_Number)st.latency_max_ns / 1000.0);
  lua_setfield(L, -2, "latency_max_us");
  set_count(L, "handler_errors", atomic_load_explicit(&r->shared->handler_errors, memory_order_relaxed));
  return 1;
}

/* router:queue_depths() -> {ingress = n, lanes = {n1, n2, ...}} */
static int l_queue_depths(lua_State *L) {
  cbL_router *r = check_router(L);
  if (r->shared == NULL) return cbL_pusherrorcode(L, CB_ECLOSED, "the message router is closed");
  cb_message_router *router = r->shared->router;
  int lanes = cb_message_router_lanes(router);
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, (lua_Integer)cb_message_router_ingress_depth(router));
  lua_setfield(L, -2, "ingress");
  lua_createtable(L, lanes, 0);
  for (int l = 0; l < lanes; l++) {
    lua_pushinteger(L, (lua_Integer)cb_message_router_lane_depth(router, l));
    lua_rawseti(L, -2, l + 1);
  }
  lua_setfield(L, -2, "lanes");
  return 1;
}

/* router:close(), __gc, __close: stops as stop() does, then frees the router
 * and every value it still holds (values dropped by a full lane, values
 * nobody took). Idempotent. */
static int l_gc(lua_State *L) {
  cbL_router *r = check_router(L);
  router_stop(L, r);
  if (r->shared) shared_free(r->shared);
  r->shared = NULL;
  free(r->handler);
  r->handler = NULL;
  return 0;
}

static int l_tostring(lua_State *L) {
  cbL_router *r = check_router(L);
  if (r->shared == NULL) lua_pushliteral(L, "commandbus.message_router (closed)");
  else lua_pushfstring(L, "commandbus.message_router (%d lanes): %p", cb_message_router_lanes(r->shared->router), r);
  return 1;
}

void cbL_open_router(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"route", l_route}, {"lane_for", l_lane_for},
      {"lanes", l_lanes}, {"start", l_start},
      {"stop", l_stop},   {"take", l_take},
      {"stats", l_stats}, {"queue_depths", l_queue_depths},
      {"close", l_gc},    {NULL, NULL},
  };
  cbL_new_class(L, ROUTER_MT, methods, l_gc, l_tostring);
}
