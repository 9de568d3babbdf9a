-- Process events: an append-only log per process, numbered 1, 2, 3, ...
--
-- Every change of a process's status or step appends an event here, made by
-- a trigger so that every writer is covered (commandbus, rcmd, an operator's
-- psql). Hosts may append their own events (commandbus.append_process_event).
-- Appending also tells awaiters: a NOTIFY goes out only when someone waits on
-- the process (a row in commandbus.awaiter), so with nobody waiting a
-- statement pays the trigger's call over its changed rows, one probe of an
-- empty table, and no notification.
--
-- No foreign key to commandbus.process: its check would cost every event a
-- second look at the process row, which the writer holds locked anyway.
-- Purging a process deletes its events alongside (see cb_process_purge).
CREATE TABLE IF NOT EXISTS commandbus.process_event (
  domain     text        NOT NULL,
  process_id uuid        NOT NULL,
  sequence   bigint      NOT NULL,
  event_type text        NOT NULL,
  step       text,
  status     text        NOT NULL,
  data       jsonb       NOT NULL DEFAULT '{}'::jsonb,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (domain, process_id, sequence)
);

-- The number an event takes is read from the transaction's snapshot. Under
-- READ COMMITTED (commandbus's own transactions) each statement sees every
-- append committed before it locked the process row, so numbers never
-- collide. Under REPEATABLE READ or SERIALIZABLE the snapshot can be older
-- than another transaction's append: that is a serialization failure, and
-- is reported as one (40001), so that the writer retries.
CREATE OR REPLACE FUNCTION commandbus.event_conflict(p_process_id uuid) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'process % took an event in a concurrent transaction; retry', p_process_id
    USING ERRCODE = 'serialization_failure';
END
$$;

-- Appends one event for a process whose row the caller has locked (so that
-- appends to one process are serialised: sequences are dense and follow
-- commit order) and returns its sequence. When the transaction set
-- commandbus.collect_events to 'on', the event is also added to the
-- transaction-local setting commandbus.events (a JSON array's items, comma
-- separated), which the writer reads back before it commits: that is how the
-- core learns what it appended without a second query per event.
CREATE OR REPLACE FUNCTION commandbus.log_process_event(
  p_domain text, p_process_id uuid, p_event_type text, p_step text, p_status text, p_data jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_sequence bigint;
  v_created timestamptz;
BEGIN
  SELECT coalesce(max(sequence), 0) + 1 INTO v_sequence FROM commandbus.process_event
   WHERE domain = p_domain AND process_id = p_process_id;
  BEGIN
    INSERT INTO commandbus.process_event (domain, process_id, sequence, event_type, step, status, data)
    VALUES (p_domain, p_process_id, v_sequence, p_event_type, p_step, p_status, p_data)
    RETURNING created_at INTO v_created;
  EXCEPTION WHEN unique_violation THEN
    PERFORM commandbus.event_conflict(p_process_id);
  END;
  IF EXISTS (SELECT 1 FROM commandbus.awaiter) AND EXISTS (SELECT 1 FROM commandbus.awaiter
       WHERE domain = p_domain AND id = p_process_id AND expires_at > now()) THEN
    PERFORM pg_notify('commandbus_await', p_domain || ':' || p_process_id::text);
  END IF;
  IF current_setting('commandbus.collect_events', true) = 'on' THEN
    PERFORM set_config('commandbus.events',
      coalesce(current_setting('commandbus.events', true), '') || ',' || jsonb_build_object(
        'domain', p_domain, 'process_id', p_process_id, 'sequence', v_sequence, 'event_type', p_event_type,
        'step', p_step, 'status', p_status, 'data', p_data, 'created_at', v_created::text)::text, true);
  END IF;
  RETURN v_sequence;
END
$$;

-- A host's event: returns its sequence, NULL when there is no such process,
-- -1 when the process has finished (it takes no more events). The step is the
-- process's current one.
CREATE OR REPLACE FUNCTION commandbus.append_process_event(
  p_domain text, p_process_id uuid, p_event_type text, p_data jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_status text;
  v_step text;
BEGIN
  SELECT status, current_step INTO v_status, v_step FROM commandbus.process
   WHERE domain = p_domain AND process_id = p_process_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  IF v_status IN ('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELED') THEN
    RETURN -1;
  END IF;
  RETURN commandbus.log_process_event(p_domain, p_process_id, p_event_type, v_step, v_status,
                                      coalesce(p_data, '{}'::jsonb));
END
$$;

-- The events a statement's changes of status or step make, one per process:
--   STARTED        a new process (at its first step)
--   STEP_STARTED   the next step's command was sent (also when the TSQ
--                  pause ended with the step done: data.previous_status)
--   RESUMED        back to WAITING at the same step after the TSQ (retry)
--   otherwise the new status: WAITING_FOR_TSQ, COMPENSATING, COMPLETED,
--   COMPENSATED, FAILED, CANCELED (the last four are terminal).
-- Per statement, not per row: the reply router moves a batch of processes
-- with one statement, and pays for one call. The rows are locked by the
-- statement that fired the trigger; a statement changes a row once, so each
-- process appears at most once here.
CREATE OR REPLACE FUNCTION commandbus.processes_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  v_logged jsonb;
BEGIN
  BEGIN
    IF TG_OP = 'INSERT' THEN
      WITH logged AS (
        INSERT INTO commandbus.process_event (domain, process_id, sequence, event_type, step, status, data)
        SELECT n.domain, n.process_id, coalesce((SELECT max(e.sequence) FROM commandbus.process_event e
                 WHERE e.domain = n.domain AND e.process_id = n.process_id), 0) + 1,
               'STARTED', n.current_step, n.status, jsonb_build_object('process_type', n.process_type)
          FROM new_rows n
        RETURNING *)
      SELECT jsonb_agg(jsonb_build_object('domain', domain, 'process_id', process_id, 'sequence', sequence,
               'event_type', event_type, 'step', step, 'status', status, 'data', data,
               'created_at', created_at::text)) INTO v_logged FROM logged;
    ELSE
      WITH logged AS (
        INSERT INTO commandbus.process_event (domain, process_id, sequence, event_type, step, status, data)
        SELECT n.domain, n.process_id, coalesce((SELECT max(e.sequence) FROM commandbus.process_event e
                 WHERE e.domain = n.domain AND e.process_id = n.process_id), 0) + 1,
               CASE WHEN o.status = 'WAITING_FOR_TSQ' AND n.status = 'WAITING'
                     AND n.current_step IS NOT DISTINCT FROM o.current_step THEN 'RESUMED'
                    WHEN n.status = o.status OR (o.status = 'WAITING_FOR_TSQ' AND n.status = 'WAITING')
                      THEN 'STEP_STARTED'
                    ELSE n.status END,
               n.current_step, n.status,
               jsonb_strip_nulls(jsonb_build_object('previous_status', o.status, 'previous_step', o.current_step,
                 'error_code', n.error_code, 'error_message', n.error_message))
          FROM new_rows n JOIN old_rows o ON o.domain = n.domain AND o.process_id = n.process_id
         WHERE n.status IS DISTINCT FROM o.status OR n.current_step IS DISTINCT FROM o.current_step
        RETURNING *)
      SELECT jsonb_agg(jsonb_build_object('domain', domain, 'process_id', process_id, 'sequence', sequence,
               'event_type', event_type, 'step', step, 'status', status, 'data', data,
               'created_at', created_at::text)) INTO v_logged FROM logged;
    END IF;
  EXCEPTION WHEN unique_violation THEN
    PERFORM commandbus.event_conflict((SELECT n.process_id FROM new_rows n LIMIT 1));
  END;
  IF v_logged IS NULL THEN
    RETURN NULL;
  END IF;
  IF EXISTS (SELECT 1 FROM commandbus.awaiter) THEN
    PERFORM pg_notify('commandbus_await', x.domain || ':' || x.process_id::text)
       FROM jsonb_to_recordset(v_logged) AS x(domain text, process_id uuid)
      WHERE EXISTS (SELECT 1 FROM commandbus.awaiter a
                     WHERE a.domain = x.domain AND a.id = x.process_id AND a.expires_at > now());
  END IF;
  IF current_setting('commandbus.collect_events', true) = 'on' THEN
    PERFORM set_config('commandbus.events', coalesce(current_setting('commandbus.events', true), '') || ','
      || (SELECT string_agg(e::text, ',') FROM jsonb_array_elements(v_logged) e), true);
  END IF;
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS process_changed ON commandbus.process;
DROP TRIGGER IF EXISTS processes_started ON commandbus.process;
DROP TRIGGER IF EXISTS processes_changed ON commandbus.process;
CREATE TRIGGER processes_started AFTER INSERT ON commandbus.process
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION commandbus.processes_changed();
CREATE TRIGGER processes_changed AFTER UPDATE ON commandbus.process
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
  EXECUTE FUNCTION commandbus.processes_changed();
