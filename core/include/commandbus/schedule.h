/* commandbus: schedules, commands sent at due times (the rows of
 * commandbus.schedule).
 *
 * A schedule names a domain, a command type and its data, and when it is
 * due: a standard 5-field cron expression (minute, hour, day of month, month,
 * day of week; lists, ranges, steps, month and day names, and the @hourly,
 * @daily, @weekly, @monthly and @yearly shorthands) read in a time zone, or
 * every N seconds. Any running worker of the domain sends what is due: each
 * due time once, however many workers look, because a due time is claimed by
 * inserting (schedule, due time) into commandbus.schedule_run, whose key
 * admits it once, in the transaction that sends its command. No worker is a
 * leader. Due times missed while no worker ran are sent once (`skip`: the
 * newest one stands for all) or each once (`catch_up`, oldest first). */
#ifndef COMMANDBUS_SCHEDULE_H
#define COMMANDBUS_SCHEDULE_H

#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CB_SCHEDULE_NAME_MAX 200

/* A parsed cron expression: bit v of a field is set when value v is allowed
 * (weekdays: 0 = Sunday .. 6). A field that does not start with `*` is
 * restricted; when days and weekdays are both restricted a day matching
 * either is due, as in standard cron. */
typedef struct cb_cron {
  uint64_t minutes;
  uint32_t hours, days; /* days: 1..31 */
  uint16_t months;      /* 1..12 */
  uint8_t weekdays;
  int days_restricted, weekdays_restricted;
} cb_cron;

/* Parses text; CB_EINVAL with a message naming the field otherwise. */
int cb_cron_parse(const char *text, cb_cron *out, cb_err *err);

typedef struct cb_schedule_spec {
  const char *name;         /* required, 1..CB_SCHEDULE_NAME_MAX bytes */
  const char *domain;       /* required */
  const char *command_type; /* required */
  const char *data_json;    /* a JSON object's text; NULL: {} */
  const char *cron;         /* a cron expression, or NULL with every > 0 */
  double every;             /* seconds between due times (with cron NULL) */
  const char *timezone;     /* of the cron expression; NULL: UTC */
  int catch_up;             /* 1: send each missed due time; 0: the newest only */
  int priority;             /* of the commands sent */
} cb_schedule_spec;

/* Creates or replaces the schedule of that name and returns its record (a
 * completed unit, caller frees; see cb_schedule_list for the columns). A
 * replacement keeps its pause, and its next due time when neither its timing
 * nor its zone changed. A cron expression that is never due (30 February) or
 * an unknown time zone is CB_EINVAL. */
int cb_schedule_set(cb_runtime *rt, const cb_schedule_spec *spec, cb_unit **rows, cb_err *err);
/* Removes a schedule and its record of sent due times; *existed says whether
 * there was one. */
int cb_schedule_remove(cb_runtime *rt, const char *name, int *existed, cb_err *err);
/* Pauses (1) or resumes (0) a schedule; CB_ENOTFOUND when there is none.
 * While paused nothing is sent; on resume the times it missed are handled
 * as after an outage (skip or catch_up). */
int cb_schedule_pause(cb_runtime *rt, const char *name, int paused, cb_err *err);
/* Schedules (of one domain, or all with domain NULL), by name: name, domain,
 * type, data, priority, cron, every, timezone, missed ("skip" or
 * "catch_up"), paused, next_due_at, last_due_at, created_at, updated_at. */
int cb_schedule_list(cb_runtime *rt, const char *domain, cb_unit **rows, cb_err *err);

/* For a worker's background job: appends one pass over the domain's due
 * schedules, which sends their due commands in the unit's transaction.
 * Returns the statement's index (one row per command sent) or a negative
 * cb_code. */
int cb_schedule_add_pass(cb_unit *u, const char *domain);

#ifdef __cplusplus
}
#endif
#endif
