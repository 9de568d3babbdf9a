/* commandbus Lua binding: the bus's process methods. process_start is the
 * primitive under lua/commandbus/process.lua's manager:start (which runs the
 * definition's hooks); the queries read processes and their steps back.
 * Wrong types raise; values the core refuses come back as nil, err. */
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/awaiter.h"
#include "commandbus/events.h"
#include "commandbus/log.h"
#include "commandbus/process.h"

/* bus:process_start{domain=, type=, step=, state=, reply_to=, batch_id=,
 *                   command={type=, data=, id=, max_attempts=}}
 * -> process_id, {command_id=, msg_id=} | nil, err
 * One transaction: the process row (WAITING at `step`), the command (its
 * correlation_id is the process id, its reply_to the process's) and the
 * step's process_audit row. */
static int l_process_start(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  cb_process_start_spec spec = {0};
  const char *reply_to;
  if (!cbL_field_text(L, 2, "domain", &spec.domain) || !cbL_field_text(L, 2, "type", &spec.process_type) ||
      !cbL_field_text(L, 2, "step", &spec.step_name) || !cbL_opt_text(L, 2, "batch_id", NULL, &spec.batch_id) ||
      !cbL_field_text(L, 2, "reply_to", &reply_to) || !cbL_opt_json(L, 2, "state", &spec.state_json))
    return 2;
  lua_newtable(L);
  int anchor = lua_gettop(L);
  lua_getfield(L, 2, "command");
  cb_command_spec command;
  if (!cbL_read_command(L, -1, anchor, 1, &command, "command")) return 2;
  command.reply_to = reply_to;
  command.correlation_id = NULL; /* the process id */
  command.batch_id = NULL;       /* the process's batch is its own */
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  char process_id[CB_UUID_LEN + 1];
  cb_send_result result;
  cb_err err;
  if (cb_process_start(rt, &spec, &command, process_id, &result, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushstring(L, process_id);
  lua_createtable(L, 0, 2);
  lua_pushstring(L, result.command_id);
  lua_setfield(L, -2, "command_id");
  cbL_pushint64(L, result.msg_id);
  lua_setfield(L, -2, "msg_id");
  return 2;
}

/* bus:get_process(domain, id) -> record | nil, err (NOT_FOUND) */
static int l_get_process(lua_State *L) {
  const char *domain, *id;
  if (!cbL_args_domain_id(L, &domain, &id)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_process_get(rt, domain, id, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* bus:list_processes{domain=, type=, status=, limit=100, offset=0}, newest first */
static int l_list_processes(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  cb_process_filter f = {0};
  if (!cbL_field_text(L, 2, "domain", &f.domain) || !cbL_opt_text(L, 2, "type", NULL, &f.process_type) ||
      !cbL_opt_text(L, 2, "status", NULL, &f.status) || !cbL_opt_int(L, 2, "limit", 100, 1, CBL_COUNT_MAX, &f.limit) ||
      !cbL_opt_int(L, 2, "offset", 0, 0, CBL_OFFSET_MAX, &f.offset))
    return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_process_list(rt, &f, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* bus:process_audit(domain, id) -> {{id=, step_name=, command_id=, ...}, ...}
 * oldest first | nil, err (NOT_FOUND) */
static int l_process_audit(lua_State *L) {
  const char *domain, *id;
  if (!cbL_args_domain_id(L, &domain, &id)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_process_audit(rt, domain, id, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

int cbL_await_options(lua_State *L, int arg, double *timeout, int *flags) {
  cbL_opt_table(L, arg);
  *flags = cbL_opt_boolean(L, arg, "listen", 1) ? 0 : CB_AWAIT_NO_LISTEN;
  return cbL_opt_number(L, arg, "timeout", 30, 0, CBL_DELAY_MAX, timeout);
}

/* A sequence number argument: an integer from 0 (nil means 0). */
static int opt_sequence(lua_State *L, int arg, int64_t *after) {
  *after = 0;
  return lua_isnoneornil(L, arg) || cbL_arg_int64(L, arg, "sequence", 0, INT64_MAX, after);
}

/* bus:await_process(domain, id, {timeout=30, listen=true}) -> the process once
 * COMPLETED, COMPENSATED, FAILED or CANCELED | nil, err (TIMEOUT, NOT_FOUND).
 * Blocks only the calling thread. listen = false: no LISTEN (e.g. behind a
 * transaction-pooling proxy); other processes' changes are polled for. */
static int l_await_process(lua_State *L) {
  const char *domain, *id;
  double timeout;
  int flags;
  if (!cbL_args_domain_id(L, &domain, &id) || !cbL_await_options(L, 4, &timeout, &flags)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_await_process(rt, domain, id, timeout, flags, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* bus:await_event(domain, id, event_type, after_sequence, {timeout=30, listen=true})
 * -> the first event of that type after the sequence (at once when it is
 * already in the log) | nil, err (TIMEOUT, NOT_FOUND). */
static int l_await_event(lua_State *L) {
  const char *domain, *id, *event_type;
  int64_t after;
  double timeout;
  int flags;
  if (!cbL_args_domain_id(L, &domain, &id) || !cbL_arg_text(L, 4, "event_type", &event_type) ||
      !opt_sequence(L, 5, &after) || !cbL_await_options(L, 6, &timeout, &flags))
    return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_await_event(rt, domain, id, event_type, after, timeout, flags, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* bus:process_events(domain, id, after_sequence=0) -> {event, ...} oldest
 * first: the complete log | nil, err (NOT_FOUND) */
static int l_process_events(lua_State *L) {
  const char *domain, *id;
  int64_t after;
  if (!cbL_args_domain_id(L, &domain, &id) || !opt_sequence(L, 4, &after)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_process_events(rt, domain, id, after, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* bus:append_process_event(domain, id, event_type, data) -> sequence
 * | nil, err (NOT_FOUND; INVALID_STATE once the process has finished) */
static int l_append_process_event(lua_State *L) {
  const char *domain, *id, *event_type, *data;
  if (!cbL_args_domain_id(L, &domain, &id) || !cbL_arg_text(L, 4, "event_type", &event_type) ||
      !cbL_arg_json(L, 5, "the event data", &data))
    return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  int64_t sequence;
  cb_err err;
  if (cb_process_append_event(rt, domain, id, event_type, data, &sequence, &err) != CB_OK)
    return cbL_pusherror(L, &err);
  cbL_pushint64(L, sequence);
  return 1;
}

/* bus:purge_processes{domain=, older_than=seconds} -> count: deletes finished
 * processes completed longer ago than that, with their events and steps. */
static int l_purge_processes(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  const char *domain;
  double older_than;
  lua_getfield(L, 2, "older_than");
  if (lua_type(L, -1) != LUA_TNUMBER)
    luaL_error(L, "bad option 'older_than': number of seconds expected, got %s", luaL_typename(L, -1));
  lua_pop(L, 1);
  if (!cbL_field_text(L, 2, "domain", &domain) || !cbL_opt_number(L, 2, "older_than", 0, 0, CBL_AGE_MAX, &older_than))
    return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  int64_t count;
  cb_err err;
  if (cb_process_purge(rt, domain, older_than, &count, &err) != CB_OK) return cbL_pusherror(L, &err);
  cbL_pushint64(L, count);
  return 1;
}

/* ---- the event sink ---------------------------------------------------------------- */

/* The sink function lives in the bus userdata's user value (a table, so
 * that it works alike under Lua 5.4 and LuaJIT): a sink that refers to its
 * bus, as sinks naturally do, then keeps nothing alive that the bus does not
 * (a registry table keyed by the bus would leak it under LuaJIT, which has
 * no ephemerons). */
static const char SINK_KEY = 's';

static void set_sink(lua_State *L, int bus_idx, int fn_idx) {
  bus_idx = lua_absindex(L, bus_idx);
  fn_idx = lua_absindex(L, fn_idx);
  lua_createtable(L, 0, 1);
  lua_pushlightuserdata(L, (void *)&SINK_KEY);
  lua_pushvalue(L, fn_idx);
  lua_rawset(L, -3);
#if LUA_VERSION_NUM >= 504
  lua_setiuservalue(L, bus_idx, 1);
#elif LUA_VERSION_NUM >= 502
  lua_setuservalue(L, bus_idx);
#else
  lua_setfenv(L, bus_idx);
#endif
}

/* Pushes the sink function of the bus at bus_idx, or nil. */
static void push_sink(lua_State *L, int bus_idx) {
  bus_idx = lua_absindex(L, bus_idx);
#if LUA_VERSION_NUM >= 504
  lua_getiuservalue(L, bus_idx, 1);
#elif LUA_VERSION_NUM >= 502
  lua_getuservalue(L, bus_idx);
#else
  lua_getfenv(L, bus_idx); /* a new userdata's is the creator's environment */
#endif
  if (lua_istable(L, -1)) {
    lua_pushlightuserdata(L, (void *)&SINK_KEY);
    lua_rawget(L, -2);
    lua_remove(L, -2);
  } else {
    lua_pop(L, 1);
    lua_pushnil(L);
  }
}

static void push_event(lua_State *L, const cb_process_event *e) {
  lua_createtable(L, 0, 8);
  lua_pushstring(L, e->domain);
  lua_setfield(L, -2, "domain");
  lua_pushstring(L, e->process_id);
  lua_setfield(L, -2, "process_id");
  cbL_pushint64(L, e->sequence);
  lua_setfield(L, -2, "sequence");
  lua_pushstring(L, e->event_type);
  lua_setfield(L, -2, "event_type");
  if (e->step) {
    lua_pushstring(L, e->step);
    lua_setfield(L, -2, "step");
  }
  lua_pushstring(L, e->status);
  lua_setfield(L, -2, "status");
  if (!cbL_json_decode(L, e->data_json)) {
    lua_pop(L, 1);
    lua_pushstring(L, e->data_json);
  }
  lua_setfield(L, -2, "data");
  lua_pushstring(L, e->created_at);
  lua_setfield(L, -2, "created_at");
}

/* bus:on_process_event(fn, {capacity=1024}) -> true. fn(event) receives each
 * non-terminal process event this bus's writers appended, once it is
 * committed, in each writer's commit order; nil turns the sink off. Events
 * wait in a bounded queue until dispatched (run() loops of workers and reply
 * routers do it, or bus:dispatch_process_events()); what does not fit is
 * dropped and counted; process_events() always has the whole log. */
static int l_on_process_event(lua_State *L) {
  cbL_checkbus(L, 1);
  if (!lua_isnil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
  cbL_opt_table(L, 3);
  int capacity;
  if (!cbL_opt_int(L, 3, "capacity", 1024, 1, CBL_COUNT_MAX, &capacity)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  if (lua_isnil(L, 2)) {
    cb_events_sink_off(rt);
  } else if (cb_events_sink_on(rt, capacity) != CB_OK) {
    return cbL_pusherrorcode(L, CB_ENOMEM, "no memory for a queue of %d events", capacity);
  }
  lua_settop(L, 2);
  set_sink(L, 1, 2);
  lua_pushboolean(L, 1);
  return 1;
}

int cbL_dispatch_events(lua_State *L, int bus_idx, int max) {
  bus_idx = lua_absindex(L, bus_idx);
  cbL_bus *bus = cbL_checkbus(L, bus_idx);
  if (bus->rt == NULL || !cb_events_sink_is_on(bus->rt)) return 0;
  push_sink(L, bus_idx);
  int fn = lua_gettop(L);
  int delivered = 0;
  while (delivered < max) {
    cb_process_event *events[64];
    int want = max - delivered < 64 ? max - delivered : 64;
    int n = cb_events_take(bus->rt, events, want);
    for (int i = 0; i < n; i++) {
      if (lua_isfunction(L, fn)) {
        lua_pushvalue(L, fn);
        push_event(L, events[i]);
        if (lua_pcall(L, 1, 0, 0) != 0) { /* the write stands whatever the sink does */
          cb_log(CB_LOG_WARN, "process event sink raised on %s #%lld of process %s: %s", events[i]->event_type,
                 (long long)events[i]->sequence, events[i]->process_id, cbL_tostring(L, -1));
          lua_pop(L, 2);
        }
      }
      free(events[i]);
    }
    delivered += n;
    if (n < want) break;
  }
  lua_pop(L, 1);
  return delivered;
}

/* bus:dispatch_process_events(max=all) -> how many events were handed to the
 * sink function. */
static int l_dispatch_process_events(lua_State *L) {
  cbL_checkbus(L, 1);
  int64_t max = 1 << 30;
  if (!lua_isnoneornil(L, 2) && !cbL_arg_integer(L, 2, "max", 0, 1 << 30, &max)) return 2;
  lua_pushinteger(L, cbL_dispatch_events(L, 1, (int)max));
  return 1;
}

/* bus:process_event_stats() -> {pushed=, dropped=, queued=, capacity=} */
static int l_process_event_stats(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_events_stats st;
  cb_events_stats_get(rt, &st);
  lua_createtable(L, 0, 4);
  cbL_pushint64(L, (int64_t)st.pushed);
  lua_setfield(L, -2, "pushed");
  cbL_pushint64(L, (int64_t)st.dropped);
  lua_setfield(L, -2, "dropped");
  lua_pushinteger(L, (lua_Integer)st.queued);
  lua_setfield(L, -2, "queued");
  lua_pushinteger(L, (lua_Integer)st.capacity);
  lua_setfield(L, -2, "capacity");
  return 1;
}

void cbL_open_process(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"process_start", l_process_start},
      {"get_process", l_get_process},
      {"list_processes", l_list_processes},
      {"process_audit", l_process_audit},
      {"await_process", l_await_process},
      {"await_event", l_await_event},
      {"process_events", l_process_events},
      {"append_process_event", l_append_process_event},
      {"purge_processes", l_purge_processes},
      {"on_process_event", l_on_process_event},
      {"dispatch_process_events", l_dispatch_process_events},
      {"process_event_stats", l_process_event_stats},
      {NULL, NULL},
  };
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_getfield(L, -1, "__index");
  luaL_setfuncs(L, methods, 0);
  lua_pop(L, 2);
}
