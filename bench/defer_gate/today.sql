-- Today's round of 100: the receive commits (message hidden, command
-- IN_PROGRESS with attempts + 1, RECEIVED audit), then the ack commits
-- (command COMPLETED guarded by attempt and status, COMPLETED audit,
-- message deleted).
BEGIN;
WITH m AS (UPDATE pgmq.q_bench_floor__commands q SET vt = clock_timestamp() + interval '30 seconds', read_ct = q.read_ct + 1
           WHERE q.msg_id = ANY(ARRAY(SELECT msg_id FROM pgmq.q_bench_floor__commands WHERE vt <= clock_timestamp()
                                      ORDER BY msg_id LIMIT 100 FOR UPDATE SKIP LOCKED))
           RETURNING q.msg_id, q.read_ct, (q.message->>'command_id')::uuid AS id),
c AS (UPDATE commandbus.command k SET attempts = k.attempts + 1, status = 'IN_PROGRESS', updated_at = now(),
             lease_expires_at = clock_timestamp() + interval '30 seconds'
      FROM m WHERE k.domain = 'bench_floor' AND k.command_id = m.id AND k.command_id = ANY(ARRAY(SELECT id FROM m))
        AND k.status IN ('PENDING', 'IN_PROGRESS')
      RETURNING k.command_id, m.msg_id, k.attempts, k.max_attempts),
a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
      SELECT 'bench_floor', command_id, 'RECEIVED', jsonb_build_object('msg_id', msg_id, 'attempt', attempts, 'max_attempts', max_attempts) FROM c)
SELECT jsonb_agg(jsonb_build_object('id', command_id, 'msg', msg_id, 'attempt', attempts)) AS j FROM c \gset
COMMIT;
BEGIN;
WITH i AS (SELECT * FROM jsonb_to_recordset(:j::jsonb) AS x(id uuid, msg bigint, attempt int)),
c AS (UPDATE commandbus.command k SET status = 'COMPLETED', updated_at = now(), lease_expires_at = NULL
      FROM i WHERE k.domain = 'bench_floor' AND k.command_id = i.id AND k.command_id = ANY(ARRAY(SELECT id FROM i))
        AND k.attempts = i.attempt AND k.status = 'IN_PROGRESS'
      RETURNING k.command_id, i.msg),
a AS (INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
      SELECT 'bench_floor', command_id, 'COMPLETED', jsonb_build_object('msg_id', msg, 'reply_to', null, 'has_result', false) FROM c)
DELETE FROM pgmq.q_bench_floor__commands q WHERE q.msg_id = ANY(ARRAY(SELECT msg FROM c));
COMMIT;
