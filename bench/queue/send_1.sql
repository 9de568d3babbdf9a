-- send, batch 1: the statements of cb_queue_add_send (INSERT ... RETURNING,
-- then pg_notify), in one pipeline segment closed by one Sync = one implicit
-- transaction, exactly like a commandbus unit. Run with -M prepared and
-- -D delay=0.000000 -D msg=<json> -D chan=pgmq_notify_<queue>.
\startpipeline
INSERT INTO pgmq.q_bench_queue_pgb (vt, message) VALUES (clock_timestamp() + make_interval(secs => :delay::float8), :msg::jsonb) RETURNING msg_id;
SELECT pg_notify(:chan, '');
\endpipeline
