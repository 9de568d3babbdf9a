/* commandbus Lua binding: every value a caller passes is checked here, by one
 * family of helpers, before it reaches the core.
 *
 * Two kinds of bad input, two answers:
 * - misuse, a value of the wrong type (a string where a number is meant, a
 *   missing required field), raises at once: "bad argument #3 to 'set_vt'
 *   (number expected, got string)", "bad option 'vt': number expected, got
 *   string";
 * - a value of the right type that cannot be used (NaN, an infinity, out of
 *   range, a fraction where an integer is meant, a NUL byte, invalid UTF-8)
 *   is a runtime failure like any other: the helper pushes nil and an
 *   INVALID_ARGUMENT error naming the option and its allowed range, and
 *   returns 0, so that the caller returns those two values.
 * On success a helper returns 1 and stores the value.
 *
 * Strings are checked whole: a NUL byte would cut a name short in C (and
 * PostgreSQL text cannot hold one), and PostgreSQL refuses text that is not
 * UTF-8, which would come back as a DATABASE error after a round trip. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"

/* ---- UTF-8 --------------------------------------------------------------------- */

/* The length of the well-formed UTF-8 sequence at s (left bytes there), or 0
 * (Unicode table 3-7: no overlong forms, no surrogates, nothing above
 * U+10FFFF). */
static size_t utf8_sequence(const unsigned char *s, size_t left) {
  unsigned char c = s[0];
  if (c < 0x80) return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) n = 2;
  else if (c == 0xE0) n = 3, lo = 0xA0;
  else if (c == 0xED) n = 3, hi = 0x9F;
  else if (c >= 0xE1 && c <= 0xEF) n = 3;
  else if (c == 0xF0) n = 4, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3) n = 4;
  else if (c == 0xF4) n = 4, hi = 0x8F;
  else return 0;
  if (left < n || s[1] < lo || s[1] > hi) return 0;
  for (size_t k = 2; k < n; k++)
    if (s[k] < 0x80 || s[k] > 0xBF) return 0;
  return n;
}

size_t cbL_utf8_invalid_at(const char *text, size_t len) {
  const unsigned char *s = (const unsigned char *)text;
  for (size_t i = 0, n; i < len; i += n)
    if ((n = utf8_sequence(s + i, len - i)) == 0) return i;
  return CBL_VALID;
}

const char *cbL_storable_text(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  size_t len;
  const char *text = lua_tolstring(L, idx, &len);
  if (memchr(text, '\0', len) == NULL && cbL_utf8_invalid_at(text, len) == CBL_VALID) {
    lua_pushvalue(L, idx);
    return lua_tostring(L, -1);
  }
  const unsigned char *s = (const unsigned char *)text;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (size_t i = 0, n; i < len; i += n) {
    n = s[i] ? utf8_sequence(s + i, len - i) : 0;
    if (n) luaL_addlstring(&b, text + i, n);
    else luaL_addstring(&b, "\xEF\xBF\xBD"); /* U+FFFD for the byte */
    if (n == 0) n = 1;
  }
  luaL_pushresult(&b);
  return lua_tostring(L, -1);
}

/* ---- the error paths ------------------------------------------------------------- */

/* What a message calls the value: "option 'vt'" (arg 0), or the argument's
 * name ("seconds"). */
static const char *value_name(lua_State *L, int arg, const char *name) {
  return arg ? name : lua_pushfstring(L, "option '%s'", name);
}

/* Raises for a value of the wrong type. */
static int type_error(lua_State *L, int idx, int arg, const char *name, const char *expected) {
  const char *got = luaL_typename(L, idx);
  if (arg) return luaL_argerror(L, arg, lua_pushfstring(L, "%s expected, got %s", expected, got));
  return luaL_error(L, "bad option '%s': %s expected, got %s", name, expected, got);
}

/* A number as a message shows it: integers without a fraction, nan, inf. */
static void format_number(char *buf, size_t len, double v) {
  if (isnan(v)) snprintf(buf, len, "nan");
  else if (isinf(v)) snprintf(buf, len, v > 0 ? "inf" : "-inf");
  else snprintf(buf, len, "%.15g", v);
}

/* ---- numbers ---------------------------------------------------------------------- */

/* The number at idx within [min, max] (and integral when asked). */
static int number_at(lua_State *L, int idx, int arg, const char *name, double min, double max, int integral,
                     double *out) {
  if (lua_type(L, idx) != LUA_TNUMBER) return type_error(L, idx, arg, name, integral ? "integer" : "number");
  double v = lua_tonumber(L, idx);
  if (isfinite(v) && v >= min && v <= max && (!integral || v == floor(v))) {
    *out = v;
    return 1;
  }
  char got[40], lo[40], hi[40];
  format_number(got, sizeof got, v);
  format_number(lo, sizeof lo, min);
  format_number(hi, sizeof hi, max);
  const char *what = value_name(L, arg, name);
  cbL_pusherrorcode(L, CB_EINVAL, "%s must be %s from %s to %s, got %s", what, integral ? "an integer" : "a number", lo,
                    hi, got);
  return 0;
}

int cbL_number_at(lua_State *L, int idx, const char *name, double min, double max, double *out) {
  return number_at(L, lua_absindex(L, idx), 0, name, min, max, 0, out);
}

int cbL_integer_at(lua_State *L, int idx, const char *name, int64_t min, int64_t max, int64_t *out) {
  double v;
  if (!number_at(L, lua_absindex(L, idx), 0, name, (double)min, (double)max, 1, &v)) return 0;
  *out = (int64_t)v;
  return 1;
}

int cbL_arg_number(lua_State *L, int arg, const char *name, double min, double max, double *out) {
  return number_at(L, arg, arg, name, min, max, 0, out);
}

int cbL_arg_integer(lua_State *L, int arg, const char *name, int64_t min, int64_t max, int64_t *out) {
  double v;
  if (!number_at(L, arg, arg, name, (double)min, (double)max, 1, &v)) return 0;
  *out = (int64_t)v;
  return 1;
}

/* Pushes field `name` of the options table at idx (idx may be none or nil);
 * returns 0 (nothing pushed) when the field is absent. */
static int push_field(lua_State *L, int idx, const char *name) {
  if (lua_isnoneornil(L, idx)) return 0;
  lua_getfield(L, idx, name);
  if (!lua_isnil(L, -1)) return 1;
  lua_pop(L, 1);
  return 0;
}

int cbL_opt_number(lua_State *L, int idx, const char *name, double def, double min, double max, double *out) {
  idx = lua_absindex(L, idx);
  if (!push_field(L, idx, name)) {
    *out = def;
    return 1;
  }
  int ok = number_at(L, -1, 0, name, min, max, 0, out);
  if (ok) lua_pop(L, 1); /* else nil, err are on top: what the caller returns */
  return ok;
}

int cbL_opt_integer(lua_State *L, int idx, const char *name, int64_t def, int64_t min, int64_t max, int64_t *out) {
  idx = lua_absindex(L, idx);
  if (!push_field(L, idx, name)) {
    *out = def;
    return 1;
  }
  double v;
  int ok = number_at(L, -1, 0, name, (double)min, (double)max, 1, &v);
  if (ok) {
    *out = (int64_t)v;
    lua_pop(L, 1);
  }
  return ok;
}

int cbL_opt_int(lua_State *L, int idx, const char *name, int def, int min, int max, int *out) {
  int64_t v;
  if (!cbL_opt_integer(L, idx, name, def, min, max, &v)) return 0;
  *out = (int)v;
  return 1;
}

/* ---- 64-bit ids -------------------------------------------------------------------- */

/* 2^63 as a double: the first value past INT64_MAX. */
#define TWO_TO_63 9223372036854775808.0

int cbL_int64_at(lua_State *L, int idx, const char *name, int64_t min, int64_t max, int64_t *out) {
  idx = lua_absindex(L, idx);
  int type = lua_type(L, idx);
  int ok = 0;
  int64_t v = 0;
  if (type == LUA_TNUMBER) {
#if LUA_VERSION_NUM >= 503
    if (lua_isinteger(L, idx)) {
      v = (int64_t)lua_tointeger(L, idx);
      ok = 1;
    } else
#endif
    {
      double n = lua_tonumber(L, idx);
      /* Checked before the cast: converting NaN or a double outside the
       * int64 range is undefined behaviour in C. */
      ok = isfinite(n) && n == floor(n) && n >= -TWO_TO_63 && n < TWO_TO_63;
      if (ok) v = (int64_t)n;
    }
  } else if (type == LUA_TSTRING) {
    /* Decimal text, as LuaJIT hands out ids beyond 2^53: digits only,
     * optionally signed, and within int64 (never clamped). */
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    size_t i = s[0] == '-' ? 1 : 0;
    ok = len > i && len - i <= 19;
    for (size_t k = i; ok && k < len; k++) ok = s[k] >= '0' && s[k] <= '9';
    if (ok) {
      unsigned long long magnitude = strtoull(s + i, NULL, 10);
      unsigned long long limit = i ? 9223372036854775808ULL : 9223372036854775807ULL;
      ok = magnitude <= limit;
      if (ok) v = i ? (int64_t)(0 - magnitude) : (int64_t)magnitude;
    }
  } else {
    return 0; /* the caller raises: a type it does not take */
  }
  if (ok && v >= min && v <= max) {
    *out = v;
    return 1;
  }
  const char *shown = type == LUA_TSTRING ? lua_tostring(L, idx) : NULL;
  char got[40];
  if (shown == NULL) format_number(got, sizeof got, lua_tonumber(L, idx));
  cbL_pusherrorcode(L, CB_EINVAL,
                    "%s must be an integer from %lld to %lld (a number or its decimal string), got %s%.40s%s", name,
                    (long long)min, (long long)max, shown ? "\"" : "", shown ? shown : got, shown ? "\"" : "");
  return 0;
}

int cbL_arg_int64(lua_State *L, int arg, const char *name, int64_t min, int64_t max, int64_t *out) {
  int type = lua_type(L, arg);
  if (type != LUA_TNUMBER && type != LUA_TSTRING) return type_error(L, arg, arg, name, "integer");
  return cbL_int64_at(L, arg, name, min, max, out);
}

/* ---- text ------------------------------------------------------------------------- */

/* The string at idx, whole and valid UTF-8. */
static int text_at(lua_State *L, int idx, int arg, const char *name, const char **out) {
  if (lua_type(L, idx) != LUA_TSTRING) return type_error(L, idx, arg, name, "string");
  size_t len;
  const char *s = lua_tolstring(L, idx, &len);
  const char *nul = memchr(s, '\0', len);
  size_t bad = nul ? CBL_VALID : cbL_utf8_invalid_at(s, len);
  if (nul == NULL && bad == CBL_VALID) {
    *out = s;
    return 1;
  }
  const char *what = value_name(L, arg, name);
  if (nul)
    cbL_pusherrorcode(L, CB_EINVAL, "%s contains a NUL byte (at byte %d): names, ids and text cannot hold one", what,
                      (int)(nul - s) + 1);
  else cbL_pusherrorcode(L, CB_EINVAL, "%s is not valid UTF-8 (at byte %d)", what, (int)bad + 1);
  return 0;
}

int cbL_arg_text(lua_State *L, int arg, const char *name, const char **out) { return text_at(L, arg, arg, name, out); }

int cbL_text_at(lua_State *L, int idx, const char *name, const char **out) {
  return text_at(L, lua_absindex(L, idx), 0, name, out);
}

/* A text option's string stays on the stack, above what was there: popped,
 * it may be referenced by nothing (an options table whose __index makes its
 * values, a proxy or config object), and the collector, run by whatever the
 * call does next (reading another option through __index, any allocation),
 * would free the text the caller still points at. The slot keeps it until
 * the calling C function returns. */
int cbL_opt_text(lua_State *L, int idx, const char *name, const char *def, const char **out) {
  idx = lua_absindex(L, idx);
  luaL_checkstack(L, 4, name); /* the string kept, and nil, err above it */
  if (!push_field(L, idx, name)) {
    *out = def;
    return 1;
  }
  return text_at(L, -1, 0, name, out);
}

int cbL_field_text(lua_State *L, int idx, const char *name, const char **out) {
  idx = lua_absindex(L, idx);
  luaL_checkstack(L, 4, name);
  if (!push_field(L, idx, name)) return luaL_error(L, "bad option '%s': string expected, got nil", name);
  return text_at(L, -1, 0, name, out); /* the string stays, as for cbL_opt_text */
}

/* ---- tables ------------------------------------------------------------------------- */

void cbL_opt_table(lua_State *L, int arg) {
  if (!lua_isnoneornil(L, arg) && lua_type(L, arg) != LUA_TTABLE) type_error(L, arg, arg, NULL, "table");
}

int cbL_opt_boolean(lua_State *L, int idx, const char *name, int def) {
  idx = lua_absindex(L, idx);
  if (!push_field(L, idx, name)) return def;
  if (lua_type(L, -1) != LUA_TBOOLEAN) type_error(L, -1, 0, name, "boolean");
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* ---- JSON and common argument pairs ---------------------------------------------------- */

/* Encodes the table at idx (named `name` in messages) for PostgreSQL; pushes
 * the JSON text, or returns 0 after pushing nil, err. */
static int json_at(lua_State *L, int idx, const char *name) {
  if (cbL_json_encode(L, idx)) return 1;
  const char *why = lua_tostring(L, -1);
  cbL_pusherrorcode(L, CB_EINVAL, "cannot encode %s as JSON: %s", name, why ? why : "?");
  return 0;
}

int cbL_opt_json(lua_State *L, int idx, const char *name, const char **json) {
  idx = lua_absindex(L, idx);
  *json = NULL;
  lua_getfield(L, idx, name);
  if (lua_isnil(L, -1)) return 1;
  if (lua_type(L, -1) != LUA_TTABLE) type_error(L, -1, 0, name, "table");
  if (!json_at(L, -1, name)) return 0;
  *json = lua_tostring(L, -1);
  lua_remove(L, -2); /* the table: its JSON takes its place */
  return 1;
}

int cbL_arg_json(lua_State *L, int arg, const char *name, const char **json) {
  *json = NULL;
  if (lua_isnoneornil(L, arg)) return 1;
  if (lua_type(L, arg) != LUA_TTABLE) type_error(L, arg, arg, name, "table");
  if (!json_at(L, arg, name)) return 0;
  lua_replace(L, arg); /* anchored in the argument's slot */
  *json = lua_tostring(L, arg);
  return 1;
}

int cbL_args_domain_id(lua_State *L, const char **domain, const char **id) {
  cbL_checkbus(L, 1);
  return cbL_arg_text(L, 2, "domain", domain) && cbL_arg_text(L, 3, "id", id);
}

int cbL_opt_module(lua_State *L, int idx, const char *name, int *type) {
  idx = lua_absindex(L, idx);
  lua_getfield(L, idx, name);
  *type = lua_type(L, -1);
  if (*type == LUA_TTABLE) return 1;
  if (*type != LUA_TSTRING) type_error(L, -1, 0, name, "module name or table");
  const char *module;
  return text_at(L, -1, 0, name, &module);
}
