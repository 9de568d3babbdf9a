-- The raw-SQL floor for the worker's bookkeeping, the same row work per
-- command as commandbus, 100 commands per transaction: receive (message
-- hidden, read_ct + 1; command attempts + 1, IN_PROGRESS; RECEIVED audit),
-- then complete (command COMPLETED, COMPLETED audit, message deleted). Rows
-- are found by key, as the worker finds them (the received ids carried from
-- one statement to the next by \gset): a lookup by status instead walks
-- every dead index entry a database collects, and a floor that slows with
-- the database's age would flatter whatever is compared to it.
BEGIN;
WITH m AS (UPDATE pgmq.q_bench_floor__commands q SET vt = clock_timestamp() + interval '30 seconds', read_ct = q.read_ct + 1
           WHERE q.msg_id = ANY(ARRAY(SELECT msg_id FROM pgmq.q_bench_floor__commands WHERE vt <= clock_timestamp()
                                      ORDER BY msg_id LIMIT 100 FOR UPDATE SKIP LOCKED))
           RETURNING q.msg_id, (q.message->>'command_id')::uuid AS id),
c AS (UPDATE commandbus.command k SET attempts = k.attempts + 1, status = 'IN_PROGRESS', updated_at = now()
      FROM m WHERE k.domain = 'bench_floor' AND k.command_id = m.id AND k.command_id = ANY(ARRAY(SELECT id FROM m))
      RETURNING k.command_id, m.msg_id),
a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
      SELECT 'bench_floor', command_id, 'RECEIVED', jsonb_build_object('msg_id', msg_id) FROM c)
SELECT coalesce(array_agg(command_id), '{}') AS ids FROM c \gset
WITH c AS (UPDATE commandbus.command k SET status = 'COMPLETED', updated_at = clock_timestamp()
           WHERE k.domain = 'bench_floor' AND k.command_id = ANY(:ids::uuid[]) AND k.status = 'IN_PROGRESS'
           RETURNING k.command_id, k.msg_id),
a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
      SELECT 'bench_floor', command_id, 'COMPLETED', jsonb_build_object('msg_id', msg_id) FROM c)
DELETE FROM pgmq.q_bench_floor__commands q WHERE q.msg_id = ANY(ARRAY(SELECT msg_id FROM c));
COMMIT;
