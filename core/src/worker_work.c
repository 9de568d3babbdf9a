/* commandbus: the worker's works (see worker_internal.h): one command handed
 * to a lane, from the receive statement's row to its outcome; lists of
 * works. Used by every part of the worker, and using none of them. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "worker_internal.h"

double cb__worker_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

void cb_work_succeed(cb_work *w, const char *result_json) {
  w->outcome = CB_OUTCOME_SUCCESS;
  free(w->result_json);
  w->result_json = dup_or_null(result_json);
}

void cb_work_fail(cb_work *w, int outcome, const char *code, const char *message, const char *details_json) {
  w->outcome = outcome;
  free(w->error_code);
  free(w->error_message);
  free(w->error_details_json);
  w->error_code = strdup(code && *code ? code : "ERROR");
  w->error_message = strdup(message ? message : "");
  w->error_details_json = dup_or_null(details_json);
}

cb_work *cb__work_new(const cb_result *r, int row) {
  enum { NCOLS = 6 };
  static const int cols[NCOLS] = {2, 3, 4, 7, 8, 9}; /* id, type, data, correlation, reply, batch */
  const char *values[NCOLS];
  size_t sizes[NCOLS], len = sizeof(cb_work);
  for (int i = 0; i < NCOLS; i++) { /* each value read and measured once: every command passes here */
    values[i] = cb_result_value(r, row, cols[i]);
    sizes[i] = strlen(values[i]) + 1;
    len += sizes[i];
  }
  cb_work *w = malloc(len);
  if (w == NULL) return NULL;
  memset(w, 0, sizeof *w); /* the strings after it are copied whole */
  char *p = (char *)(w + 1);
  const char **fields[NCOLS] = {&w->command_id,     &w->command_type, &w->data_json,
                                &w->correlation_id, &w->reply_to,     &w->batch_id};
  for (int i = 0; i < NCOLS; i++) {
    memcpy(p, values[i], sizes[i]);
    *fields[i] = cb_result_is_null(r, row, cols[i]) ? NULL : p;
    p += sizes[i];
  }
  if (w->data_json == NULL) w->data_json = "{}";
  w->msg_id = cb_result_int(r, row, 0);
  w->attempt = (int)cb_result_int(r, row, 5);
  w->max_attempts = (int)cb_result_int(r, row, 6);
  return w;
}

void cb__work_free(cb_work *w) {
  if (w == NULL) return;
  if (w->held) __atomic_fetch_sub(w->held, 1, __ATOMIC_RELAXED);
  free(w->result_json);
  free(w->error_code);
  free(w->error_message);
  free(w->error_details_json);
  free(w);
}

void cb__work_list_free(cb_work *list) {
  while (list) {
    cb_work *next = list->next;
    cb__work_free(list);
    list = next;
  }
}

void cb__work_list_append(cb_work **head, cb_work **tail, cb_work *list) {
  if (list == NULL) return;
  if (*tail) (*tail)->next = list;
  else *head = list;
  while (list->next) list = list->next;
  *tail = list;
}
