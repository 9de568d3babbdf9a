-- Awaiters hear of every command change, whoever the writer is.
--
-- One trigger per statement (not per row) over the statement's changed rows
-- (PostgreSQL keeps them for it, a transition table): a worker's
-- acknowledgement is one statement for a whole round of commands, so the
-- cost is one call per round, and with nobody awaiting (an empty
-- commandbus.awaiter) one probe of an empty table. bench/throughput shows
-- no difference with the trigger disabled. NOTIFY goes out only for
-- commands someone awaits; PostgreSQL delivers it at commit, and not at all
-- on rollback.
CREATE OR REPLACE FUNCTION commandbus.command_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM commandbus.awaiter) THEN
    RETURN NULL;
  END IF;
  PERFORM pg_notify('commandbus_await', c.domain || ':' || c.command_id::text)
     FROM (SELECT DISTINCT n.domain, n.command_id FROM changed n) c
    WHERE EXISTS (SELECT 1 FROM commandbus.awaiter a
                   WHERE a.domain = c.domain AND a.id = c.command_id AND a.expires_at > now());
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS command_changed ON commandbus.command;
CREATE TRIGGER command_changed AFTER UPDATE ON commandbus.command
  REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION commandbus.command_changed();
