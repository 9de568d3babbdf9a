-- Awaiters hear of a command only when it reaches a state an await returns
-- on: COMPLETED, FAILED, CANCELED, IN_TROUBLESHOOTING_QUEUE (the list in
-- core/src/awaiter.c, COMMAND_DONE; the two must agree).
--
-- 004 notified on every update, whoever the writer. A worker's receive sets
-- IN_PROGRESS, and that notification woke every awaiter of the command to
-- read a state it does not return on; with one request in flight the
-- waiter's process, its listening backend and the read's backend then
-- competed for the CPU with the handler and its acknowledgement, which are
-- what the waiter waits for. Every listening backend of the database is
-- signalled for each NOTIFY, whatever its channel (the workers' too).
--
-- The rule stays a trigger on the table, so that every writer is covered as
-- before: commandbus's workers, rcmd's procedures (sp_receive_command,
-- sp_finish_command), operator actions and plain SQL. A command
-- leaving a final state (an operator retry from the troubleshooting queue)
-- notifies nobody: no await waits for that, and one that started before it
-- returned on the final state it read. Only the function changes; the
-- trigger of 004 calls it.
CREATE OR REPLACE FUNCTION commandbus.command_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM commandbus.awaiter) THEN
    RETURN NULL;
  END IF;
  PERFORM pg_notify('commandbus_await', c.domain || ':' || c.command_id::text)
     FROM (SELECT DISTINCT n.domain, n.command_id FROM changed n
            WHERE n.status IN ('COMPLETED', 'FAILED', 'CANCELED', 'IN_TROUBLESHOOTING_QUEUE')) c
    WHERE EXISTS (SELECT 1 FROM commandbus.awaiter a
                   WHERE a.domain = c.domain AND a.id = c.command_id AND a.expires_at > now());
  RETURN NULL;
END
$$;
