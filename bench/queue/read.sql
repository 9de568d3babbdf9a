-- read: the statement of cb_queue_add_read. Run with -M prepared,
-- -D qty=1|100 -D vt=0.000000 (vt 0: messages stay visible, so the queue
-- head stays put and every read does the same work; see bench/queue.c).
UPDATE pgmq.q_bench_queue_pgb m SET vt = clock_timestamp() + make_interval(secs => :vt::float8), read_ct = m.read_ct + 1 WHERE m.msg_id = ANY(ARRAY(SELECT msg_id FROM pgmq.q_bench_queue_pgb WHERE vt <= clock_timestamp() ORDER BY msg_id LIMIT :qty::int FOR UPDATE SKIP LOCKED)) RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.message;
