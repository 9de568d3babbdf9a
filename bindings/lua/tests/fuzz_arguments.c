/* Fuzz target for the binding's argument layer (checks.c and every method's
 * reading of its arguments), under Lua 5.4.
 *
 * Each input is read as a small program: which function to call and, byte by
 * byte, its arguments: nil, booleans, numbers (NaN, infinities, huge,
 * negative, fractional, integers at the edges, or any 8 bytes), strings (any
 * bytes, NUL and invalid UTF-8 included, or well-formed names and ids) and
 * option tables whose keys are the API's option names. The methods run on a
 * bus whose runtime is absent (closed), so every call ends in the argument
 * layer, at the CLOSED check that follows it, or inside pure checks; no
 * database is needed.
 *
 * What must hold for every input (abort() otherwise, so the fuzzer reports
 * it), besides the sanitizers' own checks:
 * - a raise is a "bad ..." message (misuse), never anything else;
 * - nil comes with an error object whose code is INVALID_ARGUMENT or CLOSED
 *   and whose message is not empty;
 * - a call that passed every check (CLOSED) had positional strings without a
 *   NUL byte and in UTF-8, finite positional numbers, and the same for the
 *   method's own options.
 * The same input also drives cb__redact_conninfo (pg.c): a password put in a
 * connection string never survives in a message that quotes it.
 *
 * Built with libFuzzer when clang has it (CMake: fuzz_arguments); otherwise,
 * and in CI, CB_FUZZ_DRIVER gives a main() that feeds a fixed number of
 * seeded random inputs. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "internal.h"

int luaopen_commandbus_core(lua_State *L);

/* ---- reading the input -------------------------------------------------------- */

typedef struct input {
  const uint8_t *data;
  size_t size, at;
} input;

static uint8_t byte(input *in) { return in->at < in->size ? in->data[in->at++] : 0; }

static double any_double(input *in) {
  uint64_t bits = 0;
  for (int i = 0; i < 8; i++) bits = bits << 8 | byte(in);
  double d;
  memcpy(&d, &bits, sizeof d);
  return d;
}

static const char *const option_names[] = {"vt",
                                           "qty",
                                           "delay",
                                           "max_wait",
                                           "poll_interval",
                                           "timeout",
                                           "listen",
                                           "limit",
                                           "offset",
                                           "domain",
                                           "type",
                                           "status",
                                           "id",
                                           "correlation_id",
                                           "reply_to",
                                           "batch_id",
                                           "max_attempts",
                                           "data",
                                           "commands",
                                           "name",
                                           "custom_data",
                                           "operator",
                                           "step",
                                           "state",
                                           "command",
                                           "older_than",
                                           "capacity",
                                           "handlers",
                                           "managers",
                                           "concurrency",
                                           "visibility_timeout",
                                           "statement_timeout",
                                           "drain_timeout",
                                           "retry",
                                           "backoff",
                                           "reply_queue",
                                           "tick_interval",
                                           "tick",
                                           "threads",
                                           "lanes",
                                           "batch_size",
                                           "batch_timeout_ms",
                                           "queue_size",
                                           "lane_queue_size",
                                           "block_timeout_ms",
                                           "policy",
                                           "handler",
                                           "pool_size",
                                           "connect_timeout",
                                           "application_name",
                                           "priority",
                                           "dedup_key",
                                           "dedup_for",
                                           "cron",
                                           "every",
                                           "timezone",
                                           "missed",
                                           "statuses",
                                           "archive",
                                           "batches",
                                           "processes",
                                           "per_second",
                                           "retention",
                                           "schedules",
                                           "interval"};
#define NOPTIONS (sizeof option_names / sizeof option_names[0])

static const char *const good_strings[] = {"d",
                                           "payments",
                                           "T",
                                           "01234567-89ab-7def-8123-456789abcdef",
                                           "fuzz_q",
                                           "1",
                                           "9223372036854775807",
                                           "drop",
                                           "block",
                                           "spec.support.handlers",
                                           "PENDING",
                                           "h\xc3\xa9llo",
                                           "",
                                           "skip",
                                           "catch_up",
                                           "*/5 * * * *",
                                           "UTC",
                                           "COMPLETED"};
#define NGOOD (sizeof good_strings / sizeof good_strings[0])

static void push_value(lua_State *L, input *in, int depth);

static void push_number(lua_State *L, input *in) {
  static const double special[] = {0,
                                   1,
                                   -1,
                                   0.5,
                                   1.5,
                                   1e300,
                                   -1e300,
                                   2147483647.0,
                                   2147483648.0,
                                   4294967297.0,
                                   9007199254740993.0,
                                   9223372036854775808.0,
                                   -9223372036854775808.0,
                                   1e-300,
                                   604800,
                                   604801,
                                   31536000,
                                   31536001,
                                   1000,
                                   1001,
                                   64,
                                   65,
                                   1024,
                                   1025};
  uint8_t k = byte(in);
  if (k < 3) lua_pushnumber(L, k == 0 ? NAN : k == 1 ? INFINITY : -INFINITY);
  else if (k < 3 + sizeof special / sizeof special[0]) lua_pushnumber(L, special[k - 3]);
  else if (k < 200) lua_pushinteger(L, (lua_Integer)(int8_t)byte(in));
  else lua_pushnumber(L, any_double(in));
}

static void push_string(lua_State *L, input *in) {
  uint8_t k = byte(in);
  if (k < 128) {
    lua_pushstring(L, good_strings[k % NGOOD]);
    return;
  }
  size_t n = byte(in) % 48;
  char buf[48];
  for (size_t i = 0; i < n; i++) buf[i] = (char)byte(in);
  lua_pushlstring(L, buf, n);
}

static void push_table(lua_State *L, input *in, int depth, int list) {
  lua_newtable(L);
  int n = byte(in) % 6;
  for (int i = 0; i < n; i++) {
    if (list) {
      push_value(L, in, depth + 1);
      lua_rawseti(L, -2, i + 1);
    } else {
      lua_pushstring(L, option_names[byte(in) % NOPTIONS]);
      push_value(L, in, depth + 1);
      lua_rawset(L, -3);
    }
  }
}

static int noop(lua_State *L) { return 0; }

static void push_value(lua_State *L, input *in, int depth) {
  switch (byte(in) % (depth > 2 ? 5 : 8)) {
    case 0: lua_pushnil(L); break;
    case 1: lua_pushboolean(L, byte(in) & 1); break;
    case 2: push_number(L, in); break;
    case 3: push_string(L, in); break;
    case 4: lua_pushcfunction(L, noop); break;
    case 5: push_table(L, in, depth, 0); break;
    case 6: push_table(L, in, depth, 1); break;
    default: push_string(L, in); break;
  }
}

/* ---- what is called --------------------------------------------------------------- */

enum { ON_BUS, ON_QUEUE, ON_MODULE };

typedef struct method {
  const char *name;
  int on;
  int nargs;
  const char *options; /* the option fields this method reads, separated by spaces */
} method;

static const method methods[] = {
    {"send", ON_BUS, 1,
     "domain type id correlation_id reply_to batch_id max_attempts delay priority dedup_key dedup_for"},
    {"send_batch", ON_BUS, 1, "domain delay"},
    {"create_batch", ON_BUS, 1, "domain name"},
    {"get_command", ON_BUS, 2, ""},
    {"audit", ON_BUS, 2, ""},
    {"get_batch", ON_BUS, 2, ""},
    {"list_commands", ON_BUS, 1, "domain status type correlation_id batch_id limit offset"},
    {"list_batches", ON_BUS, 1, "domain status limit offset"},
    {"tsq_list", ON_BUS, 1, "domain type limit offset"},
    {"tsq_retry", ON_BUS, 3, "operator"},
    {"tsq_cancel", ON_BUS, 4, "operator"},
    {"tsq_complete", ON_BUS, 4, "operator"},
    {"await", ON_BUS, 3, "timeout"},
    {"process_start", ON_BUS, 1, "domain type step reply_to batch_id"},
    {"get_process", ON_BUS, 2, ""},
    {"list_processes", ON_BUS, 1, "domain type status limit offset"},
    {"process_audit", ON_BUS, 2, ""},
    {"await_process", ON_BUS, 3, "timeout"},
    {"await_event", ON_BUS, 5, "timeout"},
    {"process_events", ON_BUS, 3, ""},
    {"append_process_event", ON_BUS, 4, ""},
    {"purge_processes", ON_BUS, 1, "domain older_than"},
    {"on_process_event", ON_BUS, 2, "capacity"},
    {"dispatch_process_events", ON_BUS, 1, ""},
    {"worker", ON_BUS, 1,
     "domain concurrency visibility_timeout statement_timeout poll_interval drain_timeout schedules"},
    {"reply_router", ON_BUS, 1, "domain reply_queue concurrency visibility_timeout statement_timeout poll_interval"},
    {"queue", ON_BUS, 1, ""},
    {"schedule", ON_BUS, 1, "name domain type cron every timezone missed priority"},
    {"unschedule", ON_BUS, 1, ""},
    {"pause_schedule", ON_BUS, 1, ""},
    {"resume_schedule", ON_BUS, 1, ""},
    {"list_schedules", ON_BUS, 1, "domain"},
    {"purge", ON_BUS, 1, "domain older_than"},
    {"set_retention", ON_BUS, 1, "domain commands archive batches processes"},
    {"retention", ON_BUS, 1, ""},
    {"set_limit", ON_BUS, 1, "domain type per_second concurrency"},
    {"limits", ON_BUS, 1, ""},
    {"send", ON_QUEUE, 2, "delay"},
    {"send_batch", ON_QUEUE, 2, "delay"},
    {"read", ON_QUEUE, 1, "vt qty"},
    {"read_with_poll", ON_QUEUE, 1, "vt qty max_wait poll_interval"},
    {"pop", ON_QUEUE, 1, "qty"},
    {"delete", ON_QUEUE, 1, ""},
    {"archive", ON_QUEUE, 1, ""},
    {"set_vt", ON_QUEUE, 2, ""},
    {"configure", ON_MODULE, 1, "threads"},
    {"message_router", ON_MODULE, 1,
     "lanes batch_size batch_timeout_ms queue_size lane_queue_size block_timeout_ms policy"},
};
#define NMETHODS (sizeof methods / sizeof methods[0])

/* ---- the invariants ----------------------------------------------------------------- */

static void fail(const method *m, const char *why, const char *detail) {
  fprintf(stderr, "fuzz_arguments: %s (%s): %s: %s\n", m->name, m->on == ON_QUEUE ? "queue" : "bus", why,
          detail ? detail : "");
  abort();
}

/* A value that passed the checks of a slot that reads it. */
static void check_passed(lua_State *L, int idx, const method *m, const char *what) {
  if (lua_type(L, idx) == LUA_TSTRING) {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    if (memchr(s, '\0', len) || cbL_utf8_invalid_at(s, len) != CBL_VALID) fail(m, "an unclean string passed", what);
  } else if (lua_type(L, idx) == LUA_TNUMBER && !isfinite(lua_tonumber(L, idx))) {
    fail(m, "a number that is not finite passed", what);
  }
}

static int has_option(const method *m, const char *name) {
  size_t n = strlen(name);
  for (const char *p = m->options; (p = strstr(p, name)) != NULL; p += n)
    if ((p == m->options || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0')) return 1;
  return 0;
}

/* The arguments are at 1..args (self first for methods), the results or the
 * error after them. */
static void check_outcome(lua_State *L, const method *m, int status, int args) {
  if (status != LUA_OK) {
    const char *e = lua_tostring(L, -1);
    if (e == NULL || strncmp(e, "bad ", 4) != 0) fail(m, "raised something other than misuse", e);
    return;
  }
  int results = lua_gettop(L) - args;
  if (results < 1 || !lua_isnil(L, args + 1)) return;
  if (results < 2 || !lua_istable(L, args + 2)) fail(m, "nil without an error object", NULL);
  lua_getfield(L, args + 2, "code");
  lua_getfield(L, args + 2, "message");
  const char *code = lua_tostring(L, -2), *message = lua_tostring(L, -1);
  if (code == NULL || (strcmp(code, "INVALID_ARGUMENT") != 0 && strcmp(code, "CLOSED") != 0))
    fail(m, "an unexpected error code", code);
  if (message == NULL || *message == '\0') fail(m, "an error without a message", code);
  if (strcmp(code, "CLOSED") != 0) return;
  /* Every check passed: what they let through must be clean. */
  for (int i = m->on == ON_MODULE ? 1 : 2; i <= args; i++) {
    check_passed(L, i, m, "a positional argument");
    if (!lua_istable(L, i)) continue;
    lua_pushnil(L);
    while (lua_next(L, i)) {
      if (lua_type(L, -2) == LUA_TSTRING && has_option(m, lua_tostring(L, -2)))
        check_passed(L, -1, m, lua_tostring(L, -2));
      lua_pop(L, 1);
    }
  }
}

/* Calls the function (upvalue 2) with its arguments (this frame's 1..n) and
 * checks the outcome of method upvalue 1. Never raises. */
static int probe(lua_State *L) {
  const method *m = lua_touserdata(L, lua_upvalueindex(1));
  int args = lua_gettop(L);
  lua_checkstack(L, args + 8);
  lua_pushvalue(L, lua_upvalueindex(2));
  for (int i = 1; i <= args; i++) lua_pushvalue(L, i);
  int status = lua_pcall(L, args, LUA_MULTRET, 0);
  check_outcome(L, m, status, args);
  /* A message router holds memory Lua does not count: close it now, not
   * whenever the collector gets to it. */
  if (status == LUA_OK && lua_gettop(L) > args && lua_isuserdata(L, args + 1) &&
      luaL_getmetafield(L, args + 1, "__gc")) {
    lua_pushvalue(L, args + 1);
    lua_call(L, 1, 0);
  }
  return 0;
}

/* ---- connection strings ------------------------------------------------------------ */

/* A password made of the input's bytes never survives redaction, quoted or
 * not. (Bytes that would end it in one of the two forms, such as white space
 * before "x=" in key=value, are replaced: then it is another option.) */
static void check_redaction(input *in) {
  char password[24];
  size_t n = 0;
  while (n < 12) {
    uint8_t c = byte(in);
    if (c <= ' ' || c == 127 || strchr("@/?&#%=\"'\\", c)) c = 'p';
    password[n++] = (char)c;
  }
  password[n] = '\0';
  char conninfo[128], message[256], out[512];
  if (byte(in) & 1) snprintf(conninfo, sizeof conninfo, "postgresql://u:%s@h:5432/db", password);
  else snprintf(conninfo, sizeof conninfo, "host=h password=%s port=5432", password);
  snprintf(message, sizeof message, "token \"%s\" in \"%s\" and %s", password, conninfo, password);
  cb__redact_conninfo(conninfo, message, out, sizeof out);
  if (strstr(out, password)) {
    fprintf(stderr, "fuzz_arguments: a password survived: %s -> %s\n", message, out);
    abort();
  }
}

/* ---- the target ------------------------------------------------------------------ */

static lua_State *state;

static void setup(void) {
  state = luaL_newstate();
  luaL_openlibs(state);
  luaL_requiref(state, "commandbus.core", luaopen_commandbus_core, 0); /* [1] the module */
  cbL_newbus(state);                                                   /* [2] a bus without a runtime */
  lua_getfield(state, 2, "queue");
  lua_pushvalue(state, 2);
  lua_pushliteral(state, "fuzz_q");
  lua_call(state, 2, 1); /* [3] a queue of it */
  if (!lua_isuserdata(state, 3)) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (state == NULL) setup();
  lua_State *L = state;
  input in = {data, size, 0};
  check_redaction(&in);
  const method *m = &methods[byte(&in) % NMETHODS];
  int base = lua_gettop(L);
  lua_pushlightuserdata(L, (void *)m);
  if (m->on == ON_MODULE) {
    lua_getfield(L, 1, m->name);
    lua_pushcclosure(L, probe, 2);
  } else {
    int self = m->on == ON_BUS ? 2 : 3;
    lua_getfield(L, self, m->name);
    lua_pushcclosure(L, probe, 2);
    lua_pushvalue(L, self);
  }
  for (int i = 0; i < m->nargs; i++) push_value(L, &in, 0);
  if (m->on == ON_MODULE && lua_istable(L, -1)) {
    /* A message router with a handler starts lane threads when collected. */
    lua_pushnil(L);
    lua_setfield(L, -2, "handler");
  }
  if (lua_pcall(L, lua_gettop(L) - base - 1, 0, 0) != LUA_OK) {
    fprintf(stderr, "fuzz_arguments: the probe failed: %s\n", lua_tostring(L, -1));
    abort();
  }
  lua_settop(L, base);
  return 0;
}

#ifdef CB_FUZZ_DRIVER
/* Without libFuzzer: a fixed number of inputs from a seeded generator
 * (xorshift), the same on every run. Usage: fuzz_arguments_driver [runs] [seed] */
int main(int argc, char **argv) {
  long runs = argc > 1 ? atol(argv[1]) : 100000;
  uint64_t x = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
  if (x == 0) x = 1;
  uint8_t buf[256];
  for (long r = 0; r < runs; r++) {
    size_t n = (size_t)(x % sizeof buf);
    for (size_t i = 0; i < n; i++) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      buf[i] = (uint8_t)x;
    }
    LLVMFuzzerTestOneInput(buf, n);
  }
  printf("fuzz_arguments: %ld seeded inputs, every outcome as documented\n", runs);
  lua_close(state);
  return 0;
}
#endif
