/* commandbus Lua binding: query results as Lua tables, one per row, keyed by
 * column name; integers, booleans and JSON (decoded) keep their types, SQL
 * NULL is simply absent. */
#include <stdlib.h>

#include "binding.h"

void cbL_push_row(lua_State *L, const cb_result *r, int row) {
  int cols = cb_result_columns(r);
  lua_createtable(L, 0, cols);
  for (int c = 0; c < cols; c++) {
    if (cb_result_is_null(r, row, c)) continue;
    const char *v = cb_result_value(r, row, c);
    switch (cb_result_column_kind(r, c)) {
      case CB_COL_INT: cbL_pushint64(L, (int64_t)strtoll(v, NULL, 10)); break;
      case CB_COL_FLOAT: lua_pushnumber(L, strtod(v, NULL)); break;
      case CB_COL_BOOL: lua_pushboolean(L, v[0] == 't'); break;
      case CB_COL_JSON:
        if (!cbL_json_decode(L, v)) {
          lua_pop(L, 1);
          lua_pushstring(L, v);
        }
        break;
      default: lua_pushstring(L, v); break;
    }
    lua_setfield(L, -2, cb_result_column_name(r, c));
  }
}

void cbL_push_rows(lua_State *L, const cb_result *r) {
  int rows = cb_result_rows(r);
  lua_createtable(L, rows, 0);
  for (int i = 0; i < rows; i++) {
    cbL_push_row(L, r, i);
    lua_rawseti(L, -2, i + 1);
  }
}

int cbL_push_query(lua_State *L, int rc, cb_unit *rows, cb_err *err, int single) {
  if (rc != CB_OK) return cbL_pusherror(L, err);
  const cb_result *r = cb_unit_result(rows, cb_unit_count(rows) - 1);
  if (single) cbL_push_row(L, r, 0);
  else cbL_push_rows(L, r);
  cb_unit_free(rows);
  return 1;
}
