/* commandbus core (internal): pgmq's table layout, for the statements the
 * rest of the core writes about queues (the worker's receive and
 * acknowledgements, the reply router's fetch and apply, the troubleshooting
 * queue's operator actions). Only queue.c spells out pgmq's table names,
 * columns and channel names, so that a change of layout changes it alone.
 *
 * Each fragment is appended to b (a cb_strbuf: out of memory is checked
 * once, at the end). `queue` is a valid queue name (cb_queue_name_valid);
 * the other arguments are SQL of the caller's own (a parameter, a CTE's
 * column), never a caller's text. */
#ifndef COMMANDBUS_QUEUE_LAYOUT_H
#define COMMANDBUS_QUEUE_LAYOUT_H

#include "commandbus/queue.h"
#include "strbuf.h"

/* Room for a channel name and its NUL. */
#define CB_QUEUE_CHANNEL_MAX (CB_QUEUE_NAME_MAX + 16)

/* The channel every send to the queue notifies: pgmq_notify_<queue>. */
void cb_queue_channel(const char *queue, char out[CB_QUEUE_CHANNEL_MAX]);

/* The queue's table (pgmq.q_<queue>) and its archive's (pgmq.a_<queue>). */
void cb_queue_sql_table(cb_strbuf *b, const char *queue);
void cb_queue_sql_archive_table(cb_strbuf *b, const char *queue);

/* The test that a message of the table is visible (may be received now). */
#define CB_QUEUE_SQL_VISIBLE "vt <= clock_timestamp()"

/* The ids of up to `limit` visible messages, oldest first, locked, those
 * another transaction holds skipped: a SELECT for `ANY(ARRAY(...))`. */
void cb_queue_sql_visible(cb_strbuf *b, const char *queue, const char *limit);

/* Receives up to `limit` visible messages, oldest first (as pgmq's read):
 * an UPDATE, alias q, to which the caller adds RETURNING q.<columns>. */
void cb_queue_sql_read(cb_strbuf *b, const char *queue, const char *limit, const char *seconds);

/* Receives the messages whose ids `ids` lists (an array): an UPDATE, alias
 * q, that hides them for `seconds` and counts the read; the caller adds
 * RETURNING q.<columns>. */
void cb_queue_sql_receive(cb_strbuf *b, const char *queue, const char *ids, const char *seconds);

/* The same for messages this statement has locked (FOR UPDATE), found by
 * the tuple ids `ctids` (a tid[]) the locking read returned: a locked row
 * keeps its place until our transaction ends, so this fetches each directly
 * instead of searching the queue's primary key for it. A row whose newest
 * version the statement's snapshot cannot see (it was changed and committed
 * after the statement began, then locked) is not found: that message is not
 * received this time and stays as it was. */
void cb_queue_sql_receive_locked(cb_strbuf *b, const char *queue, const char *ctids, const char *seconds);

/* Hides messages for `seconds` from now: an UPDATE, alias q, to which the
 * caller adds its FROM and WHERE. */
void cb_queue_sql_set_vt(cb_strbuf *b, const char *queue, const char *seconds);

/* Deletes the messages whose ids `ids` lists (an array): a DELETE, alias q. */
void cb_queue_sql_delete(cb_strbuf *b, const char *queue, const char *ids);

/* Sends: `INSERT INTO <table> (vt, message)`, to which the caller adds a
 * SELECT of (visible from, message jsonb). */
void cb_queue_sql_insert(cb_strbuf *b, const char *queue);

/* Archives, as pgmq's archive does, the messages whose ids `ids` lists (an
 * array): two CTEs of a WITH, `x` deletes them from the queue, `ar` inserts
 * them into the archive, every column carried over by name (headers too,
 * where the tables have them), and returns their msg_id. */
void cb_queue_sql_archive(cb_strbuf *b, const char *queue, const char *ids);

#endif
