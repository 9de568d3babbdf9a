/* Passwords never leave in a connection error: what libpq echoes of a
 * connection string is masked (cb__redact_conninfo in pg.c). The messages
 * here are the ones libpq 15 writes for these strings. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "internal.h"

static const char *redacted(const char *conninfo, const char *message) {
  static char out[512];
  cb__redact_conninfo(conninfo, message, out, sizeof out);
  return out;
}

static void a_quoted_password_token_is_masked(void **state) {
  assert_string_equal(
      redacted("postgresql://u:S3cr3tPw%ZZ@127.0.0.1:5432/db", "invalid percent-encoded token: \"S3cr3tPw%ZZ\""),
      "invalid percent-encoded token: \"***\"");
}

static void an_echoed_uri_keeps_its_host_but_not_its_password(void **state) {
  assert_string_equal(
      redacted("postgresql://u:S3cr3tPw@[::1/db",
               "end of string reached when looking for matching \"]\" in IPv6 host address in URI: "
               "\"postgresql://u:S3cr3tPw@[::1/db\""),
      "end of string reached when looking for matching \"]\" in IPv6 host address in URI: \"postgresql://u:***@[::1/db\"");
}

static void a_password_with_a_raw_slash_or_at_sign_is_covered_whole(void **state) {
  /* libpq reads "u:pa" as the host and "ss@h" as the port: both are masked. */
  assert_string_equal(redacted("postgresql://u:pa/ss@h@127.0.0.1/db", "invalid integer value \"ss@h\" for port"),
                      "invalid integer value \"***\" for port");
  assert_string_equal(redacted("postgresql://u:pa/ss@127.0.0.1/db", "could not translate host name \"u:pa\""),
                      "could not translate host name \"u:***\"");
}

static void key_value_passwords_are_masked_even_when_quoted_wrongly(void **state) {
  assert_string_equal(
      redacted("host=127.0.0.1 password=\"S3cr3t Pw", "missing \"=\" after \"Pw\" in connection info string"),
      "missing \"=\" after \"***\" in connection info string");
  assert_string_equal(redacted("host=x sslpassword = k3yPass port=1", "bad value \"k3yPass\""), "bad value \"***\"");
  /* the other values stay readable */
  assert_string_equal(
      redacted("host=x password=S3cr3tPw port=abc", "invalid integer value \"abc\" for connection option \"port\""),
      "invalid integer value \"abc\" for connection option \"port\"");
}

static void a_query_password_is_masked(void **state) {
  assert_string_equal(redacted("postgresql://h/db?sslmode=x&password=Qu3ryPw&x=1", "token \"Qu3ryPw\" and Qu3ryPw"),
                      "token \"***\" and ***");
}

static void an_unquoted_or_decoded_password_is_masked_too(void **state) {
  assert_string_equal(redacted("postgresql://u:S3%63r3tPw@h/db", "saw S3cr3tPw and S3%63r3tPw"), "saw *** and ***");
}

static void messages_without_secrets_are_left_alone(void **state) {
  const char *m = "connection to server at \"127.0.0.1\", port 1 failed: Connection refused";
  assert_string_equal(redacted("postgresql://u:pw@127.0.0.1:1/db", m), m);
  assert_string_equal(redacted(NULL, m), m);
  assert_string_equal(redacted("", "quote \" alone"), "quote \" alone");
}

static void truncation_happens_after_masking(void **state) {
  char conninfo[400], message[600], out[40];
  snprintf(conninfo, sizeof conninfo, "postgresql://u:%0300d@h/db", 7);
  snprintf(message, sizeof message, "bad: \"%s\"", conninfo);
  cb__redact_conninfo(conninfo, message, out, sizeof out);
  assert_string_equal(out, "bad: \"postgresql://u:***@h/db\"");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(a_quoted_password_token_is_masked),
      cmocka_unit_test(an_echoed_uri_keeps_its_host_but_not_its_password),
      cmocka_unit_test(a_password_with_a_raw_slash_or_at_sign_is_covered_whole),
      cmocka_unit_test(key_value_passwords_are_masked_even_when_quoted_wrongly),
      cmocka_unit_test(a_query_password_is_masked),
      cmocka_unit_test(an_unquoted_or_decoded_password_is_masked_too),
      cmocka_unit_test(messages_without_secrets_are_left_alone),
      cmocka_unit_test(truncation_happens_after_masking),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
