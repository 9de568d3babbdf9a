-- Who is awaiting which id, so that state changes notify other processes
-- only for ids someone waits on (a NOTIFY costs every commit a little).
-- Unlogged: a row lives as long as one await call; a crashed waiter's row
-- simply expires.
CREATE UNLOGGED TABLE IF NOT EXISTS commandbus.awaiter (
  domain     text        NOT NULL,
  id         uuid        NOT NULL,
  waiter     uuid        NOT NULL,
  expires_at timestamptz NOT NULL,
  PRIMARY KEY (domain, id, waiter)
);
