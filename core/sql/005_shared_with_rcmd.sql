-- One database shared with rcmd (reliable-cmd 0.2.x) and pgmq, whichever
-- came first: queue tables in the layout of current pgmq, indexes that never
-- repeat one the database has under another name, one rule for a batch's
-- status, and rcmd's stored procedures where rcmd did not install them.

-- ---- queues ------------------------------------------------------------------
-- pgmq 1.5 added a `headers jsonb` column to every queue and archive table,
-- and its functions read it. Queues an earlier commandbus made without pgmq
-- get it now, unless an older pgmq (whose message type has no headers) is
-- installed: its functions expect the old layout.
DO $$
DECLARE
  v_queue text;
BEGIN
  IF to_regclass('pgmq.meta') IS NULL THEN
    RETURN;
  END IF;
  IF to_regtype('pgmq.message_record') IS NOT NULL AND NOT EXISTS (
       SELECT 1 FROM pg_attribute a JOIN pg_type t ON t.typrelid = a.attrelid
        WHERE t.oid = to_regtype('pgmq.message_record') AND a.attname = 'headers' AND NOT a.attisdropped) THEN
    RETURN;
  END IF;
  FOR v_queue IN SELECT queue_name FROM pgmq.meta LOOP
    IF to_regclass(format('pgmq.%I', 'q_' || v_queue)) IS NOT NULL THEN
      EXECUTE format('ALTER TABLE pgmq.%I ADD COLUMN IF NOT EXISTS headers jsonb', 'q_' || v_queue);
    END IF;
    IF to_regclass(format('pgmq.%I', 'a_' || v_queue)) IS NOT NULL THEN
      EXECUTE format('ALTER TABLE pgmq.%I ADD COLUMN IF NOT EXISTS headers jsonb', 'a_' || v_queue);
    END IF;
  END LOOP;
END
$$;

-- ---- indexes -------------------------------------------------------------------
-- An index as PostgreSQL prints it, less its name and table: UNIQUE or not,
-- the access method, the keys with their order, the predicate. Two indexes
-- of one table with the same shape do the same work, and every write pays
-- for both.
CREATE OR REPLACE FUNCTION commandbus.index_shape(p_index oid) RETURNS text LANGUAGE sql STABLE AS $$
  SELECT CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END
         || regexp_replace(pg_get_indexdef(i.indexrelid), '^.*? USING ', '')
    FROM pg_index i WHERE i.indexrelid = p_index
$$;

-- Creates the index p_name (in the commandbus schema) on p_table as
-- p_definition ("(columns) [WHERE ...]"), unless that name is taken or the
-- table has an index of the same shape under another name (rcmd's
-- migrations name some of the same indexes differently). The shape of the
-- index to be is learnt from PostgreSQL itself, by building it on an empty
-- copy of the table: no index is built twice on a large table.
CREATE OR REPLACE FUNCTION commandbus.ensure_index(p_name text, p_table regclass, p_definition text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  v_shape text;
BEGIN
  IF to_regclass(format('commandbus.%I', p_name)) IS NOT NULL THEN
    RETURN;
  END IF;
  EXECUTE format('CREATE TEMP TABLE commandbus_index_probe (LIKE %s)', p_table);
  EXECUTE format('CREATE INDEX commandbus_index_probe_ix ON pg_temp.commandbus_index_probe %s', p_definition);
  v_shape := commandbus.index_shape('pg_temp.commandbus_index_probe_ix'::regclass);
  DROP TABLE pg_temp.commandbus_index_probe;
  IF NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = p_table AND commandbus.index_shape(i.indexrelid) = v_shape) THEN
    EXECUTE format('CREATE INDEX %I ON %s %s', p_name, p_table, p_definition);
  END IF;
END
$$;

-- An index an earlier commandbus made under its own name: it goes when the
-- table has another of the same shape, else it takes rcmd's name for it (so
-- that rcmd's migrations, which look indexes up by name, add no copy).
CREATE OR REPLACE FUNCTION commandbus.adopt_index_name(p_old text, p_new text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  v_index regclass := to_regclass(format('commandbus.%I', p_old));
  v_table regclass;
  v_constraint name;
BEGIN
  IF v_index IS NULL THEN
    RETURN;
  END IF;
  SELECT indrelid INTO v_table FROM pg_index WHERE indexrelid = v_index;
  IF EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = v_table AND i.indexrelid <> v_index
              AND commandbus.index_shape(i.indexrelid) = commandbus.index_shape(v_index)) THEN
    SELECT conname INTO v_constraint FROM pg_constraint
     WHERE conrelid = v_table AND conindid = v_index AND contype IN ('p', 'u');
    IF v_constraint IS NULL THEN
      EXECUTE format('DROP INDEX %s', v_index);
    ELSE
      EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', v_table, v_constraint);
    END IF;
  ELSIF to_regclass(format('commandbus.%I', p_new)) IS NULL THEN
    EXECUTE format('ALTER INDEX %s RENAME TO %I', v_index, p_new);
  END IF;
END
$$;

-- Where rcmd has the same index, it has rcmd's name.
SELECT commandbus.adopt_index_name('command_pkey', 'uq_command_domain_cmdid');
SELECT commandbus.adopt_index_name('ix_command_domain_batch', 'ix_command_batch');
SELECT commandbus.adopt_index_name('ix_audit_command_ts', 'ix_audit_cmdid_ts');
SELECT commandbus.adopt_index_name('ix_process_audit_command', 'idx_process_audit_command');

SELECT commandbus.ensure_index('ix_command_status_type', 'commandbus.command', '(status, command_type)');
SELECT commandbus.ensure_index('ix_command_status_created', 'commandbus.command', '(status, created_at DESC)');
SELECT commandbus.ensure_index('ix_command_updated', 'commandbus.command', '(updated_at)');
SELECT commandbus.ensure_index('ix_command_batch', 'commandbus.command', '(domain, batch_id) WHERE batch_id IS NOT NULL');
SELECT commandbus.ensure_index('ix_command_batch_status', 'commandbus.command',
                               '(batch_id, status) WHERE batch_id IS NOT NULL');
SELECT commandbus.ensure_index('ix_audit_cmdid_ts', 'commandbus.audit', '(command_id, ts)');
SELECT commandbus.ensure_index('ix_batch_status', 'commandbus.batch', '(status, created_at DESC)');
SELECT commandbus.ensure_index('ix_process_type_status', 'commandbus.process', '(process_type, status)');
SELECT commandbus.ensure_index('ix_process_status_created', 'commandbus.process', '(status, created_at DESC)');
SELECT commandbus.ensure_index('ix_process_batch_status', 'commandbus.process',
                               '(batch_id, status) WHERE batch_id IS NOT NULL');
SELECT commandbus.ensure_index('ix_process_audit_process', 'commandbus.process_audit', '(domain, process_id, sent_at)');
SELECT commandbus.ensure_index('idx_process_audit_command', 'commandbus.process_audit', '(command_id)');

-- ---- batches --------------------------------------------------------------------
-- rcmd's first migration made the batch table without failed_count (its
-- last one adds it, the same way).
ALTER TABLE commandbus.batch ADD COLUMN IF NOT EXISTS failed_count integer NOT NULL DEFAULT 0;

-- A batch's members by outcome, counted as rcmd counts them: its commands;
-- or, for a PROCESS batch, its processes (COMPLETED and COMPENSATED count as
-- completed, FAILED and CANCELED as canceled, and a running process with a
-- step in the troubleshooting queue as in the TSQ).
CREATE OR REPLACE FUNCTION commandbus.batch_counts(p_domain text, p_batch_id uuid, p_batch_type text,
  OUT completed bigint, OUT failed bigint, OUT canceled bigint, OUT in_tsq bigint)
LANGUAGE plpgsql AS $$
BEGIN
  IF p_batch_type = 'PROCESS' THEN
    SELECT count(*) FILTER (WHERE p.status IN ('COMPLETED', 'COMPENSATED')), 0,
           count(*) FILTER (WHERE p.status IN ('FAILED', 'CANCELED')),
           count(*) FILTER (WHERE p.status NOT IN ('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELED')
                              AND EXISTS (SELECT 1 FROM commandbus.command k WHERE k.correlation_id = p.process_id
                                             AND k.status = 'IN_TROUBLESHOOTING_QUEUE'))
      INTO completed, failed, canceled, in_tsq
      FROM commandbus.process p WHERE p.batch_id = p_batch_id;
  ELSE
    SELECT count(*) FILTER (WHERE k.status = 'COMPLETED'), count(*) FILTER (WHERE k.status = 'FAILED'),
           count(*) FILTER (WHERE k.status = 'CANCELED'), count(*) FILTER (WHERE k.status = 'IN_TROUBLESHOOTING_QUEUE')
      INTO completed, failed, canceled, in_tsq
      FROM commandbus.command k WHERE k.domain = p_domain AND k.batch_id = p_batch_id;
  END IF;
END
$$;

-- The one rule for a batch's status, applied after any member changed,
-- whoever changed it (it is rcmd's sp_refresh_batch_stats rule):
--   * complete: the members COMPLETED, FAILED, CANCELED or in the TSQ reach
--     total_count; then COMPLETED_WITH_FAILURES when any of them failed, was
--     canceled or sits in the TSQ, else COMPLETED;
--   * otherwise IN_PROGRESS once a member was received, else PENDING. A
--     complete batch that a TSQ retry reopens is IN_PROGRESS again (rcmd
--     leaves the old status: it never contradicts this one).
-- The batch *ends* when it is complete with nothing left in the TSQ: that is
-- recorded once, as a BATCH_COMPLETED audit event (and the call returns
-- true). BATCH_STARTED is rcmd's sp_start_batch's.
--
-- While members are open this costs a read of the batch row and a probe or
-- two, and writes nothing, so the worker's completions never queue on a hot
-- batch row; the row is locked only to change it. At the end the row is
-- locked before counting: of two callers finishing a batch at once, the
-- second counts after the first committed, and sees its event.
CREATE OR REPLACE FUNCTION commandbus.batch_refresh(p_domain text, p_batch_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  v_batch record;
  v_open boolean;
  v_counts record;
  v_finished bigint;
  v_complete boolean;
  v_status text;
BEGIN
  SELECT b.status, b.batch_type, b.total_count, b.completed_count, b.failed_count, b.canceled_count,
         b.in_troubleshooting_count INTO v_batch
    FROM commandbus.batch b WHERE b.domain = p_domain AND b.batch_id = p_batch_id;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  IF v_batch.batch_type = 'PROCESS' THEN
    v_open := EXISTS (SELECT 1 FROM commandbus.process p WHERE p.batch_id = p_batch_id
                         AND p.status NOT IN ('COMPLETED', 'COMPENSATED', 'FAILED', 'CANCELED')
                         AND NOT EXISTS (SELECT 1 FROM commandbus.command k WHERE k.correlation_id = p.process_id
                                            AND k.status = 'IN_TROUBLESHOOTING_QUEUE'));
  ELSE
    v_open := EXISTS (SELECT 1 FROM commandbus.command k WHERE k.domain = p_domain AND k.batch_id = p_batch_id
                         AND k.status IN ('PENDING', 'IN_PROGRESS'));
  END IF;

  IF v_open THEN
    IF v_batch.status = 'PENDING' AND (v_batch.batch_type = 'PROCESS' OR EXISTS (
         SELECT 1 FROM commandbus.command k WHERE k.domain = p_domain AND k.batch_id = p_batch_id
            AND k.status <> 'PENDING')) THEN
      PERFORM commandbus.sp_start_batch(p_domain, p_batch_id);
    ELSIF v_batch.status IN ('COMPLETED', 'COMPLETED_WITH_FAILURES') THEN
      UPDATE commandbus.batch b SET status = 'IN_PROGRESS', completed_at = NULL
       WHERE b.domain = p_domain AND b.batch_id = p_batch_id AND b.status IN ('COMPLETED', 'COMPLETED_WITH_FAILURES');
    END IF;
    RETURN false;
  END IF;

  -- Ended before, and recorded: nothing can change any more.
  IF v_batch.status IN ('COMPLETED', 'COMPLETED_WITH_FAILURES') AND v_batch.in_troubleshooting_count = 0
     AND v_batch.completed_count + v_batch.failed_count + v_batch.canceled_count >= v_batch.total_count
     AND EXISTS (SELECT 1 FROM commandbus.audit a WHERE a.command_id = p_batch_id AND a.domain = p_domain
                    AND a.event_type = 'BATCH_COMPLETED') THEN
    RETURN false;
  END IF;

  SELECT b.status, b.batch_type, b.total_count, b.completed_count, b.failed_count, b.canceled_count,
         b.in_troubleshooting_count, b.started_at, b.completed_at INTO v_batch
    FROM commandbus.batch b WHERE b.domain = p_domain AND b.batch_id = p_batch_id FOR UPDATE;
  v_counts := commandbus.batch_counts(p_domain, p_batch_id, v_batch.batch_type);
  v_finished := v_counts.completed + v_counts.failed + v_counts.canceled + v_counts.in_tsq;
  v_complete := v_finished >= v_batch.total_count;
  IF v_finished > 0 AND v_batch.status = 'PENDING' THEN
    PERFORM commandbus.sp_start_batch(p_domain, p_batch_id);
    v_batch.status := 'IN_PROGRESS';
    v_batch.started_at := coalesce(v_batch.started_at, now());
  END IF;
  v_status := CASE WHEN v_complete AND v_finished > v_counts.completed THEN 'COMPLETED_WITH_FAILURES'
                   WHEN v_complete THEN 'COMPLETED'
                   WHEN v_batch.status <> 'PENDING' THEN 'IN_PROGRESS'
                   ELSE 'PENDING' END;
  -- Written only when something differs: reading a batch leaves no trace.
  IF (v_status, v_counts.completed, v_counts.failed, v_counts.canceled, v_counts.in_tsq, v_complete)
     IS DISTINCT FROM (v_batch.status, v_batch.completed_count::bigint, v_batch.failed_count::bigint,
                       v_batch.canceled_count::bigint, v_batch.in_troubleshooting_count::bigint,
                       v_batch.completed_at IS NOT NULL) THEN
    UPDATE commandbus.batch b
       SET completed_count = v_counts.completed, failed_count = v_counts.failed, canceled_count = v_counts.canceled,
           in_troubleshooting_count = v_counts.in_tsq, status = v_status,
           started_at = CASE WHEN v_finished > 0 THEN coalesce(b.started_at, now()) ELSE b.started_at END,
           completed_at = CASE WHEN v_complete THEN coalesce(b.completed_at, now()) END
     WHERE b.domain = p_domain AND b.batch_id = p_batch_id;
  END IF;
  IF v_complete AND v_counts.in_tsq = 0 AND NOT EXISTS (
       SELECT 1 FROM commandbus.audit a WHERE a.command_id = p_batch_id AND a.domain = p_domain
          AND a.event_type = 'BATCH_COMPLETED') THEN
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    VALUES (p_domain, p_batch_id, 'BATCH_COMPLETED', jsonb_build_object('batch_id', p_batch_id,
            'total_count', v_batch.total_count, 'completed_count', v_counts.completed,
            'canceled_count', v_counts.canceled, 'failed_count', v_counts.failed));
    RETURN true;
  END IF;
  RETURN false;
END
$$;

-- ---- rcmd's stored procedures -----------------------------------------------------
-- rcmd's workers and operators call these. Where rcmd installed them (its
-- migrations ran here), its own stay. Where they are missing (a database
-- that commandbus set up), commandbus provides them with rcmd's names,
-- parameters and result columns, so that rcmd runs here too, and so that
-- rcmd's own migrations, run later, can replace them in place. Their
-- semantics are rcmd's, except where rcmd is known to go wrong:
--   * a finished command (COMPLETED, FAILED, CANCELED) keeps its status and
--     takes no further audit row from sp_finish_command;
--   * batch counters are never incremented: every batch procedure applies
--     commandbus.batch_refresh, so the counts are exact and the status obeys
--     the one rule; each returns whether the batch ended in that call.
DO $install$
DECLARE
  v_name text;
BEGIN
  IF to_regprocedure('commandbus.sp_start_batch(text, uuid)') IS NULL THEN
    -- PENDING -> IN_PROGRESS, once, with a BATCH_STARTED event (under the
    -- batch's id); true when this call started it.
    CREATE FUNCTION commandbus.sp_start_batch(p_domain text, p_batch_id uuid) RETURNS boolean
    LANGUAGE plpgsql AS $fn$
    BEGIN
      UPDATE commandbus.batch b SET status = 'IN_PROGRESS', started_at = now()
       WHERE b.domain = p_domain AND b.batch_id = p_batch_id AND b.status = 'PENDING';
      IF NOT FOUND THEN
        RETURN false;
      END IF;
      INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
      VALUES (p_domain, p_batch_id, 'BATCH_STARTED', jsonb_build_object('batch_id', p_batch_id));
      RETURN true;
    END
    $fn$;
  END IF;

  IF to_regprocedure('commandbus.sp_receive_command(text, uuid, text, bigint, integer)') IS NULL THEN
    -- A delivery: attempts + 1 and the new status, unless the command is
    -- COMPLETED or CANCELED (then no row); a RECEIVED event; the batch
    -- starts. max_attempts and msg_id come from the arguments when given.
    CREATE FUNCTION commandbus.sp_receive_command(p_domain text, p_command_id uuid,
      p_new_status text DEFAULT 'IN_PROGRESS', p_msg_id bigint DEFAULT NULL, p_max_attempts integer DEFAULT NULL)
    RETURNS TABLE (domain text, command_id uuid, command_type text, status text, attempts integer,
      max_attempts integer, msg_id bigint, correlation_id uuid, reply_queue text, last_error_type text,
      last_error_code text, last_error_msg text, created_at timestamptz, updated_at timestamptz, batch_id uuid)
    LANGUAGE plpgsql AS $fn$
    DECLARE
      v_row commandbus.command%ROWTYPE;
    BEGIN
      UPDATE commandbus.command k SET attempts = k.attempts + 1, status = p_new_status, updated_at = now()
       WHERE k.domain = p_domain AND k.command_id = p_command_id AND k.status NOT IN ('COMPLETED', 'CANCELED')
      RETURNING k.* INTO v_row;
      IF NOT FOUND THEN
        RETURN;
      END IF;
      INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
      VALUES (p_domain, p_command_id, 'RECEIVED', jsonb_build_object('msg_id', coalesce(p_msg_id, v_row.msg_id),
              'attempt', v_row.attempts, 'max_attempts', coalesce(p_max_attempts, v_row.max_attempts)));
      IF v_row.batch_id IS NOT NULL THEN
        PERFORM commandbus.batch_refresh(p_domain, v_row.batch_id);
      END IF;
      RETURN QUERY SELECT p_domain, p_command_id, v_row.command_type::text, v_row.status::text, v_row.attempts,
        coalesce(p_max_attempts, v_row.max_attempts), coalesce(p_msg_id, v_row.msg_id), v_row.correlation_id,
        v_row.reply_queue::text, v_row.last_error_type::text, v_row.last_error_code::text,
        v_row.last_error_msg::text, v_row.created_at, v_row.updated_at, v_row.batch_id;
    END
    $fn$;
  END IF;

  IF to_regprocedure('commandbus.sp_finish_command(text, uuid, text, text, text, text, text, jsonb, uuid)') IS NULL THEN
    -- An outcome: the new status, the error fields where given, the audit
    -- event with p_details. Nothing happens to a command that is missing,
    -- already in that status, or finished. Returns whether its batch ended.
    CREATE FUNCTION commandbus.sp_finish_command(p_domain text, p_command_id uuid, p_status text,
      p_event_type text, p_error_type text DEFAULT NULL, p_error_code text DEFAULT NULL,
      p_error_msg text DEFAULT NULL, p_details jsonb DEFAULT NULL, p_batch_id uuid DEFAULT NULL)
    RETURNS boolean LANGUAGE plpgsql AS $fn$
    DECLARE
      v_batch uuid;
    BEGIN
      UPDATE commandbus.command k SET status = p_status, last_error_type = coalesce(p_error_type, k.last_error_type),
             last_error_code = coalesce(p_error_code, k.last_error_code),
             last_error_msg = coalesce(p_error_msg, k.last_error_msg), updated_at = now()
       WHERE k.domain = p_domain AND k.command_id = p_command_id AND k.status <> p_status
         AND k.status NOT IN ('COMPLETED', 'FAILED', 'CANCELED')
      RETURNING k.batch_id INTO v_batch;
      IF NOT FOUND THEN
        RETURN false;
      END IF;
      INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
      VALUES (p_domain, p_command_id, p_event_type, p_details);
      RETURN v_batch IS NOT NULL AND commandbus.batch_refresh(p_domain, v_batch);
    END
    $fn$;
  END IF;

  IF to_regprocedure('commandbus.sp_fail_command(text, uuid, text, text, text, integer, integer, bigint)') IS NULL THEN
    -- A transient failure: the error fields and a FAILED event; the status
    -- stays. False when there is no such command.
    CREATE FUNCTION commandbus.sp_fail_command(p_domain text, p_command_id uuid, p_error_type text,
      p_error_code text, p_error_msg text, p_attempt integer, p_max_attempts integer, p_msg_id bigint)
    RETURNS boolean LANGUAGE plpgsql AS $fn$
    BEGIN
      UPDATE commandbus.command k SET last_error_type = p_error_type, last_error_code = p_error_code,
             last_error_msg = p_error_msg, updated_at = now()
       WHERE k.domain = p_domain AND k.command_id = p_command_id;
      IF NOT FOUND THEN
        RETURN false;
      END IF;
      INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
      VALUES (p_domain, p_command_id, 'FAILED', jsonb_build_object('msg_id', p_msg_id, 'attempt', p_attempt,
              'max_attempts', p_max_attempts, 'error_type', p_error_type, 'error_code', p_error_code,
              'error_msg', p_error_msg));
      RETURN true;
    END
    $fn$;
  END IF;

  IF to_regprocedure('commandbus.sp_update_batch_counters(text, uuid, text)') IS NULL THEN
    -- rcmd names the change it made (complete, failed, tsq_move,
    -- tsq_complete, tsq_cancel, tsq_retry); the batch is recounted rather
    -- than incremented. Returns whether the batch ended.
    CREATE FUNCTION commandbus.sp_update_batch_counters(p_domain text, p_batch_id uuid, p_update_type text)
    RETURNS boolean LANGUAGE plpgsql AS $fn$
    BEGIN
      IF p_update_type IS NULL OR p_update_type NOT IN ('complete', 'failed', 'tsq_move', 'tsq_complete',
                                                        'tsq_cancel', 'tsq_retry') THEN
        RAISE EXCEPTION 'unknown batch counter update `%`', p_update_type;
      END IF;
      RETURN p_batch_id IS NOT NULL AND commandbus.batch_refresh(p_domain, p_batch_id);
    END
    $fn$;
  END IF;

  -- rcmd's operator actions on a batch's command: false for no batch, else
  -- whether the batch ended.
  FOREACH v_name IN ARRAY ARRAY['sp_tsq_complete', 'sp_tsq_cancel', 'sp_tsq_retry'] LOOP
    IF to_regprocedure(format('commandbus.%I(text, uuid)', v_name)) IS NULL THEN
      EXECUTE format('CREATE FUNCTION commandbus.%I(p_domain text, p_batch_id uuid) RETURNS boolean LANGUAGE sql AS %L',
                     v_name, 'SELECT p_batch_id IS NOT NULL AND commandbus.batch_refresh(p_domain, p_batch_id)');
    END IF;
  END LOOP;

  IF to_regprocedure('commandbus.sp_refresh_batch_stats(text, uuid)') IS NULL THEN
    -- The batch's counts written to its row, the status by the one rule;
    -- one row of counts, none for an unknown batch. The result has the
    -- four columns of rcmd's first migrations, so that those migrations,
    -- run later, can still replace it (its last one drops it and adds
    -- failed_count); rcmd reads the batch row afterwards either way.
    CREATE FUNCTION commandbus.sp_refresh_batch_stats(p_domain text, p_batch_id uuid)
    RETURNS TABLE (completed_count bigint, canceled_count bigint, in_troubleshooting_count bigint,
      is_complete boolean)
    LANGUAGE plpgsql AS $fn$
    DECLARE
      v_batch record;
      v_counts record;
    BEGIN
      SELECT b.batch_type, b.total_count INTO v_batch FROM commandbus.batch b
       WHERE b.domain = p_domain AND b.batch_id = p_batch_id;
      IF NOT FOUND THEN
        RETURN;
      END IF;
      PERFORM commandbus.batch_refresh(p_domain, p_batch_id);
      v_counts := commandbus.batch_counts(p_domain, p_batch_id, v_batch.batch_type);
      UPDATE commandbus.batch b SET completed_count = v_counts.completed, failed_count = v_counts.failed,
             canceled_count = v_counts.canceled, in_troubleshooting_count = v_counts.in_tsq
       WHERE b.domain = p_domain AND b.batch_id = p_batch_id;
      RETURN QUERY SELECT v_counts.completed, v_counts.canceled, v_counts.in_tsq,
        v_counts.completed + v_counts.failed + v_counts.canceled + v_counts.in_tsq >= v_batch.total_count;
    END
    $fn$;
  END IF;
END
$install$;
