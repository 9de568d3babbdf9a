/* commandbus Lua binding: pgmq queues, `bus:queue(name)`.
 *
 * A queue object remembers its bus (a registry reference, so the bus outlives
 * it) and its validated name. Messages are Lua tables, sent as JSON objects;
 * what a read returns is {msg_id=, read_ct=, enqueued_at=, vt=, message=}. */
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/queue.h"

#define QUEUE_MT "commandbus.queue"

typedef struct cbL_queue {
  int bus_ref;
  char name[CB_QUEUE_NAME_MAX + 1];
} cbL_queue;

static cbL_queue *check_queue(lua_State *L) { return luaL_checkudata(L, 1, QUEUE_MT); }

/* The queue's runtime, or NULL after pushing nil, err. */
static cb_runtime *queue_runtime(lua_State *L, cbL_queue *q) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, q->bus_ref);
  cb_runtime *rt = cbL_bus_runtime(L, lua_gettop(L));
  if (rt == NULL) {
    lua_remove(L, -3); /* the bus, under nil, err */
    return NULL;
  }
  lua_pop(L, 1);
  return rt;
}

int cbL_bus_queue(lua_State *L) {
  cbL_checkbus(L, 1);
  const char *name;
  if (!cbL_arg_text(L, 2, "queue name", &name)) return 2;
  cb_err err;
  if (cb_queue_name_valid(name, &err) != CB_OK) return cbL_pusherror(L, &err);
  cbL_queue *q = lua_newuserdata(L, sizeof *q);
  q->bus_ref = LUA_NOREF;
  snprintf(q->name, sizeof q->name, "%s", name);
  luaL_getmetatable(L, QUEUE_MT);
  lua_setmetatable(L, -2);
  lua_pushvalue(L, 1);
  q->bus_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

static int l_gc(lua_State *L) {
  cbL_queue *q = check_queue(L);
  luaL_unref(L, LUA_REGISTRYINDEX, q->bus_ref);
  q->bus_ref = LUA_NOREF;
  return 0;
}

static int ok_or_error(lua_State *L, int rc, cb_err *err) {
  if (rc != CB_OK) return cbL_pusherror(L, err);
  lua_pushboolean(L, 1);
  return 1;
}

/* queue:create() -> true | nil, err */
static int l_create(lua_State *L) {
  cbL_queue *q = check_queue(L);
  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  cb_err err;
  return ok_or_error(L, cb_queue_create(rt, q->name, &err), &err);
}

/* queue:drop() -> true (it existed) | false | nil, err */
static int l_drop(lua_State *L) {
  cbL_queue *q = check_queue(L);
  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  cb_err err;
  int existed = 0;
  if (cb_queue_drop(rt, q->name, &existed, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, existed);
  return 1;
}

/* Encodes the message at idx (a table: anything else raises, naming message
 * #position of a batch when position > 0) as a JSON object; pushes it, or
 * returns 0 after pushing nil, INVALID_ARGUMENT. */
static int encode_message(lua_State *L, int idx, int position) {
  if (lua_type(L, idx) != LUA_TTABLE) {
    if (position)
      return luaL_argerror(L, 2,
                           lua_pushfstring(L, "message #%d: table expected, got %s", position, luaL_typename(L, idx)));
    return luaL_argerror(L, 2, lua_pushfstring(L, "table expected, got %s", luaL_typename(L, idx)));
  }
  if (!cbL_json_encode(L, idx)) {
    const char *why = lua_tostring(L, -1);
    lua_pop(L, 1);
    if (position) cbL_pusherrorcode(L, CB_EINVAL, "cannot encode message #%d as JSON: %s", position, why ? why : "?");
    else cbL_pusherrorcode(L, CB_EINVAL, "cannot encode the message as JSON: %s", why ? why : "?");
    return 0;
  }
  return 1;
}

/* The {delay=} options at idx. */
static int opt_delay(lua_State *L, int idx, double *delay) {
  cbL_opt_table(L, idx);
  return cbL_opt_number(L, idx, "delay", 0, 0, CBL_DELAY_MAX, delay);
}

/* queue:send(msg, {delay=}) -> msg_id | nil, err */
static int l_send(lua_State *L) {
  cbL_queue *q = check_queue(L);
  double delay;
  if (!opt_delay(L, 3, &delay)) return 2;
  if (!encode_message(L, 2, 0)) return 2;
  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  int64_t id;
  cb_err err;
  if (cb_queue_send(rt, q->name, lua_tostring(L, -1), delay, &id, &err) != CB_OK) return cbL_pusherror(L, &err);
  cbL_pushint64(L, id);
  return 1;
}

static void push_ids(lua_State *L, const int64_t *ids, size_t n) {
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    cbL_pushint64(L, ids[i]);
    lua_rawseti(L, -2, (int)i + 1);
  }
}

/* queue:send_batch({msg, ...}, {delay=}) -> {msg_id, ...} | nil, err */
static int l_send_batch(lua_State *L) {
  cbL_queue *q = check_queue(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  double delay;
  if (!opt_delay(L, 3, &delay)) return 2;
  size_t n = lua_rawlen(L, 2);
  if (n == 0) {
    lua_newtable(L);
    return 1;
  }

  /* Each message is encoded into a table first, then the array is joined in
   * one buffer. (Growing one string by concatenation copies it once per
   * message: quadratic, and under LuaJIT, which hashes every string it
   * makes, 20,000 messages took a minute.) */
  lua_createtable(L, (int)n, 0);
  int pieces = lua_gettop(L);
  for (size_t i = 1; i <= n; i++) {
    lua_rawgeti(L, 2, (int)i);
    if (!encode_message(L, -1, (int)i)) return 2;
    lua_rawseti(L, pieces, (int)i);
    lua_pop(L, 1);
  }
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (size_t i = 1; i <= n; i++) {
    luaL_addchar(&b, i == 1 ? '[' : ',');
    lua_rawgeti(L, pieces, (int)i);
    luaL_addvalue(&b);
  }
  luaL_addchar(&b, ']');
  luaL_pushresult(&b);

  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  int64_t *ids = NULL;
  size_t count = 0;
  cb_err err;
  if (cb_queue_send_batch(rt, q->name, lua_tostring(L, -1), delay, &ids, &count, &err) != CB_OK)
    return cbL_pusherror(L, &err);
  push_ids(L, ids, count);
  free(ids);
  return 1;
}

/* Pushes a list of message tables; returns 1. A stored message is valid
 * JSON (PostgreSQL validated it), but one that lua-cjson cannot decode
 * (nested deeper than its 1000 levels) is its JSON text, as a record's JSON
 * column is (rows.c). */
static int push_messages(lua_State *L, cb_messages *m) {
  lua_createtable(L, (int)m->count, 0);
  for (size_t i = 0; i < m->count; i++) {
    cb_message *msg = &m->items[i];
    lua_createtable(L, 0, 5);
    cbL_pushint64(L, msg->msg_id);
    lua_setfield(L, -2, "msg_id");
    lua_pushinteger(L, msg->read_ct);
    lua_setfield(L, -2, "read_ct");
    lua_pushstring(L, msg->enqueued_at);
    lua_setfield(L, -2, "enqueued_at");
    lua_pushstring(L, msg->vt);
    lua_setfield(L, -2, "vt");
    if (msg->message) {
      if (!cbL_json_decode(L, msg->message)) {
        lua_pop(L, 1); /* the decoder's error */
        lua_pushstring(L, msg->message);
      }
      lua_setfield(L, -2, "message");
    }
    lua_rawseti(L, -2, (int)i + 1);
  }
  cb_messages_free(m);
  return 1;
}

/* The {vt=, qty=} options of a read; 0 after pushing nil, err. */
static int read_args(lua_State *L, double *vt, int *qty) {
  cbL_opt_table(L, 2);
  return cbL_opt_number(L, 2, "vt", 30, 0, CBL_DELAY_MAX, vt) && cbL_opt_int(L, 2, "qty", 1, 1, CBL_COUNT_MAX, qty);
}

/* queue:read{vt=30, qty=1} -> {message, ...} | nil, err */
static int l_read(lua_State *L) {
  cbL_queue *q = check_queue(L);
  double vt;
  int qty;
  if (!read_args(L, &vt, &qty)) return 2;
  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  cb_messages m;
  cb_err err;
  if (cb_queue_read(rt, q->name, vt, qty, &m, &err) != CB_OK) return cbL_pusherror(L, &err);
  return push_messages(L, &m);
}

/* queue:read_with_poll{vt=30, qty=1, max_wait=5, poll_interval=0.1} */
static int l_read_with_poll(lua_State *L) {
  cbL_queue *q = check_queue(L);
  double vt, max_wait, poll;
  int qty;
  if (!read_args(L, &vt, &qty) || !cbL_opt_number(L, 2, "max_wait", 5, 0, CBL_DELAY_MAX, &max_wait) ||
      !cbL_opt_number(L, 2, "poll_interval", 0.1, CBL_TIMING_MIN, CBL_TIMING_MAX, &poll))
    return 2;
  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  cb_messages m;
  cb_err err;
  if (cb_queue_read_with_poll(rt, q->name, vt, qty, max_wait, poll, &m, &err) != CB_OK) return cbL_pusherror(L, &err);
  return push_messages(L, &m);
}

/* queue:pop{qty=1} -> {message, ...} | nil, err */
static int l_pop(lua_State *L) {
  cbL_queue *q = check_queue(L);
  cbL_opt_table(L, 2);
  int qty;
  if (!cbL_opt_int(L, 2, "qty", 1, 1, CBL_COUNT_MAX, &qty)) return 2;
  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  cb_messages m;
  cb_err err;
  if (cb_queue_pop(rt, q->name, qty, &m, &err) != CB_OK) return cbL_pusherror(L, &err);
  return push_messages(L, &m);
}

/* A message id: an integer from 1 up (or its decimal string). */
#define ID_MIN 1
#define ID_MAX INT64_MAX

/* delete/archive(id) -> boolean; delete/archive({id, ...}) -> {done ids} */
static int id_op(lua_State *L, int archive) {
  cbL_queue *q = check_queue(L);
  int type = lua_type(L, 2);
  int single = type != LUA_TTABLE;
  if (single && type != LUA_TNUMBER && type != LUA_TSTRING)
    return luaL_argerror(L, 2, lua_pushfstring(L, "message id or list of ids expected, got %s", luaL_typename(L, 2)));
  size_t n = single ? 1 : lua_rawlen(L, 2);
  /* A userdata, so that a raise below frees it with the rest. */
  int64_t *ids = lua_newuserdata(L, (n ? n : 1) * sizeof *ids);
  for (size_t i = 0; i < n; i++) {
    int at = 2;
    if (!single) {
      lua_rawgeti(L, 2, (int)i + 1);
      at = lua_gettop(L);
    }
    if (lua_type(L, at) != LUA_TNUMBER && lua_type(L, at) != LUA_TSTRING)
      return luaL_argerror(L, 2,
                           lua_pushfstring(L, "id #%d: integer expected, got %s", (int)i + 1, luaL_typename(L, at)));
    if (!cbL_int64_at(L, at, "message id", ID_MIN, ID_MAX, &ids[i])) return 2;
    if (!single) lua_pop(L, 1);
  }
  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  int64_t *done = NULL;
  size_t count = 0;
  cb_err err;
  int rc = n == 0    ? CB_OK
           : archive ? cb_queue_archive(rt, q->name, ids, n, &done, &count, &err)
                     : cb_queue_delete(rt, q->name, ids, n, &done, &count, &err);
  if (rc != CB_OK) return cbL_pusherror(L, &err);
  if (single) lua_pushboolean(L, count == 1);
  else push_ids(L, done, count);
  free(done);
  return 1;
}

static int l_delete(lua_State *L) { return id_op(L, 0); }
static int l_archive(lua_State *L) { return id_op(L, 1); }

/* queue:set_vt(id, seconds) -> message | false (no such message) | nil, err */
static int l_set_vt(lua_State *L) {
  cbL_queue *q = check_queue(L);
  int64_t id;
  double secs;
  if (!cbL_arg_int64(L, 2, "message id", ID_MIN, ID_MAX, &id) ||
      !cbL_arg_number(L, 3, "seconds", 0, CBL_DELAY_MAX, &secs))
    return 2;
  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  cb_messages m;
  cb_err err;
  if (cb_queue_set_vt(rt, q->name, id, secs, &m, &err) != CB_OK) return cbL_pusherror(L, &err);
  if (m.count == 0) {
    cb_messages_free(&m);
    lua_pushboolean(L, 0);
    return 1;
  }
  push_messages(L, &m);
  lua_rawgeti(L, -1, 1);
  return 1;
}

/* One queue's metrics as a table (queue:metrics(), bus:queue_metrics()). */
void cbL_push_queue_metrics(lua_State *L, const cb_queue_metrics *m) {
  lua_createtable(L, 0, 6);
  lua_pushstring(L, m->queue_name);
  lua_setfield(L, -2, "queue_name");
  cbL_pushint64(L, m->queue_length);
  lua_setfield(L, -2, "queue_length");
  if (m->newest_msg_age_sec >= 0) {
    cbL_pushint64(L, m->newest_msg_age_sec);
    lua_setfield(L, -2, "newest_msg_age_sec");
    cbL_pushint64(L, m->oldest_msg_age_sec);
    lua_setfield(L, -2, "oldest_msg_age_sec");
  }
  cbL_pushint64(L, m->total_messages);
  lua_setfield(L, -2, "total_messages");
  lua_pushstring(L, m->scrape_time);
  lua_setfield(L, -2, "scrape_time");
}

/* queue:metrics() -> {queue_name=, queue_length=, newest_msg_age_sec=,
 * oldest_msg_age_sec=, total_messages=, scrape_time=} | nil, err (NOT_FOUND
 * when the queue does not exist) */
static int l_metrics(lua_State *L) {
  cbL_queue *q = check_queue(L);
  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  cb_queue_metrics m;
  cb_err err;
  if (cb_queue_metrics_get(rt, q->name, &m, &err) != CB_OK) return cbL_pusherror(L, &err);
  cbL_push_queue_metrics(L, &m);
  return 1;
}

/* bus:queue_metrics() -> every queue's metrics (as queue:metrics()), by name */
int cbL_bus_queue_metrics(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_queue_metrics *all;
  size_t n;
  cb_err err;
  if (cb_queue_metrics_all(rt, &all, &n, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    cbL_push_queue_metrics(L, &all[i]);
    lua_rawseti(L, -2, (int)i + 1);
  }
  free(all);
  return 1;
}

/* queue:purge() -> count | nil, err */
static int l_purge(lua_State *L) {
  cbL_queue *q = check_queue(L);
  cb_runtime *rt = queue_runtime(L, q);
  if (rt == NULL) return 2;
  int64_t count;
  cb_err err;
  if (cb_queue_purge(rt, q->name, &count, &err) != CB_OK) return cbL_pusherror(L, &err);
  cbL_pushint64(L, count);
  return 1;
}

static int l_name(lua_State *L) {
  lua_pushstring(L, check_queue(L)->name);
  return 1;
}

static int l_tostring(lua_State *L) {
  lua_pushfstring(L, "commandbus.queue (%s)", check_queue(L)->name);
  return 1;
}

/* bus:list_queues() -> {{queue_name=, is_partitioned=, is_unlogged=, created_at=}, ...} */
int cbL_bus_list_queues(lua_State *L) {
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_queue_info *qs = NULL;
  size_t n = 0;
  cb_err err;
  if (cb_queue_list(rt, &qs, &n, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_createtable(L, 0, 4);
    lua_pushstring(L, qs[i].name);
    lua_setfield(L, -2, "queue_name");
    lua_pushboolean(L, qs[i].is_partitioned);
    lua_setfield(L, -2, "is_partitioned");
    lua_pushboolean(L, qs[i].is_unlogged);
    lua_setfield(L, -2, "is_unlogged");
    lua_pushstring(L, qs[i].created_at);
    lua_setfield(L, -2, "created_at");
    lua_rawseti(L, -2, (int)i + 1);
  }
  free(qs);
  return 1;
}

void cbL_open_queue(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"create", l_create},   {"drop", l_drop},
      {"send", l_send},       {"send_batch", l_send_batch},
      {"read", l_read},       {"read_with_poll", l_read_with_poll},
      {"pop", l_pop},         {"delete", l_delete},
      {"archive", l_archive}, {"set_vt", l_set_vt},
      {"metrics", l_metrics}, {"purge", l_purge},
      {"name", l_name},       {NULL, NULL},
  };
  luaL_newmetatable(L, QUEUE_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
}
