-- The insert alone.
INSERT INTO probe (v) VALUES ('x');
