-- The raw-SQL floor for sending: 100 commands per transaction, the same rows
-- commandbus writes (command, queue message, SENT audit) and the notify.
-- Ids are time-ordered as commandbus's (UUIDv7-like: milliseconds first),
-- so that both insert at the right edge of the command table's key.
BEGIN;
WITH ids AS (SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') || '7'
                     || substr(md5(random()::text), 1, 19))::uuid AS id,
                    nextval('pgmq.q_bench_floor__commands_msg_id_seq') AS msg FROM generate_series(1, 100)),
c AS (INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id, command_type, status, attempts, max_attempts, reply_queue, correlation_id)
      SELECT 'bench_floor', 'bench_floor__commands', msg, id, 'Noop', 'PENDING', 0, 3, '', id FROM ids),
m AS (INSERT INTO pgmq.q_bench_floor__commands (msg_id, vt, message) OVERRIDING SYSTEM VALUE
      SELECT msg, clock_timestamp(), jsonb_build_object('domain', 'bench_floor', 'command_type', 'Noop', 'command_id', id, 'correlation_id', id, 'data', '{}'::jsonb) FROM ids)
INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
SELECT 'bench_floor', id, 'SENT', jsonb_build_object('command_type', 'Noop', 'msg_id', msg) FROM ids;
SELECT pg_notify('pgmq_notify_bench_floor__commands', '');
COMMIT;
