-- Workers and reply routers that run, or ran during the last day: one row
-- per run, written by its heartbeat (every few seconds, and when it stops),
-- so that any process (the commandbus CLI, a metrics endpoint) can see their
-- health. A row whose heartbeat is older than three intervals belongs to a
-- runner that died without saying so. Unlogged: heartbeats are ephemeral,
-- and a crash that empties the table loses only a few seconds of news.
CREATE UNLOGGED TABLE IF NOT EXISTS commandbus.runner (
  runner_id            uuid             PRIMARY KEY,
  kind                 text             NOT NULL, -- worker, reply_router
  domain               text             NOT NULL,
  host                 text             NOT NULL,
  pid                  integer          NOT NULL,
  state                text             NOT NULL, -- starting, running, stopping, stopped
  lanes                integer          NOT NULL,
  in_flight            integer          NOT NULL DEFAULT 0,
  successes            bigint           NOT NULL DEFAULT 0, -- worker: commands handled
  failures             bigint           NOT NULL DEFAULT 0, -- worker: handler failures; reply router: hooks that raised
  retries              bigint           NOT NULL DEFAULT 0, -- worker: failures to be retried
  consecutive_failures bigint           NOT NULL DEFAULT 0,
  stuck                bigint           NOT NULL DEFAULT 0, -- worker: handlers past the visibility timeout
  poison               bigint           NOT NULL DEFAULT 0, -- worker: messages set aside
  applied              bigint           NOT NULL DEFAULT 0, -- reply router: replies applied
  rejected             bigint           NOT NULL DEFAULT 0, -- reply router: replies archived unapplied
  lane_depths          integer[]        NOT NULL DEFAULT '{}',
  last_success_at      timestamptz,
  started_at           timestamptz      NOT NULL,
  heartbeat_at         timestamptz      NOT NULL,
  heartbeat_interval   double precision NOT NULL  -- seconds between heartbeats
);
