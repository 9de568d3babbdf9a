/* Growable strings (strbuf.c): a formatted piece lands whole whether it
 * fits the room left or makes the buffer grow, and integers are written
 * as printf would write them. The worker builds every acknowledgement's
 * JSON input with these, so a piece cut at a growth boundary would reach
 * PostgreSQL as broken JSON. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "strbuf.h"

/* Pieces of every length from 0 to 300 characters, each formatted after
 * the last, cross the first capacity (256) and each doubling at every
 * offset; the text is compared with one snprintf'd in a plain array. */
static void formatted_pieces_land_whole_across_growth(void **state) {
  (void)state;
  cb_strbuf b = {0};
  size_t cap = 1 << 17, len = 0;
  char *want = malloc(cap);
  assert_non_null(want);
  for (int n = 0; n <= 300; n++) {
    cb_strbuf_printf(&b, "<%d:%*s>", n, n, "");
    len += (size_t)snprintf(want + len, cap - len, "<%d:%*s>", n, n, "");
    assert_false(b.failed);
    assert_int_equal(b.len, len);
    assert_int_equal(strlen(b.data), len); /* terminated right after the piece */
  }
  assert_string_equal(b.data, want);
  free(want);
  cb_strbuf_free(&b);
}

static void a_first_formatted_piece_starts_the_buffer(void **state) {
  (void)state;
  cb_strbuf b = {0};
  cb_strbuf_printf(&b, "%s", "");
  assert_int_equal(b.len, 0);
  cb_strbuf_printf(&b, "{\"n\":%d}", 7);
  assert_string_equal(b.data, "{\"n\":7}");
  cb_strbuf_free(&b);
}

static void integers_are_written_as_printf_writes_them(void **state) {
  (void)state;
  const long long values[] = {0, 7, -1, 10, 99, 100, -1000, 1234567890123LL, LLONG_MAX, LLONG_MIN};
  cb_strbuf b = {0};
  char want[512] = "";
  for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
    cb_strbuf_put_int(&b, values[i]);
    cb_strbuf_putc(&b, ',');
    snprintf(want + strlen(want), sizeof want - strlen(want), "%lld,", values[i]);
  }
  assert_string_equal(b.data, want);
  assert_int_equal(b.len, strlen(want));
  cb_strbuf_free(&b);
}

/* Integers put right at the end of the room grow the buffer first. */
static void integers_grow_the_buffer_when_the_room_is_short(void **state) {
  (void)state;
  cb_strbuf b = {0};
  for (int i = 0; i < 253; i++) cb_strbuf_putc(&b, 'x');
  cb_strbuf_put_int(&b, LLONG_MIN); /* 20 characters past 253 of 256 */
  assert_int_equal(b.len, 273);
  assert_string_equal(b.data + 253, "-9223372036854775808");
  cb_strbuf_free(&b);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(formatted_pieces_land_whole_across_growth),
      cmocka_unit_test(a_first_formatted_piece_starts_the_buffer),
      cmocka_unit_test(integers_are_written_as_printf_writes_them),
      cmocka_unit_test(integers_grow_the_buffer_when_the_room_is_short),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
