/* The cron parser of schedules: what each field allows, the standard
 * restrictions and shorthands, and clear refusals. No database: due times
 * are computed by PostgreSQL and tested by the specs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "commandbus/schedule.h"

static uint64_t bits(const int *values, int n) {
  uint64_t b = 0;
  for (int i = 0; i < n; i++) b |= 1ULL << values[i];
  return b;
}

static uint64_t range(int lo, int hi) { return (hi == 63 ? ~0ULL : (1ULL << (hi + 1)) - 1) & ~((1ULL << lo) - 1); }

static cb_cron parsed(const char *text) {
  cb_cron c;
  cb_err err;
  int rc = cb_cron_parse(text, &c, &err);
  if (rc != CB_OK) fail_msg("`%s` was refused: %s", text, err.message);
  return c;
}

static void steps_lists_and_ranges_select_their_values(void **state) {
  (void)state;
  cb_cron c = parsed("*/15 * * * *");
  assert_true(c.minutes == bits((int[]){0, 15, 30, 45}, 4));
  assert_true(c.hours == range(0, 23));
  assert_true(c.days == range(1, 31));
  assert_true(c.months == range(1, 12));
  assert_true(c.weekdays == range(0, 6));
  assert_false(c.days_restricted);
  assert_false(c.weekdays_restricted);

  c = parsed("5/20 1-3,22 1,15 * *");
  assert_true(c.minutes == bits((int[]){5, 25, 45}, 3));
  assert_true(c.hours == bits((int[]){1, 2, 3, 22}, 4));
  assert_true(c.days == bits((int[]){1, 15}, 2));
  assert_true(c.days_restricted);
  assert_false(c.weekdays_restricted);

  c = parsed("0 0-23/6 * * *");
  assert_true(c.hours == bits((int[]){0, 6, 12, 18}, 4));
}

static void names_and_sunday_as_seven_are_understood(void **state) {
  (void)state;
  cb_cron c = parsed("0 9 * JAN,jul Mon-Fri");
  assert_true(c.months == bits((int[]){1, 7}, 2));
  assert_true(c.weekdays == range(1, 5));
  assert_true(c.weekdays_restricted);
  c = parsed("0 0 * * 7");
  assert_true(c.weekdays == 1);
  c = parsed("0 0 * * 5-7");
  assert_true(c.weekdays == bits((int[]){0, 5, 6}, 3));
}

static void shorthands_expand_to_their_five_fields(void **state) {
  (void)state;
  cb_cron hourly = parsed("@hourly"), daily = parsed("@daily"), weekly = parsed("@weekly");
  cb_cron monthly = parsed("@monthly"), yearly = parsed("@yearly");
  assert_true(hourly.minutes == 1 && hourly.hours == range(0, 23));
  assert_true(daily.minutes == 1 && daily.hours == 1);
  assert_true(weekly.weekdays == 1 && weekly.weekdays_restricted);
  assert_true(monthly.days == bits((int[]){1}, 1) && monthly.months == range(1, 12));
  assert_true(yearly.days == bits((int[]){1}, 1) && yearly.months == bits((int[]){1}, 1));
}

static void bad_expressions_are_refused_naming_the_field(void **state) {
  (void)state;
  static const struct {
    const char *text, *says;
  } cases[] = {
      {"60 * * * *", "minute"},
      {"* 24 * * *", "hour"},
      {"* * 0 * *", "day of month"},
      {"* * 32 * *", "day of month"},
      {"* * * 13 *", "month"},
      {"* * * * 8", "day of week"},
      {"5-1 * * * *", "minute"},
      {"*/0 * * * *", "minute"},
      {"x * * * *", "minute"},
      {"1,,2 * * * *", "minute"},
      {"* * * * *  *", "5 fields"},
      {"* * * *", "5 fields"},
      {"", "5 fields"},
      {"@often", "5 fields"},
      {"* * * foo *", "month"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    cb_cron c;
    cb_err err;
    if (cb_cron_parse(cases[i].text, &c, &err) != CB_EINVAL) fail_msg("`%s` was accepted", cases[i].text);
    if (strstr(err.message, cases[i].says) == NULL)
      fail_msg("`%s`: the message `%s` does not say `%s`", cases[i].text, err.message, cases[i].says);
  }
  cb_cron c;
  assert_int_equal(cb_cron_parse(NULL, &c, NULL), CB_EINVAL);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(steps_lists_and_ranges_select_their_values),
      cmocka_unit_test(names_and_sunday_as_seven_are_understood),
      cmocka_unit_test(shorthands_expand_to_their_five_fields),
      cmocka_unit_test(bad_expressions_are_refused_naming_the_field),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
