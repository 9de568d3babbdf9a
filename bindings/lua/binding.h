/* commandbus Lua binding: what the binding's files share, and the bridge
 * between the Lua 5.4 and LuaJIT (5.1) C APIs, so that one source builds for
 * both. */
#ifndef COMMANDBUS_BINDING_H
#define COMMANDBUS_BINDING_H

#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>
#include <stdio.h>

#include "commandbus/bus.h"
#include "commandbus/engine.h"
#include "commandbus/error.h"
#include "commandbus/runtime.h"
#include "commandbus/upkeep.h"

/* ---- compatibility ------------------------------------------------------------ */

#if LUA_VERSION_NUM < 502
#define lua_rawlen(L, i) lua_objlen((L), (i))
#define lua_absindex(L, i) ((i) > 0 || (i) <= LUA_REGISTRYINDEX ? (i) : lua_gettop(L) + (i) + 1)
#endif

/* LuaJIT numbers are doubles: integers beyond 2^53 would silently round, so
 * they travel as decimal strings there. Lua 5.4 has 64-bit integers. */
static inline void cbL_pushint64(lua_State *L, int64_t v) {
#if LUA_VERSION_NUM >= 503
  lua_pushinteger(L, (lua_Integer)v);
#else
  if (v > 9007199254740992LL || v < -9007199254740992LL) {
    char buf[24];
    snprintf(buf, sizeof buf, "%lld", (long long)v);
    lua_pushstring(L, buf);
  } else {
    lua_pushnumber(L, (lua_Number)v);
  }
#endif
}

/* tostring(value at idx), pushed on the stack (luaL_tolstring is 5.2+).
 * Never raises: a __tostring that raises or gives no string yields the
 * value's type name and why. */
const char *cbL_tostring(lua_State *L, int idx);

/* ---- checks at the door (checks.c) ---------------------------------------------
 * Every value a caller passes goes through one of these. A value of the wrong
 * type is misuse and raises. A value of the right type that cannot be used
 * (NaN, an infinity, out of range, a fraction where an integer is meant, a
 * NUL byte, invalid UTF-8) pushes nil and an INVALID_ARGUMENT error that
 * names the option and its allowed range, and returns 0: the caller returns
 * those two values. On success they return 1 and store the value.
 * cbL_arg_* read argument `arg`; cbL_opt_* read field `name` of the options
 * table at idx (which may be none or nil; then, or when the field is nil,
 * the default). Integer ranges lie within +-2^53; cbL_*int64* take the whole
 * int64 range and decimal strings too (LuaJIT's large ids). */

/* The ranges the README documents, in seconds. */
#define CBL_DELAY_MAX 31536000.0 /* 365 days: delays, visibility of queue reads, waits */
#define CBL_TIMING_MAX 604800.0  /* 7 days: timings of workers and routers (kept in int milliseconds) */
#define CBL_AGE_MAX 3153600000.0 /* 100 years: ages of records */
#define CBL_TIMING_MIN 0.001     /* a millisecond */
#define CBL_COUNT_MAX 1000000    /* qty, limit */
#define CBL_OFFSET_MAX 2147483647
#define CBL_MAX_ATTEMPTS 1000
#define CBL_THREADS_MAX 1024

int cbL_arg_number(lua_State *L, int arg, const char *name, double min, double max, double *out);
int cbL_arg_integer(lua_State *L, int arg, const char *name, int64_t min, int64_t max, int64_t *out);
int cbL_arg_int64(lua_State *L, int arg, const char *name, int64_t min, int64_t max, int64_t *out);
/* A string without NUL bytes, valid UTF-8 (names, ids and text alike). */
int cbL_arg_text(lua_State *L, int arg, const char *name, const char **out);
/* The number at stack index idx, named as option `name` in messages. */
int cbL_number_at(lua_State *L, int idx, const char *name, double min, double max, double *out);
/* The same for an integer, and for text (as cbL_arg_text's). */
int cbL_integer_at(lua_State *L, int idx, const char *name, int64_t min, int64_t max, int64_t *out);
int cbL_text_at(lua_State *L, int idx, const char *name, const char **out);
int cbL_opt_number(lua_State *L, int idx, const char *name, double def, double min, double max, double *out);
int cbL_opt_integer(lua_State *L, int idx, const char *name, int64_t def, int64_t min, int64_t max, int64_t *out);
int cbL_opt_int(lua_State *L, int idx, const char *name, int def, int min, int max, int *out);
/* A text field: its string is left on the stack (nothing when absent), for
 * the caller to keep while it uses the text (an options table's __index may
 * make the string, then nothing else holds it). */
int cbL_opt_text(lua_State *L, int idx, const char *name, const char *def, const char **out);
/* A required text field, left on the stack the same way: nil raises like
 * any wrong type. */
int cbL_field_text(lua_State *L, int idx, const char *name, const char **out);
/* The value at idx as an int64 (number or decimal string); returns 0 without
 * raising for other types (the caller says what it expected), or after
 * pushing nil, err for a value out of [min, max]. */
int cbL_int64_at(lua_State *L, int idx, const char *name, int64_t min, int64_t max, int64_t *out);
/* A table in field `name` of the table at idx, or argument arg, encoded as
 * JSON for PostgreSQL (see cbL_json_encode); *json is NULL for nil. The
 * field's JSON text is left on the stack (one value, nil when absent) for
 * the caller to keep; the argument's replaces it in its slot. */
int cbL_opt_json(lua_State *L, int idx, const char *name, const char **json);
int cbL_arg_json(lua_State *L, int arg, const char *name, const char **json);
/* Field `name` of the table at idx: a module name (text) or a table, left on
 * the stack; *type tells which. Raises for other types. */
int cbL_opt_module(lua_State *L, int idx, const char *name, int *type);
/* Arguments #2 and #3 of a lookup such as bus:get_command(domain, id). */
int cbL_args_domain_id(lua_State *L, const char **domain, const char **id);
/* Raises unless argument arg is none, nil or a table. */
void cbL_opt_table(lua_State *L, int arg);
/* A boolean option (raises for another type). */
int cbL_opt_boolean(lua_State *L, int idx, const char *name, int def);

/* The offset of the first byte of text that is not well-formed UTF-8, or
 * CBL_VALID. */
#define CBL_VALID ((size_t)-1)
size_t cbL_utf8_invalid_at(const char *text, size_t len);
/* Pushes the string at idx made storable as PostgreSQL text: each NUL byte
 * and each byte of an invalid UTF-8 sequence becomes U+FFFD. For text that
 * must be recorded whatever it holds (a handler's error message). */
const char *cbL_storable_text(lua_State *L, int idx);

/* ---- errors (errors.c) ------------------------------------------------------- */

/* Pushes nil and an error object {code=, message=, sqlstate=}; returns 2. */
int cbL_pusherror(lua_State *L, const cb_err *err);
int cbL_pusherrorcode(lua_State *L, int code, const char *fmt, ...);
void cbL_open_errors(lua_State *L);
/* Pushes the error objects' metatable. */
void cbL_push_error_metatable(lua_State *L);
/* Registers the metatable `name`: methods as __index, gc as __gc (and as
 * __close under Lua 5.4), tostring as __tostring; gc and tostring may be
 * NULL. Leaves the stack as it was. */
void cbL_new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc, lua_CFunction tostring);

/* ---- JSON through a private lua-cjson instance (json.c) ----------------------- */

void cbL_open_json(lua_State *L);
/* Encodes the value at idx for PostgreSQL; pushes the JSON string and
 * returns 1, or pushes an error message and returns 0: when cjson cannot
 * encode it (NaN, a function, a sparse array...) and when PostgreSQL could
 * not store it (a NUL character, text that is not UTF-8). */
int cbL_json_encode(lua_State *L, int idx);
/* The same without the PostgreSQL checks (values that never leave the process). */
int cbL_json_encode_any(lua_State *L, int idx);
/* Pushes the encoder cbL_json_encode calls; cbL_json_encode_by calls the
 * one at `encoder`: a loop over many values looks it up once. */
void cbL_push_json_encoder(lua_State *L);
int cbL_json_encode_by(lua_State *L, int encoder, int idx);
/* Whether a JSON text made by these encoders is an object. A command's data
 * must be one (the contract shared with rcmd), and lua-cjson writes a Lua
 * list, or any table whose keys are all positive integers, as an array. */
#define cbL_json_is_object(json) ((json)[0] == '{')
/* The message a caller gets for command data that is not an object. */
#define CBL_DATA_NOT_OBJECT "JSON object expected, got a table that encodes as an array"
/* Decodes a JSON text; pushes the value (or nil+message: returns 0). */
int cbL_json_decode(lua_State *L, const char *text);

/* ---- the bus (bus.c) ------------------------------------------------------- */

#define CBL_BUS_MT "commandbus.bus"

typedef struct cbL_bus {
  cb_runtime *rt;            /* NULL once freed (or detached) */
  struct cbL_shared *shared; /* a handle on the process's shared runtime; NULL: rt is the bus's own */
} cbL_bus;

cbL_bus *cbL_checkbus(lua_State *L, int idx);
void cbL_open_bus(lua_State *L);
/* Pushes a new bus object without a runtime. */
cbL_bus *cbL_newbus(lua_State *L);
/* core.shared: pushes a handle on the process's shared runtime for these
 * options, connecting it first when there is none (or nil, err). */
int cbL_bus_shared(lua_State *L, const cb_runtime_options *o);
/* core.close_shared: closes every shared runtime of the process; returns how
 * many. Handles on them then answer CLOSED; a later core.shared connects
 * anew. */
int cbL_close_shared(void);

/* ---- queues (queue.c) ---------------------------------------------------- */

void cbL_open_queue(lua_State *L);
/* bus:queue(name): pushes the queue object (or nil, err). */
int cbL_bus_queue(lua_State *L);
int cbL_bus_list_queues(lua_State *L);
int cbL_bus_queue_metrics(lua_State *L);
/* Pushes one queue's metrics as queue:metrics() gives them. */
struct cb_queue_metrics;
void cbL_push_queue_metrics(lua_State *L, const struct cb_queue_metrics *m);
/* The runtime of the open bus at idx, or NULL after pushing nil, CLOSED. */
cb_runtime *cbL_bus_runtime(lua_State *L, int idx);

/* ---- rows (rows.c) and commands (commands.c) --------------------------- */

void cbL_push_row(lua_State *L, const cb_result *r, int row);
void cbL_push_rows(lua_State *L, const cb_result *r);
/* The answer of a core query: nil, err when rc failed; else its rows (the
 * last statement of `rows`, which is freed) as one table, or as a list. */
int cbL_push_query(lua_State *L, int rc, cb_unit *rows, cb_err *err, int single);
void cbL_open_commands(lua_State *L);
/* Reads the command table at idx into spec (type, data, id, correlation_id,
 * reply_to, batch_id, max_attempts); `what` names it in messages (NULL:
 * "command #i"). Strings stay owned by Lua (the table is the caller's
 * argument); encoded data is kept in the anchor table at anchor_idx, slot i.
 * Raises on wrong types; returns 0 after pushing nil, err for a bad value. */
int cbL_read_command(lua_State *L, int idx, int anchor_idx, int i, cb_command_spec *spec, const char *what);

/* ---- processes (process.c) ----------------------------------------------- */

void cbL_open_process(lua_State *L);
/* The {timeout=30, listen=true} options of the await functions at argument
 * arg: listen = false gives CB_AWAIT_NO_LISTEN in *flags. */
int cbL_await_options(lua_State *L, int arg, double *timeout, int *flags);
/* Hands up to max queued process events to the sink function of the bus at
 * bus_idx (see bus:on_process_event); returns how many. */
int cbL_dispatch_events(lua_State *L, int bus_idx, int max);

/* ---- lane threads (lanes.c) ----------------------------------------------- */

typedef struct cbL_lanes cbL_lanes;
/* Runs on each lane thread with its own state, where the module's value is at
 * index 1; L is NULL when the module failed to load (the lane must still run
 * its loop so that its work is handed back). */
typedef void (*cbL_lane_fn)(lua_State *L, int lane, void *arg);
cbL_lanes *cbL_lanes_start(lua_State *L, int count, const char *module, cbL_lane_fn fn, void *arg, cb_err *err);
/* Joins every lane thread and frees. */
void cbL_lanes_join(cbL_lanes *lanes);
int cbL_lanes_running(const cbL_lanes *lanes);

/* ---- runners: workers and reply routers (runner.c) ------------------------ */

/* What a Lua runner type is made of besides its engine (commandbus/engine.h),
 * which drives every kind alike. */
typedef struct cbL_runner_class {
  const char *mt;   /* its metatable */
  const char *name; /* in messages: "worker", "reply router" */
  const char *type; /* as Lua spells it: "worker", "reply_router" */
  const char *code; /* what its lanes run: "handlers", "managers" */
  void (*free)(void *runner);
  /* One round of a lane: takes what the lane has (waiting up to timeout_ms)
   * and handles it with the code table at index `code` of L; L is NULL when
   * the module failed to load (the work goes back, undone). 0 once the lane
   * has ended. */
  int (*lane_round)(lua_State *L, int code, void *runner, int lane, int timeout_ms);
  /* Optional: adds the kind's own fields to the health table at the top. */
  void (*health)(lua_State *L, void *runner);
} cbL_runner_class;

typedef struct cbL_runner cbL_runner;
/* Registers the class (methods run, start, stop, health, in_flight, close)
 * and bus:<type>{...}, the constructor. */
void cbL_runner_open(lua_State *L, const cbL_runner_class *cls, lua_CFunction constructor);
/* The start of bus:<type>{...} (argument 1 the bus, 2 the options): the
 * options every runner takes, domain, concurrency (*lanes; 0 when absent),
 * the three timings (defaults in the pointed-to values) and the code (field
 * cls->code: a module name, or a table, which runs on run()'s thread as the
 * only lane: *lanes is 1). Pushes the object, empty until cbL_runner_adopt;
 * NULL after pushing nil, err. Raises for wrong types. */
cbL_runner *cbL_runner_begin(lua_State *L, const cbL_runner_class *cls, const char **domain, int *lanes,
                             double *visibility_timeout, double *statement_timeout, double *poll_interval);
/* The runtime of the bus the object belongs to. */
cb_runtime *cbL_runner_runtime(const cbL_runner *lr);
/* The object takes the core's runner and its engine (close() and the GC
 * free them), the bus and the code; pushes the object and returns 1. */
int cbL_runner_adopt(lua_State *L, cbL_runner *lr, void *runner, cb_engine *engine);
/* Sets a runner's counters, those of its kind, in the table at the top. */
void cbL_set_runner_counters(lua_State *L, const cb_runner_stat *s);

void cbL_open_worker(lua_State *L);
void cbL_open_metrics(lua_State *L);
/* Schedules, retention and limits: bus methods (upkeep.c). */
void cbL_open_upkeep(lua_State *L);
/* Pushes a worker's retention figures: what it removed, passes. */
void cbL_push_upkeep_stats(lua_State *L, const cb_upkeep_stats *stats);
void cbL_open_reply_router(lua_State *L);

/* ---- message routers (router.c) ------------------------------------------ */

void cbL_open_router(lua_State *L);
/* core.message_router{...}: pushes the router object (or nil, err). */
int cbL_message_router(lua_State *L);

#endif
