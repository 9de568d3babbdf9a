/* commandbus: logging to stderr, one line per event, meant to help at 3 a.m.:
 * "2026-11-25T16:40:00.123Z commandbus WARN worker payments: ...".
 * The level comes from COMMANDBUS_LOG (debug, info, warn, error, off;
 * default info). Safe from any thread. */
#ifndef COMMANDBUS_LOG_H
#define COMMANDBUS_LOG_H

#ifdef __cplusplus
extern "C" {
#endif

enum { CB_LOG_DEBUG, CB_LOG_INFO, CB_LOG_WARN, CB_LOG_ERROR, CB_LOG_OFF };

void cb_log(int level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
int cb_log_enabled(int level);
/* Overrides COMMANDBUS_LOG. */
void cb_log_set_level(int level);

#ifdef __cplusplus
}
#endif
#endif
