-- The raw-SQL floor of one bus:send: one command per transaction, the rows
-- commandbus writes for it (command, queue message, SENT audit row) in one
-- statement and the queue's notify, in one pipeline segment closed by one
-- Sync (one implicit transaction, one round trip, one commit), as a
-- commandbus unit. Ids are time-ordered like commandbus's (UUIDv7-like), so
-- that both insert at the right edge of the command table's key. Run with
-- -M prepared.
\startpipeline
WITH ids AS (SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') || '7'
                     || substr(md5(random()::text), 1, 19))::uuid AS id,
                    nextval('pgmq.q_bench_send_floor__commands_msg_id_seq') AS msg),
c AS (INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id, command_type, status, attempts, max_attempts, reply_queue, correlation_id)
      SELECT 'bench_send_floor', 'bench_send_floor__commands', msg, id, 'Noop', 'PENDING', 0, 3, '', id FROM ids),
m AS (INSERT INTO pgmq.q_bench_send_floor__commands (msg_id, vt, message) OVERRIDING SYSTEM VALUE
      SELECT msg, clock_timestamp(), jsonb_build_object('domain', 'bench_send_floor', 'command_type', 'Noop', 'command_id', id, 'correlation_id', id, 'data', '{"n": 1}'::jsonb) FROM ids)
INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
SELECT 'bench_send_floor', id, 'SENT', jsonb_build_object('command_type', 'Noop', 'correlation_id', id, 'reply_to', NULL, 'msg_id', msg, 'batch_id', NULL) FROM ids;
SELECT pg_notify('pgmq_notify_bench_send_floor__commands', '');
\endpipeline
