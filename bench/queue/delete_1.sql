-- delete, batch 1: the statement of cb_queue_add_delete (DELETE ... = ANY
-- ... RETURNING msg_id). pgbench cannot build the '{id,...}' array literal
-- our core binds as one text parameter, so the ids go as 1 bind parameter(s)
-- in ARRAY[...]::bigint[] instead. Client c deletes ids
-- base + c*span + k*1 ... + 0, k = 0, 1, ... (k persists per client).
-- Run with -M prepared -t <txns> -D base=<first id> -D span=<txns*1> -D k=0.
\set lo :base + :client_id * :span + :k * 1
\set k :k + 1
\set i0 :lo
DELETE FROM pgmq.q_bench_queue_pgb WHERE msg_id = ANY(ARRAY[:i0]::bigint[]) RETURNING msg_id;
