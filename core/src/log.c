/* commandbus: logging (see log.h). */
#include "commandbus/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int level = -1;

static int current_level(void) {
  int l = __atomic_load_n(&level, __ATOMIC_RELAXED);
  if (l >= 0) return l;
  const char *env = getenv("COMMANDBUS_LOG");
  l = CB_LOG_INFO;
  if (env) {
    if (strcmp(env, "debug") == 0) l = CB_LOG_DEBUG;
    else if (strcmp(env, "warn") == 0) l = CB_LOG_WARN;
    else if (strcmp(env, "error") == 0) l = CB_LOG_ERROR;
    else if (strcmp(env, "off") == 0) l = CB_LOG_OFF;
  }
  __atomic_store_n(&level, l, __ATOMIC_RELAXED);
  return l;
}

void cb_log_set_level(int l) { __atomic_store_n(&level, l, __ATOMIC_RELAXED); }

int cb_log_enabled(int l) { return l >= current_level(); }

void cb_log(int l, const char *fmt, ...) {
  if (!cb_log_enabled(l)) return;
  static const char *names[] = {"DEBUG", "INFO", "WARN", "ERROR"};
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  char line[1024];
  int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ commandbus %s ", tm.tm_year + 1900,
                   tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000L,
                   names[l < 0   ? 0
                         : l > 3 ? 3
                                 : l]);
  va_list ap;
  va_start(ap, fmt);
  if (n > 0 && (size_t)n < sizeof line) vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
  va_end(ap);
  /* One event, one line: libpq's messages carry newlines and tabs. */
  for (char *c = line; *c; c++)
    if (*c == '\n' || *c == '\t' || *c == '\r') *c = ' ';
  fprintf(stderr, "%s\n", line); /* one write per line: lines from threads do not interleave */
}
