-- The insert, then the notify in a transaction of its own.
INSERT INTO probe (v) VALUES ('x');
SELECT pg_notify('notify_lock_probe', '');
