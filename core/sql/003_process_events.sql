-- Process events: an append-only log per process, numbered 1, 2, 3, ...
--
-- Every change of a process's status or step appends an event here, made by
-- a trigger so that every writer is covered (commandbus, rcmd, an operator's
-- psql). Hosts may append their own events (commandbus.append_process_event).
-- Appending also tells awaiters: a NOTIFY goes out only when someone waits on
-- the process (a row in commandbus.awaiter), so with nobody waiting a commit
-- pays one index probe and no notification.
CREATE TABLE IF NOT EXISTS commandbus.process_event (
  domain     text        NOT NULL,
  process_id uuid        NOT NULL,
  sequence   bigint      NOT NULL,
  event_type text        NOT NULL,
  step       text,
  status     text        NOT NULL,
  data       jsonb       NOT NULL DEFAULT '{}'::jsonb,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (domain, process_id, sequence),
  FOREIGN KEY (domain, process_id) REFERENCES commandbus.process (domain, process_id) ON DELETE CASCADE
);

-- Appends one event and returns its sequence (NULL when there is no such
-- process; -1 when p_running_only and the process has finished). Locking
-- the process row serialises appends to one process, so sequences are dense
-- and follow commit order. When the transaction set
-- commandbus.collect_events to 'on', the event is also added to the
-- transaction-local setting commandbus.events (a JSON array's items, comma
-- separated), which the writer reads back before it commits: that is how the
-- core learns what it appended without a second query per event.
CREATE OR REPLACE FUNCTION commandbus.append_process_event(
  p_domain text, p_process_id uuid, p_event_type text, p_step text, p_data jsonb,
  p_running_only boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_status text;
  v_sequence bigint;
  v_step text;
BEGIN
  SELECT status, current_step INTO v_status, v_step FROM commandbus.process
   WHERE domain = p_domain AND process_id = p_process_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  IF p_running_only AND v_status IN ('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELED') THEN
    RETURN -1;
  END IF;
  p_step := coalesce(p_step, v_step);
  SELECT coalesce(max(sequence), 0) + 1 INTO v_sequence FROM commandbus.process_event
   WHERE domain = p_domain AND process_id = p_process_id;
  INSERT INTO commandbus.process_event (domain, process_id, sequence, event_type, step, status, data)
  VALUES (p_domain, p_process_id, v_sequence, p_event_type, p_step, v_status, coalesce(p_data, '{}'::jsonb));
  IF EXISTS (SELECT 1 FROM commandbus.awaiter WHERE domain = p_domain AND id = p_process_id
             AND expires_at > now()) THEN
    PERFORM pg_notify('commandbus_await', p_domain || ':' || p_process_id::text);
  END IF;
  IF current_setting('commandbus.collect_events', true) = 'on' THEN
    PERFORM set_config('commandbus.events',
      coalesce(current_setting('commandbus.events', true), '') || ',' || jsonb_build_object(
        'domain', p_domain, 'process_id', p_process_id, 'sequence', v_sequence, 'event_type', p_event_type,
        'step', p_step, 'status', v_status, 'data', coalesce(p_data, '{}'::jsonb),
        'created_at', now()::text)::text, true);
  END IF;
  RETURN v_sequence;
END
$$;

-- The event a change of status or step makes:
--   STARTED        a new process (at its first step)
--   STEP_STARTED   the next step's command was sent (status unchanged)
--   RESUMED        back to WAITING after the TSQ
--   otherwise the new status: WAITING_FOR_TSQ, COMPENSATING, COMPLETED,
--   COMPENSATED, FAILED, CANCELED (the last four are terminal).
CREATE OR REPLACE FUNCTION commandbus.process_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  v_type text;
  v_data jsonb;
BEGIN
  IF TG_OP = 'INSERT' THEN
    v_type := 'STARTED';
    v_data := jsonb_build_object('process_type', NEW.process_type);
  ELSE
    IF NEW.status = OLD.status AND NEW.current_step IS NOT DISTINCT FROM OLD.current_step THEN
      RETURN NULL;
    END IF;
    v_type := CASE
      WHEN NEW.status = OLD.status THEN 'STEP_STARTED'
      WHEN OLD.status = 'WAITING_FOR_TSQ' AND NEW.status = 'WAITING' THEN 'RESUMED'
      ELSE NEW.status END;
    v_data := jsonb_strip_nulls(jsonb_build_object('previous_status', OLD.status, 'previous_step',
      OLD.current_step, 'error_code', NEW.error_code, 'error_message', NEW.error_message));
  END IF;
  PERFORM commandbus.append_process_event(NEW.domain, NEW.process_id, v_type, NEW.current_step, v_data);
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS process_changed ON commandbus.process;
CREATE TRIGGER process_changed AFTER INSERT OR UPDATE OF status, current_step ON commandbus.process
  FOR EACH ROW EXECUTE FUNCTION commandbus.process_changed();
