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

/* The names a send builds without a format (a queue's, its channel's) are
 * what snprintf would write, cut short at the same byte. */
static void joined_names_are_what_snprintf_writes(void **state) {
  (void)state;
  const char *parts[] = {"", "a", "orders", "pgmq_notify_", "a_domain_name_of_forty_seven_bytes_exactly_xyz"};
  size_t np = sizeof parts / sizeof parts[0];
  for (size_t size = 1; size <= 64; size++)
    for (size_t i = 0; i < np; i++)
      for (size_t j = 0; j < np; j++) {
        char got[64], want[64];
        memset(got, '#', sizeof got);
        snprintf(want, size, "%s%s", parts[i], parts[j]);
        cb_str_join(got, size, parts[i], parts[j]);
        assert_string_equal(got, want);
        for (size_t k = strlen(want) + 1; k < sizeof got; k++) assert_int_equal(got[k], '#'); /* nothing past it */
      }
}

static void an_int_is_written_as_printf_writes_it(void **state) {
  (void)state;
  const int values[] = {0, 1, -1, 9, 10, -10, 3, 100, 1000, 12345, INT_MAX, INT_MIN};
  for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
    char got[12], want[16];
    cb_str_int(got, values[i]);
    snprintf(want, sizeof want, "%d", values[i]);
    assert_string_equal(got, want);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(formatted_pieces_land_whole_across_growth),
      cmocka_unit_test(a_first_formatted_piece_starts_the_buffer),
      cmocka_unit_test(integers_are_written_as_printf_writes_them),
      cmocka_unit_test(integers_grow_the_buffer_when_the_room_is_short),
      cmocka_unit_test(joined_names_are_what_snprintf_writes),
      cmocka_unit_test(an_int_is_written_as_printf_writes_it),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
