/* commandbus Lua binding: the bus object (a runtime and its connections).
 *
 * A bus from core.connect owns its runtime. A bus from core.shared is one
 * Lua state's handle on the process's shared runtime for those connection
 * parameters: every state of the process that asks for it (in nginx, the
 * main Lua VM and each worker-thread VM of one worker process) gets a handle
 * on the same runtime, so that the process has one loop thread and one
 * connection pool whatever the number of states. Closing a handle only
 * detaches it; core.close_shared() closes the shared runtimes themselves. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "binding.h"
#include "commandbus/schema.h"

/* One shared runtime. refs counts the bus handles on it, plus one while it
 * is listed; the last to let go frees it (by then it is closed). */
struct cbL_shared {
  struct cbL_shared *next;
  char *key; /* the connection parameters, see shared_key */
  cb_runtime *rt;
  int refs;
};

static pthread_mutex_t shared_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cbL_shared *shared_head; /* [shared_lock] */
static pid_t shared_pid;               /* [shared_lock] the process the list belongs to */

/* Drops one reference (under shared_lock); returns the runtime to free, if
 * that was the last. */
static cb_runtime *shared_unref_locked(struct cbL_shared *s) {
  if (--s->refs > 0) return NULL;
  cb_runtime *rt = s->rt;
  free(s->key);
  free(s);
  return rt;
}

static void shared_unref(struct cbL_shared *s) {
  pthread_mutex_lock(&shared_lock);
  cb_runtime *rt = shared_unref_locked(s);
  pthread_mutex_unlock(&shared_lock);
  cb_runtime_free(rt);
}

cbL_bus *cbL_checkbus(lua_State *L, int idx) { return luaL_checkudata(L, idx, CBL_BUS_MT); }

/* The runtime of an open bus, or NULL after pushing nil, err: CLOSED, or
 * INVALID_STATE for a bus connected before this process was forked. */
static cb_runtime *open_runtime(lua_State *L, cbL_bus *bus) {
  cb_err err;
  if (bus->rt == NULL) cb_err_set(&err, CB_ECLOSED, "the bus is closed");
  else if (cb_runtime_check(bus->rt, &err) == CB_OK) return bus->rt;
  cbL_pusherror(L, &err);
  return NULL;
}

/* Lets go of a shared runtime: this handle is closed, the runtime is not. */
static void detach(cbL_bus *bus) {
  struct cbL_shared *s = bus->shared;
  bus->shared = NULL;
  bus->rt = NULL;
  shared_unref(s);
}

/* bus:close(): joins the loop thread and closes every connection (on a
 * shared bus: closes this handle only). Calls on a closed bus return nil, err
 * with err.code == "CLOSED". Idempotent. */
static int l_close(lua_State *L) {
  cbL_bus *bus = cbL_checkbus(L, 1);
  if (bus->shared) detach(bus);
  else if (bus->rt) cb_runtime_close(bus->rt);
  return 0;
}

static int l_gc(lua_State *L) {
  cbL_bus *bus = cbL_checkbus(L, 1);
  if (bus->shared) {
    detach(bus);
  } else if (bus->rt) {
    cb_runtime_free(bus->rt);
    bus->rt = NULL;
  }
  return 0;
}

/* Pushes a new bus object (no runtime yet). */
cbL_bus *cbL_newbus(lua_State *L) {
  cbL_bus *bus = lua_newuserdata(L, sizeof *bus);
  bus->rt = NULL;
  bus->shared = NULL;
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_setmetatable(L, -2);
  return bus;
}

/* The registry key of a set of connection parameters. */
static char *shared_key(const cb_runtime_options *o) {
  const char *app = o->application_name ? o->application_name : "";
  size_t n = strlen(o->conninfo) + strlen(app) + 64;
  char *key = malloc(n);
  if (key)
    snprintf(key, n, "%s\x1f%d\x1f%d\x1f%d\x1f%s", o->conninfo, o->pool_size, o->connect_timeout_ms,
             o->notify_after_commit, app);
  return key;
}

/* A new shared runtime for key (taken over on success), listed; NULL when
 * it cannot connect (err says why). Called under shared_lock. */
static struct cbL_shared *shared_connect(const cb_runtime_options *o, char **key, cb_err *err) {
  struct cbL_shared *s = calloc(1, sizeof *s);
  if (s == NULL) {
    cb_err_set(err, CB_ENOMEM, "out of memory");
    return NULL;
  }
  if (cb_runtime_new(o, &s->rt, err) != CB_OK) {
    free(s);
    return NULL;
  }
  s->key = *key;
  *key = NULL;
  s->refs = 1; /* listed */
  s->next = shared_head;
  shared_head = s;
  return s;
}

int cbL_bus_shared(lua_State *L, const cb_runtime_options *o) {
  cbL_bus *bus = cbL_newbus(L);
  char *key = shared_key(o);
  if (key == NULL) return cbL_pusherrorcode(L, CB_ENOMEM, "out of memory");
  cb_err err;
  cb_runtime *stale = NULL;
  pthread_mutex_lock(&shared_lock);
  if (shared_pid != getpid()) { /* the list of the process this one was forked from: not ours */
    shared_head = NULL;
    shared_pid = getpid();
  }
  struct cbL_shared **pp = &shared_head;
  while (*pp && strcmp((*pp)->key, key) != 0) pp = &(*pp)->next;
  struct cbL_shared *s = *pp;
  if (s && cb_runtime_is_closed(s->rt)) { /* closed under its handles (at exit, say): unlist it */
    *pp = s->next;
    stale = shared_unref_locked(s);
    s = NULL;
  }
  if (s == NULL) s = shared_connect(o, &key, &err); /* under the lock: one runtime per key */
  if (s) {
    s->refs++;
    bus->shared = s;
    bus->rt = s->rt;
  }
  pthread_mutex_unlock(&shared_lock);
  free(key);
  cb_runtime_free(stale);
  if (s == NULL) return cbL_pusherror(L, &err);
  return 1;
}

int cbL_close_shared(void) {
  pthread_mutex_lock(&shared_lock);
  struct cbL_shared *list = shared_pid == getpid() ? shared_head : NULL;
  shared_head = NULL;
  pthread_mutex_unlock(&shared_lock);
  int n = 0;
  while (list) {
    struct cbL_shared *next = list->next;
    cb_runtime_close(list->rt); /* joins its loop thread; handles now find it closed */
    shared_unref(list);
    list = next;
    n++;
  }
  return n;
}

static int l_is_closed(lua_State *L) {
  cbL_bus *bus = cbL_checkbus(L, 1);
  lua_pushboolean(L, bus->rt == NULL || cb_runtime_is_closed(bus->rt));
  return 1;
}

/* bus:setup() -> true, applied | nil, err: applies missing migrations. */
static int l_setup(lua_State *L) {
  cb_runtime *rt = open_runtime(L, cbL_checkbus(L, 1));
  if (rt == NULL) return 2;
  cb_err err;
  int applied = 0;
  if (cb_schema_setup(rt, &applied, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  lua_pushinteger(L, applied);
  return 2;
}

static int l_tostring(lua_State *L) {
  cbL_bus *bus = cbL_checkbus(L, 1);
  lua_pushfstring(L, "commandbus.bus (%s%s)", bus->rt && !cb_runtime_is_closed(bus->rt) ? "open" : "closed",
                  bus->shared ? ", shared" : "");
  return 1;
}

void cbL_open_bus(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"close", l_close},
      {"is_closed", l_is_closed},
      {"setup", l_setup},
      {"queue", cbL_bus_queue},
      {"list_queues", cbL_bus_list_queues},
      {"queue_metrics", cbL_bus_queue_metrics},
      {NULL, NULL},
  };
  cbL_new_class(L, CBL_BUS_MT, methods, l_gc, l_tostring);
}

cb_runtime *cbL_bus_runtime(lua_State *L, int idx) { return open_runtime(L, cbL_checkbus(L, idx)); }
