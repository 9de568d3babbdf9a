-- send, batch 100: the statements of cb_queue_add_send_batch (one INSERT of
-- jsonb_array_elements, then pg_notify) in one pipeline segment = one
-- transaction. Run with -M prepared, -D delay=0.000000 -D batch=<json array
-- of 100 messages> -D chan=pgmq_notify_<queue>.
\startpipeline
INSERT INTO pgmq.q_bench_queue_pgb (vt, message) SELECT clock_timestamp() + make_interval(secs => :delay::float8), m FROM jsonb_array_elements(:batch::jsonb) WITH ORDINALITY AS t(m, i) ORDER BY i RETURNING msg_id;
SELECT pg_notify(:chan, '');
\endpipeline
