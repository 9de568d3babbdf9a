/* commandbus Lua binding: the bus's command methods (send, send_batch and the
 * queries). Arguments are checked here, before anything reaches the core:
 * wrong types raise, values the core refuses come back as nil, err. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "commandbus/awaiter.h"
#include "commandbus/bus.h"
#include "commandbus/tsq.h"

/* What a message calls the command read by cbL_read_command: `what`, or "command
 * #i" when what is NULL (an item of a list). Made only when a message needs
 * it: formatting it for every command of a large send_batch costs time.
 * Pushes the string when it makes one. */
static const char *spec_name(lua_State *L, const char *what, int i) {
  return what ? what : lua_pushfstring(L, "command #%d", i);
}

/* Raises "bad <name><rest>". The caller evaluates the arguments (type
 * names at relative indices included) before anything is pushed here. */
static int spec_raise(lua_State *L, const char *what, int i, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  const char *rest = lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  const char *name = spec_name(L, what, i);
  return luaL_error(L, "bad %s%s", name, rest);
}

/* Turns the error at the top (nil, err) into one about the command read by
 * cbL_read_command: its message gains the command's name in front. */
static int spec_error(lua_State *L, const char *what, int i) {
  int err = lua_gettop(L);
  lua_getfield(L, err, "message");
  const char *message = lua_tostring(L, -1);
  const char *name = spec_name(L, what, i);
  lua_pushfstring(L, "%s: %s", name, message ? message : "");
  lua_setfield(L, err, "message");
  lua_settop(L, err);
  return 0;
}

/* A command table's fields, in the order of the key strings that
 * push_command_keys pushes: a list of commands pushes them once, and each
 * lookup then goes by a string already in the Lua state, where
 * lua_getfield would intern its name again (with strcmp) every time. */
enum {
  K_TYPE,
  K_ID,
  K_CORRELATION_ID,
  K_REPLY_TO,
  K_BATCH_ID,
  K_DEDUP_KEY,
  K_MAX_ATTEMPTS,
  K_PRIORITY,
  K_DEDUP_FOR,
  K_DATA,
  K_ENCODER,
  K_COUNT
};
static const char *const command_keys[K_ENCODER] = {"type",      "id",        "correlation_id", "reply_to",
                                                    "batch_id",  "dedup_key", "max_attempts",   "priority",
                                                    "dedup_for", "data"};

/* Pushes the keys, then the JSON encoder (K_ENCODER); returns the index of
 * the first. */
static int push_command_keys(lua_State *L) {
  luaL_checkstack(L, K_COUNT + LUA_MINSTACK, "commands"); /* and room for reading one */
  int keys = lua_gettop(L) + 1;
  for (int k = 0; k < K_ENCODER; k++) lua_pushstring(L, command_keys[k]);
  cbL_push_json_encoder(L);
  return keys;
}

/* bus:send and bus:request read one command a call: they carry the keys
 * (command_keys, the encoder, then result_keys) as upvalues, made once
 * when the module loads, rather than push (intern) them every call. */
#define UP_RESULT_KEYS (K_COUNT + 1) /* the upvalue of the first result key */

/* Pushes upvalues first .. first + n - 1; returns the index of the first. */
static int push_upvalues(lua_State *L, int first, int n) {
  luaL_checkstack(L, n + LUA_MINSTACK, "commands");
  int at = lua_gettop(L) + 1;
  for (int k = 0; k < n; k++) lua_pushvalue(L, lua_upvalueindex(first + k));
  return at;
}

/* Pushes the command's field k (as lua_getfield would) and returns its type. */
static int get_key(lua_State *L, int idx, int keys, int k) {
  lua_pushvalue(L, keys + k);
  lua_gettable(L, idx);
  return lua_type(L, -1);
}

/* A number field, checked with cbL_integer_at's or cbL_number_at's range;
 * nil leaves *out as it is. */
static int number_key(lua_State *L, int idx, int keys, int k, const char *what, int i, const char *expected, double min,
                      double max, int integral, double *out) {
  int type = get_key(L, idx, keys, k);
  if (type == LUA_TNIL) {
    lua_pop(L, 1);
    return 1;
  }
  if (type != LUA_TNUMBER)
    spec_raise(L, what, i, " field '%s': %s, got %s", command_keys[k], expected, lua_typename(L, type));
  int64_t whole;
  int ok = integral ? cbL_integer_at(L, -1, command_keys[k], (int64_t)min, (int64_t)max, &whole)
                    : cbL_number_at(L, -1, command_keys[k], min, max, out);
  if (!ok) return spec_error(L, what, i);
  if (integral) *out = (double)whole;
  lua_pop(L, 1);
  return 1;
}

/* A table with a metatable may hand out, through __index, strings that
 * nothing else references: popped from the stack, the collector may free
 * them while the call still points at their text. When the table at idx
 * has one, its fields `names` (NULL-terminated) are copied, read as the
 * table gives them, into a plain table that takes its stack slot (and
 * keeps them alive as long as that slot); returns 1 then. */
static int plain_fields(lua_State *L, int idx, const char *const *names) {
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) != LUA_TTABLE || !lua_getmetatable(L, idx)) return 0;
  lua_pop(L, 1);
  lua_newtable(L);
  for (int k = 0; names[k]; k++) {
    lua_getfield(L, idx, names[k]);
    lua_setfield(L, -2, names[k]);
  }
  lua_replace(L, idx);
  return 1;
}

static const char *const command_fields[] = {"type",      "id",           "correlation_id", "reply_to",  "batch_id",
                                             "dedup_key", "max_attempts", "priority",       "dedup_for", "data",
                                             NULL};

static int read_command(lua_State *L, int idx, int anchor_idx, int i, cb_command_spec *spec, const char *what,
                        int keys) {
  idx = lua_absindex(L, idx);
  memset(spec, 0, sizeof *spec);
  if (lua_type(L, idx) != LUA_TTABLE) spec_raise(L, what, i, ": table expected, got %s", luaL_typename(L, idx));
  /* The copy is kept by the anchor for an item of a list, by the argument's
   * own slot for a single command (i 0). The call's other options (domain,
   * delay) stay alive on the stack (cbL_field_text, cbL_opt_text). */
  if (plain_fields(L, idx, command_fields) && i > 0) {
    lua_pushvalue(L, idx);
    lua_rawseti(L, anchor_idx, -i);
  }
  const char **strings[] = {
      [K_TYPE] = &spec->command_type, [K_ID] = &spec->command_id,     [K_CORRELATION_ID] = &spec->correlation_id,
      [K_REPLY_TO] = &spec->reply_to, [K_BATCH_ID] = &spec->batch_id, [K_DEDUP_KEY] = &spec->dedup_key};
  for (int k = K_TYPE; k <= K_DEDUP_KEY; k++) {
    int type = get_key(L, idx, keys, k);
    if (type == LUA_TNIL) {
      lua_pop(L, 1);
      continue;
    }
    if (type != LUA_TSTRING)
      spec_raise(L, what, i, " field '%s': string expected, got %s", command_keys[k], lua_typename(L, type));
    if (!cbL_text_at(L, -1, command_keys[k], strings[k])) return spec_error(L, what, i);
    lua_pop(L, 1); /* still referenced by the command's table */
  }
  if (spec->command_type == NULL) spec_raise(L, what, i, ": field 'type' is required");
  double max_attempts = 0, priority = 0;
  if (!number_key(L, idx, keys, K_MAX_ATTEMPTS, what, i, "integer expected", 1, CBL_MAX_ATTEMPTS, 1, &max_attempts) ||
      !number_key(L, idx, keys, K_PRIORITY, what, i, "integer expected", CB_PRIORITY_MIN, CB_PRIORITY_MAX, 1,
                  &priority) ||
      !number_key(L, idx, keys, K_DEDUP_FOR, what, i, "number of seconds expected", CBL_TIMING_MIN, CBL_AGE_MAX, 0,
                  &spec->dedup_for))
    return 0;
  spec->max_attempts = (int)max_attempts;
  spec->priority = (int)priority;
  if (get_key(L, idx, keys, K_DATA) != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TTABLE)
      spec_raise(L, what, i, " field 'data': table expected, got %s", luaL_typename(L, -1));
    if (!cbL_json_encode_by(L, keys + K_ENCODER, -1)) {
      const char *why = lua_tostring(L, -1);
      const char *name = spec_name(L, what, i);
      cbL_pusherrorcode(L, CB_EINVAL, "cannot encode %s data as JSON: %s", name, why ? why : "?");
      return 0;
    }
    spec->data_json = lua_tostring(L, -1);
    if (!cbL_json_is_object(spec->data_json)) spec_raise(L, what, i, " field 'data': " CBL_DATA_NOT_OBJECT);
    /* keeps the string alive: in the table anchor_idx at i, or (i 0, a
     * single command) in the stack slot anchor_idx itself */
    if (i > 0) lua_rawseti(L, anchor_idx, i);
    else lua_replace(L, anchor_idx);
  }
  lua_pop(L, 1);
  return 1;
}

int cbL_read_command(lua_State *L, int idx, int anchor_idx, int i, cb_command_spec *spec, const char *what) {
  idx = lua_absindex(L, idx);
  int keys = push_command_keys(L);
  if (!read_command(L, idx, anchor_idx, i, spec, what, keys)) return 0; /* nil, err on top */
  lua_settop(L, keys - 1);
  return 1;
}

/* A result's keys, pushed once for a list of results (as the command
 * keys are). */
enum { R_COMMAND_ID, R_MSG_ID, R_DUPLICATE, R_DUPLICATE_OF, R_COUNT };
static const char *const result_keys[R_COUNT] = {"command_id", "msg_id", "duplicate", "duplicate_of"};
static int push_result_keys(lua_State *L) {
  luaL_checkstack(L, R_COUNT + LUA_MINSTACK, "results");
  int keys = lua_gettop(L) + 1;
  for (int k = 0; k < R_COUNT; k++) lua_pushstring(L, result_keys[k]);
  return keys;
}

static void push_result_with(lua_State *L, const cb_send_result *r, int keys) {
  lua_createtable(L, 0, r->duplicate ? 3 : 2);
  lua_pushvalue(L, keys + R_COMMAND_ID);
  lua_pushlstring(L, r->command_id, strlen(r->command_id));
  lua_rawset(L, -3);
  if (r->duplicate) {
    lua_pushvalue(L, keys + R_DUPLICATE);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pushvalue(L, keys + R_DUPLICATE_OF);
    lua_pushstring(L, r->duplicate_of);
    lua_rawset(L, -3);
  } else {
    lua_pushvalue(L, keys + R_MSG_ID);
    cbL_pushint64(L, r->msg_id);
    lua_rawset(L, -3);
  }
}

/* The result of bus:send (its keys from its upvalues). */
static void push_result(lua_State *L, const cb_send_result *r) {
  int keys = push_upvalues(L, UP_RESULT_KEYS, R_COUNT);
  push_result_with(L, r, keys);
  lua_replace(L, keys);
  lua_settop(L, keys);
}

/* Reads the list of command tables at `list` into specs. With a stream
 * under way (stream not NULL, *stream set), hands them over a piece at a
 * time: the server writes the first ones while the rest are read; a
 * stream that cannot take one of them is gone (*stream NULL), and the send
 * then goes as it would without. Returns 0 after pushing nil, err when a
 * command's data cannot be encoded. */
static int read_specs(lua_State *L, int list, int anchor, size_t n, cb_command_spec *specs, cb_send_stream **stream) {
  int keys = push_command_keys(L);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, list, (int)i + 1);
    if (!read_command(L, -1, anchor, (int)i + 1, &specs[i], NULL, keys)) return 0;
    lua_pop(L, 1);
    /* About the COPY path's pieces, so that the first is there early. */
    if (stream && *stream && ((i + 1) % 256 == 0 || i + 1 == n) && !cb_bus_stream_add(*stream, i + 1)) *stream = NULL;
  }
  lua_settop(L, keys - 1);
  return 1;
}

static void push_results(lua_State *L, const cb_send_result *results, size_t n) {
  int keys = push_result_keys(L);
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    push_result_with(L, &results[i], keys);
    lua_rawseti(L, -2, (int)i + 1);
  }
  lua_replace(L, keys);
  lua_settop(L, keys);
}

/* The {domain=, delay=} fields every send has. */
static int send_fields(lua_State *L, const char **domain, double *delay) {
  return cbL_field_text(L, 2, "domain", domain) && cbL_opt_number(L, 2, "delay", 0, 0, CBL_DELAY_MAX, delay);
}

/* The one command of send and request, from the table at 2: its domain,
 * delay and fields (its data's JSON text kept alive in a stack slot pushed
 * for it), and the bus's runtime; NULL with nil, err pushed when something
 * is wrong. The keys come from the calling function's upvalues. */
static cb_runtime *one_command(lua_State *L, const char **domain, double *delay, cb_command_spec *spec) {
  if (!send_fields(L, domain, delay)) return NULL;
  lua_pushnil(L);
  int anchor = lua_gettop(L);
  int keys = push_upvalues(L, 1, K_COUNT);
  if (!read_command(L, 2, anchor, 0, spec, "command", keys)) return NULL; /* nil, err on top */
  lua_settop(L, anchor);
  return cbL_bus_runtime(L, 1);
}

/* bus:send{domain=, type=, data=, id=, correlation_id=, reply_to=,
 *          max_attempts=, delay=, batch_id=, priority=, dedup_key=, dedup_for=}
 * -> {command_id=, msg_id=} | nil, err (DUPLICATE_COMMAND: err.command_id is
 * the command already there, or the one holding the dedup key) */
static int l_send(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  const char *domain;
  double delay;
  cb_command_spec spec;
  cb_runtime *rt = one_command(L, &domain, &delay, &spec);
  if (rt == NULL) return 2;
  cb_send_result result;
  cb_err err;
  if (cb_bus_send(rt, domain, &spec, 1, delay, &result, &err) != CB_OK) {
    cbL_pusherror(L, &err);
    if (err.code == CB_EDUPLICATE) { /* the command that is there: the same id, or the dedup key's holder */
      lua_pushstring(L, result.duplicate_of);
      lua_setfield(L, -2, "command_id");
    }
    return 2;
  }
  push_result(L, &result);
  return 1;
}

/* The commands field of the table at 2, a list: pushes it and returns its
 * length (raises when it is not a table). */
static size_t commands_field(lua_State *L) {
  lua_getfield(L, 2, "commands");
  if (lua_type(L, -1) != LUA_TTABLE)
    luaL_error(L, "bad option 'commands': table expected, got %s", luaL_typename(L, -1));
  return lua_rawlen(L, -1);
}

/* How far send_batch got, for l_send_batch when it raised. */
typedef struct batch_call {
  cb_send_stream *stream; /* a stream under way: abandoned when the call raises */
} batch_call;

/* send_batch once its two arguments are checked, run protected by
 * l_send_batch; the table at 3 keeps what the call makes alive until
 * l_send_batch has abandoned a stream. */
static int send_batch(lua_State *L) {
  batch_call *call = lua_touserdata(L, 4);
  lua_settop(L, 3);
  const char *domain;
  double delay;
  if (!send_fields(L, &domain, &delay)) return 2;
  size_t n = commands_field(L);
  int list = lua_gettop(L);
  lua_createtable(L, (int)n, 0);
  int anchor = lua_gettop(L);
  lua_pushvalue(L, anchor);
  lua_rawseti(L, 3, 1);
  cb_command_spec *specs = NULL;
  cb_send_result *results = NULL;
  if (n > 0) {
    specs = lua_newuserdata(L, n * sizeof *specs);
    lua_rawseti(L, 3, 2);
    results = lua_newuserdata(L, n * sizeof *results);
    lua_rawseti(L, 3, 3);
    /* A bus that cannot send now does not stream: the send below says why,
     * once the commands are read, as it always did. */
    int top = lua_gettop(L);
    cb_runtime *rt = cbL_bus_runtime(L, 1);
    lua_settop(L, top);
    if (rt) call->stream = cb_bus_stream_start(rt, domain, specs, results, n, delay);
    if (!read_specs(L, list, anchor, n, specs, &call->stream)) return 2;
  }
  if (call->stream) {
    /* While the server writes, the answers are made from the drawn ids. */
    int answered = cb_bus_stream_ids(call->stream);
    if (answered) push_results(L, results, n);
    cb_err err;
    cb_send_stream *stream = call->stream;
    call->stream = NULL;
    if (cb_bus_stream_finish(stream, &err) != CB_OK) return cbL_pusherror(L, &err);
    return 1;
  }
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_err err;
  /* With no commands this still checks the domain. */
  if (cb_bus_send(rt, domain, specs, n, delay, results, &err) != CB_OK) return cbL_pusherror(L, &err);
  push_results(L, results, n);
  return 1;
}

/* bus:send_batch{domain=, commands={{type=, data=, ...}, ...}, delay=}
 * -> {{command_id=, msg_id=} or {command_id=, duplicate=true}, ...} | nil, err
 * One round trip and one transaction for all.
 *
 * The body runs protected: when it raises while a stream is under way
 * (cb_bus_stream_start: a bad command found after the first ones went),
 * the stream is abandoned, and the transaction rolled back, before the
 * error goes on.
 *
 * Under Lua 5.4 the collector is paused for the call (when it was running):
 * what the call makes (each command's JSON text, kept until the call
 * returns, and the result tables it returns) is not garbage before the call
 * returns, so the steps the collector would take meanwhile would only
 * traverse the caller's live tables; for 50,000 commands that was about a
 * third of the call's own CPU before the first byte reached the server.
 * LuaJIT cannot tell whether its collector is running, and is left as it
 * is. */
static int l_send_batch(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  batch_call call = {NULL};
  lua_newtable(L); /* 3: keeps the commands' JSON and the arrays alive until the end */
#if LUA_VERSION_NUM >= 504
  int paused = lua_gc(L, LUA_GCISRUNNING, 0);
  if (paused) lua_gc(L, LUA_GCSTOP, 0);
#endif
  lua_pushcfunction(L, send_batch);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 3);
  lua_pushlightuserdata(L, &call);
  int status = lua_pcall(L, 4, LUA_MULTRET, 0);
  if (call.stream) cb_bus_stream_abandon(call.stream);
#if LUA_VERSION_NUM >= 504
  if (paused) lua_gc(L, LUA_GCRESTART, 0);
#endif
  if (status != 0) return lua_error(L);
  return lua_gettop(L) - 3;
}

/* bus:get_command(domain, id) -> record | nil, err (NOT_FOUND) */
static int l_get_command(lua_State *L) {
  const char *domain, *id;
  if (!cbL_args_domain_id(L, &domain, &id)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_bus_get_command(rt, domain, id, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* The {limit=100, offset=0} of a list. */
static int page_fields(lua_State *L, int *limit, int *offset) {
  return cbL_opt_int(L, 2, "limit", 100, 1, CBL_COUNT_MAX, limit) &&
         cbL_opt_int(L, 2, "offset", 0, 0, CBL_OFFSET_MAX, offset);
}

/* bus:list_commands{domain=, status=, type=, correlation_id=, batch_id=, limit=, offset=} */
static int l_list_commands(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  cb_command_filter f = {0};
  if (!cbL_field_text(L, 2, "domain", &f.domain) || !cbL_opt_text(L, 2, "status", NULL, &f.status) ||
      !cbL_opt_text(L, 2, "type", NULL, &f.command_type) ||
      !cbL_opt_text(L, 2, "correlation_id", NULL, &f.correlation_id) ||
      !cbL_opt_text(L, 2, "batch_id", NULL, &f.batch_id) || !page_fields(L, &f.limit, &f.offset))
    return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_bus_list_commands(rt, &f, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* bus:audit(domain, id) -> {{audit_id=, event_type=, ts=, details=}, ...} */
static int l_audit(lua_State *L) {
  const char *domain, *id;
  if (!cbL_args_domain_id(L, &domain, &id)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_bus_audit(rt, domain, id, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* bus:create_batch{domain=, name=, custom_data=, commands={...}}
 * -> {batch_id=, commands={{command_id=, msg_id=}, ...}} | nil, err */
static int l_create_batch(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  const char *domain, *name, *custom;
  if (!cbL_field_text(L, 2, "domain", &domain) || !cbL_opt_text(L, 2, "name", NULL, &name)) return 2;
  size_t n = commands_field(L);
  int list = lua_gettop(L);
  if (!cbL_opt_json(L, 2, "custom_data", &custom)) return 2;
  lua_createtable(L, (int)n, 0);
  int anchor = lua_gettop(L);
  if (n == 0) return cbL_pusherrorcode(L, CB_EINVAL, "a batch needs at least one command");
  /* userdata, so that a raise on a bad field leaks nothing */
  cb_command_spec *specs = lua_newuserdata(L, n * sizeof *specs);
  cb_send_result *results = lua_newuserdata(L, n * sizeof *results);
  if (!read_specs(L, list, anchor, n, specs, NULL)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  char batch_id[CB_UUID_LEN + 1];
  cb_err err;
  if (cb_bus_create_batch(rt, domain, name, custom, specs, n, results, batch_id, &err) != CB_OK)
    return cbL_pusherror(L, &err);
  lua_createtable(L, 0, 2);
  lua_pushstring(L, batch_id);
  lua_setfield(L, -2, "batch_id");
  push_results(L, results, n);
  lua_setfield(L, -2, "commands");
  return 1;
}

/* bus:get_batch(domain, id) -> batch with exact counts | nil, err */
static int l_get_batch(lua_State *L) {
  const char *domain, *id;
  if (!cbL_args_domain_id(L, &domain, &id)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_bus_get_batch(rt, domain, id, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* bus:list_batches{domain=, status=, limit=, offset=} */
static int l_list_batches(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  const char *domain, *status;
  int limit, offset;
  if (!cbL_field_text(L, 2, "domain", &domain) || !cbL_opt_text(L, 2, "status", NULL, &status) ||
      !page_fields(L, &limit, &offset))
    return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_bus_list_batches(rt, domain, status, limit, offset, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 0);
}

/* bus:tsq_list{domain=, type=, limit=, offset=} -> {items={...}, total=n} */
static int l_tsq_list(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  const char *domain, *type;
  int limit, offset;
  if (!cbL_field_text(L, 2, "domain", &domain) || !cbL_opt_text(L, 2, "type", NULL, &type) ||
      !page_fields(L, &limit, &offset))
    return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  int64_t total;
  cb_err err;
  int rc = cb_tsq_list(rt, domain, type, limit, offset, &rows, &total, &err);
  if (rc != CB_OK) return cbL_pusherror(L, &err);
  lua_createtable(L, 0, 2);
  cbL_push_rows(L, cb_unit_result(rows, 1));
  lua_setfield(L, -2, "items");
  cbL_pushint64(L, total);
  lua_setfield(L, -2, "total");
  cb_unit_free(rows);
  return 1;
}

/* An operator action's options at argument arg: {operator=, reason=}
 * (reason NULL: the action takes its reason elsewhere). */
static int opt_operator(lua_State *L, int arg, const char **op, const char **reason) {
  cbL_opt_table(L, arg);
  if (reason && !cbL_opt_text(L, arg, "reason", NULL, reason)) return 0;
  return cbL_opt_text(L, arg, "operator", NULL, op);
}

/* bus:tsq_retry(domain, id, {operator=, reason=}) -> new msg_id | nil, err */
static int l_tsq_retry(lua_State *L) {
  const char *domain, *id, *op, *reason;
  if (!cbL_args_domain_id(L, &domain, &id) || !opt_operator(L, 4, &op, &reason)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  int64_t msg_id;
  cb_err err;
  if (cb_tsq_retry(rt, domain, id, op, reason, &msg_id, &err) != CB_OK) return cbL_pusherror(L, &err);
  cbL_pushint64(L, msg_id);
  return 1;
}

/* bus:tsq_cancel(domain, id, reason, {operator=}) -> true | nil, err */
static int l_tsq_cancel(lua_State *L) {
  const char *domain, *id, *op, *reason = "";
  if (!cbL_args_domain_id(L, &domain, &id) || (!lua_isnoneornil(L, 4) && !cbL_arg_text(L, 4, "reason", &reason)) ||
      !opt_operator(L, 5, &op, NULL))
    return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_err err;
  if (cb_tsq_cancel(rt, domain, id, reason, op, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* bus:tsq_complete(domain, id, result, {operator=, reason=}) -> true | nil, err */
static int l_tsq_complete(lua_State *L) {
  const char *domain, *id, *op, *reason, *result;
  if (!cbL_args_domain_id(L, &domain, &id) || !cbL_arg_json(L, 4, "the result", &result) ||
      !opt_operator(L, 5, &op, &reason))
    return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_err err;
  if (cb_tsq_complete(rt, domain, id, result, op, reason, &err) != CB_OK) return cbL_pusherror(L, &err);
  lua_pushboolean(L, 1);
  return 1;
}

/* bus:await(domain, command_id, {timeout=30, listen=true}) -> the command once
 * it is COMPLETED, FAILED, CANCELED or in the TSQ | nil, err (TIMEOUT,
 * NOT_FOUND). Blocks only the calling thread; listen as for await_process. */
static int l_await(lua_State *L) {
  const char *domain, *id;
  double timeout;
  int flags;
  if (!cbL_args_domain_id(L, &domain, &id) || !cbL_await_options(L, 4, &timeout, &flags)) return 2;
  cb_runtime *rt = cbL_bus_runtime(L, 1);
  if (rt == NULL) return 2;
  cb_unit *rows;
  cb_err err;
  int rc = cb_await_command(rt, domain, id, timeout, flags, &rows, &err);
  return cbL_push_query(L, rc, rows, &err, 1);
}

/* bus:request{domain=, type=, ... (the fields of send), timeout=30, listen=true}
 * -> the command once it is COMPLETED, FAILED, CANCELED or in the TSQ |
 * nil, err: as send's (DUPLICATE_COMMAND, with err.command_id) when the send
 * is refused, then as await's (TIMEOUT...), err.command_id naming the
 * command sent. The send's transaction registers the waiter: no await round
 * of its own. */
static int l_request(lua_State *L) {
  cbL_checkbus(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  const char *domain;
  double delay, timeout;
  int flags = cbL_opt_boolean(L, 2, "listen", 1) ? 0 : CB_AWAIT_NO_LISTEN;
  if (!cbL_opt_number(L, 2, "timeout", 30, 0, CBL_DELAY_MAX, &timeout)) return 2;
  cb_command_spec spec;
  cb_runtime *rt = one_command(L, &domain, &delay, &spec);
  if (rt == NULL) return 2;
  cb_send_result result;
  cb_unit *rows;
  cb_err err;
  int rc = cb_await_send(rt, domain, &spec, delay, timeout, flags, &result, &rows, &err);
  if (rc == CB_OK) return cbL_push_query(L, rc, rows, &err, 1);
  cbL_pusherror(L, &err);
  const char *command = rc == CB_EDUPLICATE ? result.duplicate_of : result.msg_id != 0 ? result.command_id : NULL;
  if (command) {
    lua_pushstring(L, command);
    lua_setfield(L, -2, "command_id");
  }
  return 2;
}

void cbL_open_commands(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"send_batch", l_send_batch},
      {"get_command", l_get_command},
      {"list_commands", l_list_commands},
      {"audit", l_audit},
      {"create_batch", l_create_batch},
      {"get_batch", l_get_batch},
      {"list_batches", l_list_batches},
      {"tsq_list", l_tsq_list},
      {"tsq_retry", l_tsq_retry},
      {"tsq_cancel", l_tsq_cancel},
      {"tsq_complete", l_tsq_complete},
      {"await", l_await},
      {NULL, NULL},
  };
  static const luaL_Reg one_command_methods[] = {
      {"send", l_send},
      {"request", l_request},
      {NULL, NULL},
  };
  luaL_getmetatable(L, CBL_BUS_MT);
  lua_getfield(L, -1, "__index");
  luaL_setfuncs(L, methods, 0);
  push_command_keys(L);
  push_result_keys(L);
  luaL_setfuncs(L, one_command_methods, K_COUNT + R_COUNT); /* their upvalues */
  lua_pop(L, 2);
}
