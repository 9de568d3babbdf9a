-- The deferred round of 100: the receive commits only the lease (message
-- hidden, read_ct + 1) and reads the command rows; the ack commits one
-- command update (COMPLETED, attempts counted), the RECEIVED and COMPLETED
-- audit rows from one INSERT, and deletes the messages guarded by read_ct.
BEGIN;
WITH m AS (UPDATE pgmq.q_bench_floor__commands q SET vt = clock_timestamp() + interval '30 seconds', read_ct = q.read_ct + 1
           WHERE q.msg_id = ANY(ARRAY(SELECT msg_id FROM pgmq.q_bench_floor__commands WHERE vt <= clock_timestamp()
                                      ORDER BY msg_id LIMIT 100 FOR UPDATE SKIP LOCKED))
           RETURNING q.msg_id, q.read_ct, (q.message->>'command_id')::uuid AS id)
SELECT jsonb_agg(jsonb_build_object('id', k.command_id, 'msg', m.msg_id, 'rc', m.read_ct, 'attempt', k.attempts)) AS j
  FROM m JOIN commandbus.command k ON k.domain = 'bench_floor' AND k.command_id = m.id
 WHERE k.command_id = ANY(ARRAY(SELECT id FROM m)) AND k.status IN ('PENDING', 'IN_PROGRESS') \gset
COMMIT;
BEGIN;
WITH i AS (SELECT * FROM jsonb_to_recordset(:j::jsonb) AS x(id uuid, msg bigint, rc int, attempt int)),
d AS (DELETE FROM pgmq.q_bench_floor__commands q USING i WHERE q.msg_id = i.msg AND q.read_ct = i.rc
        AND q.msg_id = ANY(ARRAY(SELECT msg FROM i)) RETURNING q.msg_id),
c AS (UPDATE commandbus.command k SET status = 'COMPLETED', attempts = greatest(k.attempts + 1, i.rc), updated_at = now(), lease_expires_at = NULL
      FROM i WHERE k.domain = 'bench_floor' AND k.command_id = i.id AND k.command_id = ANY(ARRAY(SELECT id FROM i))
        AND k.attempts = i.attempt AND k.status IN ('PENDING', 'IN_PROGRESS') AND i.msg IN (SELECT msg_id FROM d)
      RETURNING k.command_id, i.msg, k.attempts, k.max_attempts)
INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
SELECT 'bench_floor', c.command_id, e.t, CASE WHEN e.n = 1
         THEN jsonb_build_object('msg_id', msg, 'attempt', attempts, 'max_attempts', max_attempts)
         ELSE jsonb_build_object('msg_id', msg, 'reply_to', null, 'has_result', false) END
  FROM c CROSS JOIN (VALUES (1, 'RECEIVED'), (2, 'COMPLETED')) e(n, t) ORDER BY c.command_id, e.n;
COMMIT;
