/* commandbus Lua binding: the bus's metrics methods, bus:metrics(),
 * bus:metrics_text() and bus:runners(). */
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/metrics.h"

static void set_int(lua_State *L, const char *k, int64_t v) {
  cbL_pushint64(L, v);
  lua_setfield(L, -2, k);
}

static void set_number(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

static void set_string(lua_State *L, const char *k, const char *v) {
  lua_pushstring(L, v);
  lua_setfield(L, -2, k);
}

/* A worker's or reply router's health as a table (only its kind's fields). */
static void push_runner(lua_State *L, const cb_runner_stat *s) {
  lua_createtable(L, 0, 20);
  set_string(L, "kind", s->kind);
  set_string(L, "domain", s->domain);
  set_string(L, "runner_id", s->runner_id);
  set_string(L, "host", s->host);
  set_int(L, "pid", s->pid);
  set_string(L, "state", s->state);
  set_number(L, "started_at", s->started_at);
  set_number(L, "heartbeat_at", s->heartbeat_at);
  set_int(L, "lanes", s->lanes);
  set_int(L, "in_flight", s->in_flight);
  cbL_set_runner_counters(L, s);
  if (strcmp(s->kind, "worker") == 0) {
    lua_createtable(L, 0, CB_RUNNER_REMOVED_KINDS);
    for (int k = 0; k < CB_RUNNER_REMOVED_KINDS; k++) set_int(L, cb_retention_kinds[k], s->removed[k]);
    lua_setfield(L, -2, "removed");
  }
  lua_createtable(L, s->nlane_depths, 0);
  for (int i = 0; i < s->nlane_depths; i++) {
    lua_pushinteger(L, (lua_Integer)s->lane_depths[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "lane_depths");
}

/* Runners of one kind as a list. */
static void push_runners(lua_State *L, const cb_runner_stat *runners, size_t n, const char *kind) {
  lua_newtable(L);
  int k = 0;
  for (size_t i = 0; i < n; i++) {
    if (kind && strcmp(runners[i].kind, kind) != 0) continue;
    push_runner(L, &runners[i]);
    lua_rawseti(L, -2, ++k);
  }
}

/* Adds counts by status to the domains list at `list`, under `field` of
 * each domain's entry; `index` maps a domain to its entry. */
static void add_counts(lua_State *L, int list, int index, const cb_status_count *rows, size_t n, const char *field) {
  for (size_t i = 0; i < n; i++) {
    lua_getfield(L, index, rows[i].domain);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_createtable(L, 0, 4);
      set_string(L, "domain", rows[i].domain);
      lua_newtable(L);
      lua_setfield(L, -2, "commands");
      lua_newtable(L);
      lua_setfield(L, -2, "processes");
      set_int(L, "tsq", 0);
      lua_pushvalue(L, -1);
      lua_setfield(L, index, rows[i].domain);
      lua_pushvalue(L, -1);
      lua_rawseti(L, list, (int)lua_rawlen(L, list) + 1);
    }
    lua_getfield(L, -1, field);
    set_int(L, rows[i].status, rows[i].count);
    lua_pop(L, 1);
    if (strcmp(field, "commands") == 0 && strcmp(rows[i].status, "IN_TROUBLESHOOTING_QUEUE") == 0)
      set_int(L, "tsq", rows[i].count);
    lua_pop(L, 1);
  }
}

static void push_metrics(lua_State *L, const cb_metrics *m) {
  lua_createtable(L, 0, 8);
  lua_pushboolean(L, m->all_processes);
  lua_setfield(L, -2, "all_processes");
  lua_createtable(L, (int)m->nqueues, 0);
  for (size_t i = 0; i < m->nqueues; i++) {
    cbL_push_queue_metrics(L, &m->queues[i]);
    lua_rawseti(L, -2, (int)i + 1);
  }
  lua_setfield(L, -2, "queues");
  lua_newtable(L); /* domains, in the order of their first rows: by name */
  int list = lua_gettop(L);
  lua_newtable(L);
  int index = lua_gettop(L);
  add_counts(L, list, index, m->commands, m->ncommands, "commands");
  add_counts(L, list, index, m->processes, m->nprocesses, "processes");
  lua_pop(L, 1);
  lua_setfield(L, -2, "domains");
  push_runners(L, m->runners, m->nrunners, "worker");
  lua_setfield(L, -2, "workers");
  push_runners(L, m->runners, m->nrunners, "reply_router");
  lua_setfield(L, -2, "reply_routers");
  lua_createtable(L, (int)m->nrouters, 0);
  for (size_t i = 0; i < m->nrouters; i++) {
    const cb_router_metrics *r = &m->routers[i];
    lua_createtable(L, 0, 12);
    set_string(L, "name", r->name);
    set_int(L, "lanes", r->lanes);
    set_int(L, "routed", (int64_t)r->stats.routed);
    set_int(L, "dropped", (int64_t)r->stats.dropped);
    set_int(L, "batches_sent", (int64_t)r->stats.batches_sent);
    set_int(L, "queue_full_events", (int64_t)r->stats.queue_full_events);
    set_int(L, "routing_errors", (int64_t)r->stats.routing_errors);
    set_int(L, "delivered", (int64_t)r->stats.delivered);
    set_int(L, "latency_avg_ns", (int64_t)r->stats.latency_avg_ns);
    set_int(L, "latency_max_ns", (int64_t)r->stats.latency_max_ns);
    set_int(L, "ingress_depth", (int64_t)r->ingress_depth);
    lua_createtable(L, r->lanes, 0);
    for (int lane = 0; lane < r->lanes; lane++) {
      cbL_pushint64(L, (int64_t)r->lane_depths[lane]);
      lua_rawseti(L, -2, lane + 1);
    }
    lua_setfield(L, -2, "lane_depths");
    lua_rawseti(L, -2, (int)i + 1);
  }
  lua_setfield(L, -2, "message_routers");
  lua_createtable(L, 0, 1);
  set_int(L, "waiters", (int64_t)m->awaiting);
  lua_setfield(L, -2, "awaiter");
  lua_createtable(L, 0, 4);
  set_int(L, "pushed", (int64_t)m->events.pushed);
  set_int(L, "dropped", (int64_t)m->events.dropped);
  set_int(L, "queued", (int64_t)m->events.queued);
  set_int(L, "capacity", (int64_t)m->events.capacity);
  lua_setfield(L, -2, "process_events");
}

/* The flags of bus:metrics{all_processes = bool} (idx may be nil). */
static int metrics_flags(lua_State *L, int idx) {
  cbL_opt_table(L, idx);
  return cbL_opt_boolean(L, idx, "all_processes", 0) ? CB_METRICS_ALL_PROCESSES : 0;
}

/* Collects, then pushes the table (text 0) or the exposition (text 1). */
static int collect(lua_State *L, int text) {
  int flags = metrics_flags(L, 2);
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_metrics m;
  cb_err err;
  if (cb_metrics_collect(rt, flags, &m, &err) != CB_OK) {
    cb_metrics_free(&m);
    return cbL_pusherror(L, &err);
  }
  if (text) {
    char *s = cb_metrics_text(&m);
    if (s == NULL) {
      cb_metrics_free(&m);
      return cbL_pusherrorcode(L, CB_ENOMEM, "out of memory");
    }
    lua_pushstring(L, s);
    free(s);
  } else {
    push_metrics(L, &m);
  }
  cb_metrics_free(&m);
  return 1;
}

/* bus:metrics{all_processes = false} -> {queues=, domains=, workers=,
 * reply_routers=, message_routers=, awaiter=, process_events=} | nil, err */
static int l_metrics(lua_State *L) { return collect(L, 0); }

/* bus:metrics_text{all_processes = false} -> Prometheus text (0.0.4) | nil, err */
static int l_metrics_text(lua_State *L) { return collect(L, 1); }

/* bus:runners{domain = nil} -> the workers and reply routers of every
 * process, as their heartbeats recorded them (state "lost" when those
 * stopped coming) | nil, err */
static int l_runners(lua_State *L) {
  const char *domain;
  cbL_opt_table(L, 2);
  if (!cbL_opt_text(L, 2, "domain", NULL, &domain)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_runner_stat *runners;
  size_t n;
  cb_err err;
  if (cb_runner_list(rt, domain, &runners, &n, &err) != CB_OK) return cbL_pusherror(L, &err);
  push_runners(L, runners, n, NULL);
  free(runners);
  return 1;
}

void cbL_open_metrics(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"metrics", l_metrics},
      {"metrics_text", l_metrics_text},
      {"runners", l_runners},
      {NULL, NULL},
  };
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_getfield(L, -1, "__index");
  luaL_setfuncs(L, methods, 0);
  lua_pop(L, 2);
}
