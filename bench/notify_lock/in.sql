-- The insert and the notify in one transaction (one pipeline segment).
\startpipeline
INSERT INTO probe (v) VALUES ('x');
SELECT pg_notify('notify_lock_probe', '');
\endpipeline
