/* commandbus: the queue client, pgmq's protocol and table layout.
 *
 * Queue `q` is the table pgmq.q_<q> (msg_id, read_ct, enqueued_at, vt,
 * message, headers) with its archive pgmq.a_<q> (the same and archived_at),
 * listed in pgmq.meta: the layout of pgmq 1.5 (1.5.0 added headers). When
 * pgmq is in the database, as an extension or loaded as plain SQL (its
 * functions are there), queues are created and dropped through it, in
 * whatever layout its version has; otherwise the tables are created here,
 * exactly as pgmq 1.5 makes them, so that pgmq's own functions and clients
 * work on them. Every statement here works on both layouts (with or
 * without headers). Hot paths are prepared statements on the tables, never
 * calls into plpgsql. Every send notifies `pgmq_notify_<q>` in the same
 * transaction, so listeners wake on commit.
 *
 * Names are validated (cb_queue_name_valid) before any SQL is built; all
 * values are bind parameters. Messages are JSON text: the core never parses
 * JSON, PostgreSQL does.
 *
 * Each operation comes in two forms: cb_queue_add_* appends its statements to
 * a unit (so that callers can compose a transaction, or pipeline many), and
 * the plain form runs it on a runtime and blocks. */
#ifndef COMMANDBUS_QUEUE_H
#define COMMANDBUS_QUEUE_H

#include <stddef.h>
#include <stdint.h>

#include "commandbus/error.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CB_QUEUE_NAME_MAX 47 /* pgmq's bound: q_<name> plus suffixes fit 63 bytes */

typedef struct cb_message {
  int64_t msg_id;
  int32_t read_ct;
  const char *enqueued_at; /* timestamptz text */
  const char *vt;          /* timestamptz text */
  const char *message;     /* JSON text; NULL for SQL NULL */
} cb_message;

/* Messages returned by a read; the strings live as long as the list. */
typedef struct cb_messages {
  size_t count;
  cb_message *items;
  cb_unit *owner;
} cb_messages;

void cb_messages_free(cb_messages *m);
/* Fills m from statement `index` of a completed unit, taking ownership of
 * the unit (freed with the list). */
int cb_messages_take(cb_messages *m, cb_unit *u, int index, cb_err *err);

typedef struct cb_queue_metrics {
  char queue_name[CB_QUEUE_NAME_MAX + 1];
  int64_t queue_length;       /* messages in the queue, visible or not */
  int64_t newest_msg_age_sec; /* -1 when empty */
  int64_t oldest_msg_age_sec; /* -1 when empty */
  int64_t total_messages;
  char scrape_time[40];
} cb_queue_metrics;

typedef struct cb_queue_info {
  char name[CB_QUEUE_NAME_MAX + 1];
  int is_partitioned;
  int is_unlogged;
  char created_at[40];
} cb_queue_info;

/* ^[a-z_][a-z0-9_]*$, 1..47 bytes. Fills err with the reason when invalid. */
int cb_queue_name_valid(const char *name, cb_err *err);

/* Statement builders: append to u and return the index of the statement
 * whose result carries the answer (or a negative cb_code). */
int cb_queue_add_send(cb_unit *u, const char *queue, const char *json, double delay);
int cb_queue_add_send_batch(cb_unit *u, const char *queue, const char *json_array, double delay);
int cb_queue_add_read(cb_unit *u, const char *queue, double vt, int qty);
int cb_queue_add_pop(cb_unit *u, const char *queue, int qty);
int cb_queue_add_delete(cb_unit *u, const char *queue, const int64_t *ids, size_t n);
int cb_queue_add_archive(cb_unit *u, const char *queue, const int64_t *ids, size_t n);
int cb_queue_add_set_vt(cb_unit *u, const char *queue, int64_t id, double vt);
int cb_queue_add_notify(cb_unit *u, const char *queue);
/* Blocking operations. An operation on a queue that does not exist fails
 * with CB_ENOTFOUND. */
int cb_queue_create(cb_runtime *rt, const char *queue, cb_err *err);
/* Adds an index to the queue's table (pgmq's layout allows extra indexes,
 * never extra columns) unless it exists, under the lock of queue DDL:
 * CREATE INDEX IF NOT EXISTS q_<queue>_<suffix> ON pgmq.q_<queue> <definition>.
 * suffix and definition are the core's own SQL, never a caller's text.
 * Building it blocks writes to the queue for as long as it takes. */
int cb_queue_ensure_index(cb_runtime *rt, const char *queue, const char *suffix, const char *definition, cb_err *err);
/* Sets the fillfactor of the queue's table (10..100: the share of each page
 * that inserts fill, leaving room for updated versions) unless one is set
 * already, under the lock of queue DDL. Pages written later have the room. */
int cb_queue_ensure_fillfactor(cb_runtime *rt, const char *queue, int percent, cb_err *err);
/* *existed tells whether there was a queue to drop. */
int cb_queue_drop(cb_runtime *rt, const char *queue, int *existed, cb_err *err);
int cb_queue_send(cb_runtime *rt, const char *queue, const char *json, double delay, int64_t *msg_id, cb_err *err);
/* json_array is a JSON array of messages; ids (malloc'd, caller frees) get
 * one id per message, in order. */
int cb_queue_send_batch(cb_runtime *rt, const char *queue, const char *json_array, double delay, int64_t **ids,
                        size_t *count, cb_err *err);
int cb_queue_read(cb_runtime *rt, const char *queue, double vt, int qty, cb_messages *out, cb_err *err);
/* Reads; when nothing is visible, waits up to max_wait seconds for a send
 * (woken by LISTEN/NOTIFY from any connection) and re-reads every
 * poll_interval seconds as a fallback. An empty list after max_wait. */
int cb_queue_read_with_poll(cb_runtime *rt, const char *queue, double vt, int qty, double max_wait,
                            double poll_interval, cb_messages *out, cb_err *err);
int cb_queue_pop(cb_runtime *rt, const char *queue, int qty, cb_messages *out, cb_err *err);
/* deleted/archived (malloc'd, caller frees) get the ids that existed. */
int cb_queue_delete(cb_runtime *rt, const char *queue, const int64_t *ids, size_t n, int64_t **deleted, size_t *count,
                    cb_err *err);
int cb_queue_archive(cb_runtime *rt, const char *queue, const int64_t *ids, size_t n, int64_t **archived, size_t *count,
                     cb_err *err);
/* out is empty when there is no such message. */
int cb_queue_set_vt(cb_runtime *rt, const char *queue, int64_t id, double vt, cb_messages *out, cb_err *err);
int cb_queue_metrics_get(cb_runtime *rt, const char *queue, cb_queue_metrics *out, cb_err *err);
/* The metrics of every queue (those of pgmq.meta), by name: two round trips
 * however many queues. *out is malloc'd (caller frees). */
int cb_queue_metrics_all(cb_runtime *rt, cb_queue_metrics **out, size_t *count, cb_err *err);
int cb_queue_purge(cb_runtime *rt, const char *queue, int64_t *count, cb_err *err);
/* *queues is malloc'd; caller frees. */
int cb_queue_list(cb_runtime *rt, cb_queue_info **queues, size_t *count, cb_err *err);

#ifdef __cplusplus
}
#endif
#endif
