-- What a bus needs after its first months: retention, priorities, rate and
-- concurrency limits per command type, deduplication windows and schedules.
-- Everything here is added beside rcmd's tables; none of them changes.

-- ---- priorities -------------------------------------------------------------
-- A command message may carry "priority" (an integer; 0 when absent). This
-- reads it, or NULL when it is absent or not a number in smallint range, and
-- can never fail: it is evaluated for every row written to a command queue
-- (the queue's partial priority index, see cb_queue_add_priority_index), so
-- an error here would break any producer's send.
CREATE OR REPLACE FUNCTION commandbus.priority_of(message jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN jsonb_typeof(message->'priority') = 'number' THEN
    CASE WHEN (message->>'priority')::numeric BETWEEN -32768 AND 32767
         THEN round((message->>'priority')::numeric)::integer END END
$$;

-- ---- retention ----------------------------------------------------------------
-- How long a domain keeps what has finished; NULL keeps it forever. A domain
-- without a row uses the defaults of commandbus.retention_of.
CREATE TABLE IF NOT EXISTS commandbus.retention (
  domain     text        PRIMARY KEY,
  commands   interval,   -- finished commands (COMPLETED, FAILED, CANCELED) with their audit rows
  archive    interval,   -- archived messages of the domain's queues (pgmq.a_*)
  batches    interval,   -- finished batches with their commands
  processes  interval,   -- finished processes with their events and steps
  updated_at timestamptz NOT NULL DEFAULT now()
);

-- The policy of a domain: its row, else the defaults (seven days each).
CREATE OR REPLACE FUNCTION commandbus.retention_of(p_domain text) RETURNS commandbus.retention
LANGUAGE sql STABLE AS $$
  SELECT coalesce((SELECT r FROM commandbus.retention r WHERE r.domain = p_domain),
                  ROW(p_domain, interval '7 days', interval '7 days', interval '7 days', interval '7 days',
                      NULL)::commandbus.retention)
$$;

-- A command's UUID from a message's command_id, NULL when it is not one
-- (archived poison messages carry anything).
CREATE OR REPLACE FUNCTION commandbus.message_command_id(message jsonb) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN jsonb_typeof(message) = 'object' AND (message->>'command_id') ~*
    '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN (message->>'command_id')::uuid END
$$;

-- ---- rate and concurrency limits per command type -------------------------------
-- Workers of the domain lock the domain's rows (in command_type order) in
-- the transaction that receives commands, so that every process counts
-- against the same numbers. window_start/window_taken count the commands
-- received in the current second (by transaction start time, the time the
-- RECEIVED audit rows carry).
CREATE TABLE IF NOT EXISTS commandbus.type_limit (
  domain        text        NOT NULL,
  command_type  text        NOT NULL,
  per_second    integer     CHECK (per_second > 0),
  max_in_flight integer     CHECK (max_in_flight > 0),
  window_start  timestamptz,
  window_taken  integer     NOT NULL DEFAULT 0,
  PRIMARY KEY (domain, command_type)
);

-- How many more commands of each limited type of the domain may be received
-- now (<= 0: none). In flight means IN_PROGRESS under a live lease. A
-- window older than the one stored (a transaction that started before a
-- later one took the second) gets no room.
CREATE OR REPLACE FUNCTION commandbus.type_room(p_domain text) RETURNS TABLE (command_type text, room bigint)
LANGUAGE sql STABLE AS $$
  SELECT l.command_type, least(
    CASE WHEN l.per_second IS NULL THEN 2147483647
         WHEN l.window_start IS NULL OR l.window_start < date_trunc('second', now()) THEN l.per_second
         WHEN l.window_start = date_trunc('second', now()) THEN l.per_second - l.window_taken
         ELSE 0 END,
    CASE WHEN l.max_in_flight IS NULL THEN 2147483647
         ELSE l.max_in_flight - (SELECT count(*) FROM commandbus.command k WHERE k.status = 'IN_PROGRESS'
                                   AND k.command_type = l.command_type AND k.domain = p_domain
                                   AND k.lease_expires_at > clock_timestamp()) END)
    FROM commandbus.type_limit l WHERE l.domain = p_domain
$$;

-- ---- deduplication windows -------------------------------------------------------
-- The first command sent with a key holds it until expires_at; a second one
-- within that window is refused, naming the first.
CREATE TABLE IF NOT EXISTS commandbus.dedup (
  domain     text        NOT NULL,
  dedup_key  text        NOT NULL,
  command_id uuid        NOT NULL,
  expires_at timestamptz NOT NULL,
  PRIMARY KEY (domain, dedup_key)
);
CREATE INDEX IF NOT EXISTS ix_dedup_expires ON commandbus.dedup (domain, expires_at);

-- ---- schedules -------------------------------------------------------------------
-- A command sent at due times: a 5-field cron expression (parsed by the
-- core into the lists of minutes, hours, days of month, months and days of
-- week it allows) in a time zone, or every N seconds from an anchor.
CREATE TABLE IF NOT EXISTS commandbus.schedule (
  name          text        PRIMARY KEY,
  domain        text        NOT NULL,
  command_type  text        NOT NULL,
  data          jsonb       NOT NULL DEFAULT '{}'::jsonb,
  priority      integer     NOT NULL DEFAULT 0,
  cron          text,
  every_seconds float8      CHECK (every_seconds > 0),
  timezone      text        NOT NULL DEFAULT 'UTC',
  minutes       integer[],
  hours         integer[],
  days          integer[],
  months        integer[],
  weekdays      integer[],
  days_restricted     boolean NOT NULL DEFAULT false,
  weekdays_restricted boolean NOT NULL DEFAULT false,
  missed        text        NOT NULL DEFAULT 'skip' CHECK (missed IN ('skip', 'catch_up')),
  paused        boolean     NOT NULL DEFAULT false,
  anchor        timestamptz NOT NULL DEFAULT now(),
  next_due_at   timestamptz NOT NULL,
  last_due_at   timestamptz,
  created_at    timestamptz NOT NULL DEFAULT now(),
  updated_at    timestamptz NOT NULL DEFAULT now(),
  CHECK ((cron IS NULL) <> (every_seconds IS NULL))
);
CREATE INDEX IF NOT EXISTS ix_schedule_due ON commandbus.schedule (domain, next_due_at) WHERE NOT paused;

-- One row per due time sent: the unique key that makes each due time send
-- one command however many workers look at the schedule.
CREATE TABLE IF NOT EXISTS commandbus.schedule_run (
  name       text        NOT NULL,
  due_at     timestamptz NOT NULL,
  command_id uuid        NOT NULL,
  sent_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (name, due_at)
);

-- The due times of a schedule from `first` to `last` (both included), in
-- order (descending: newest first), at most max_count of them. Cron times are
-- local times of the schedule's zone: a local time skipped by a DST change
-- maps to the instant PostgreSQL gives it, and one that happens twice is due
-- once. Days are walked one at a time and the walk stops at max_count, so
-- that catching up on a long outage, or finding a yearly time, stays cheap.
CREATE OR REPLACE FUNCTION commandbus.schedule_times(s commandbus.schedule, first timestamptz, last timestamptz,
                                                     descending boolean, max_count integer)
RETURNS SETOF timestamptz LANGUAGE plpgsql STABLE AS $$
DECLARE
  v_found integer := 0;
  v_rows integer;
  v_day timestamp;
  v_first_day timestamp;
  v_last_day timestamp;
  v_kmin bigint;
  v_kmax bigint;
BEGIN
  IF first > last OR max_count < 1 THEN
    RETURN;
  END IF;
  IF s.every_seconds IS NOT NULL THEN
    v_kmin := greatest(1, floor(extract(epoch FROM first - s.anchor) / s.every_seconds)::bigint);
    v_kmax := floor(extract(epoch FROM last - s.anchor) / s.every_seconds)::bigint + 1;
    RETURN QUERY SELECT t.at FROM (
        SELECT s.anchor + make_interval(secs => k * s.every_seconds) AS at
          FROM generate_series(CASE WHEN descending THEN greatest(v_kmin, v_kmax - max_count - 1) ELSE v_kmin END,
                               CASE WHEN descending THEN v_kmax ELSE least(v_kmax, v_kmin + max_count + 1) END) AS k) t
       WHERE t.at >= first AND t.at <= last
       ORDER BY CASE WHEN descending THEN -extract(epoch FROM t.at) ELSE extract(epoch FROM t.at) END
       LIMIT max_count;
    RETURN;
  END IF;
  v_first_day := date_trunc('day', first AT TIME ZONE s.timezone);
  v_last_day := date_trunc('day', last AT TIME ZONE s.timezone);
  v_day := CASE WHEN descending THEN v_last_day ELSE v_first_day END;
  WHILE v_day BETWEEN v_first_day AND v_last_day AND v_found < max_count LOOP
    IF extract(month FROM v_day)::integer = ANY (s.months)
       -- Standard cron: when both days of month and days of week are
       -- restricted, a day matching either is due.
       AND (CASE WHEN s.days_restricted AND s.weekdays_restricted
                 THEN extract(day FROM v_day)::integer = ANY (s.days) OR extract(dow FROM v_day)::integer = ANY (s.weekdays)
                 ELSE extract(day FROM v_day)::integer = ANY (s.days) AND extract(dow FROM v_day)::integer = ANY (s.weekdays) END)
    THEN
      RETURN QUERY SELECT t.at FROM (
          SELECT DISTINCT (v_day + make_interval(hours => h.h, mins => m.m)) AT TIME ZONE s.timezone AS at
            FROM unnest(s.hours) AS h(h), unnest(s.minutes) AS m(m)) t
         WHERE t.at >= first AND t.at <= last
         ORDER BY CASE WHEN descending THEN -extract(epoch FROM t.at) ELSE extract(epoch FROM t.at) END
         LIMIT max_count - v_found;
      GET DIAGNOSTICS v_rows = ROW_COUNT;
      v_found := v_found + v_rows;
    END IF;
    v_day := v_day + CASE WHEN descending THEN interval '-1 day' ELSE interval '1 day' END;
  END LOOP;
END
$$;

-- The first due time after `after` (NULL: never: a cron that matches no
-- date, such as 30 February).
CREATE OR REPLACE FUNCTION commandbus.schedule_next(s commandbus.schedule, after timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
  SELECT coalesce(
    (SELECT commandbus.schedule_times(s, after + interval '1 microsecond', after + interval '2 days', false, 1)),
    (SELECT commandbus.schedule_times(s, after + interval '1 microsecond', after + interval '8 years', false, 1)))
$$;

-- What to send for a schedule now: with missed = 'catch_up', every due time
-- from next_due_at on, oldest first, at most 100 (a long outage catches up
-- over several passes); with 'skip', only the newest due time, so that an
-- outage sends one command, not one per time it missed.
CREATE OR REPLACE FUNCTION commandbus.schedule_due(s commandbus.schedule, upto timestamptz)
RETURNS SETOF timestamptz LANGUAGE sql STABLE AS $$
  SELECT commandbus.schedule_times(s, s.next_due_at, upto, s.missed = 'skip',
                                   CASE WHEN s.missed = 'skip' THEN 1 ELSE 100 END)
$$;

-- ---- what the background jobs did, in the heartbeats -------------------------------
-- A worker's heartbeat row (commandbus.runner, from 006) also carries what
-- its retention passes removed since it started, by kind (commands, audit,
-- archive, batches, processes, dedup_keys, schedule_runs, in that order),
-- and how many commands it sent for due schedules.
ALTER TABLE commandbus.runner ADD COLUMN IF NOT EXISTS removed bigint[] NOT NULL DEFAULT '{}';
ALTER TABLE commandbus.runner ADD COLUMN IF NOT EXISTS scheduled bigint NOT NULL DEFAULT 0;
