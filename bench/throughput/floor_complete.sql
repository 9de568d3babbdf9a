-- The raw-SQL floor for the worker's bookkeeping: 100 commands per
-- transaction received (message hidden, attempts + 1, RECEIVED audit) and
-- completed (status, COMPLETED audit, message deleted).
BEGIN;
WITH picked AS (SELECT msg_id, message FROM pgmq.q_bench_floor__commands WHERE vt <= clock_timestamp()
                ORDER BY msg_id LIMIT 100 FOR UPDATE SKIP LOCKED),
ids AS (SELECT msg_id, (message->>'command_id')::uuid AS id FROM picked),
c AS (UPDATE commandbus.command k SET attempts = k.attempts + 1, status = 'COMPLETED', updated_at = now()
      FROM ids WHERE k.domain = 'bench_floor' AND k.command_id = ids.id RETURNING k.command_id, ids.msg_id),
a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
      SELECT 'bench_floor', command_id, e, jsonb_build_object('msg_id', msg_id) FROM c, (VALUES ('RECEIVED'), ('COMPLETED')) v(e))
DELETE FROM pgmq.q_bench_floor__commands q USING ids WHERE q.msg_id = ids.msg_id;
COMMIT;
