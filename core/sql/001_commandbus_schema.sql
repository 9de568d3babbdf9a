-- The commandbus schema shared with rcmd (reliable-cmd 0.2.x); see
-- docs/architecture.md, "Data contract". IF NOT EXISTS throughout, so that it
-- also applies on top of a schema rcmd created. The indexes are made by
-- 005_shared_with_rcmd.sql, which skips any index the database already has
-- under another name.
CREATE SCHEMA IF NOT EXISTS commandbus;

CREATE TABLE IF NOT EXISTS commandbus.command (
  domain           text        NOT NULL,
  queue_name       text        NOT NULL,
  msg_id           bigint,
  command_id       uuid        NOT NULL,
  command_type     text        NOT NULL,
  status           text        NOT NULL DEFAULT 'PENDING',
  attempts         integer     NOT NULL DEFAULT 0,
  max_attempts     integer     NOT NULL DEFAULT 3,
  lease_expires_at timestamptz,
  last_error_type  text,
  last_error_code  text,
  last_error_msg   text,
  created_at       timestamptz NOT NULL DEFAULT now(),
  updated_at       timestamptz NOT NULL DEFAULT now(),
  reply_queue      text        NOT NULL DEFAULT '',
  correlation_id   uuid,
  batch_id         uuid,
  PRIMARY KEY (domain, command_id)
);

CREATE TABLE IF NOT EXISTS commandbus.audit (
  audit_id     bigserial   PRIMARY KEY,
  domain       text        NOT NULL,
  command_id   uuid        NOT NULL,
  event_type   text        NOT NULL,
  ts           timestamptz NOT NULL DEFAULT now(),
  details_json jsonb
);

CREATE TABLE IF NOT EXISTS commandbus.batch (
  domain                   text        NOT NULL,
  batch_id                 uuid        NOT NULL,
  name                     text,
  custom_data              jsonb,
  status                   text        NOT NULL DEFAULT 'PENDING',
  total_count              integer     NOT NULL DEFAULT 0,
  completed_count          integer     NOT NULL DEFAULT 0,
  canceled_count           integer     NOT NULL DEFAULT 0,
  in_troubleshooting_count integer     NOT NULL DEFAULT 0,
  failed_count             integer     NOT NULL DEFAULT 0,
  batch_type               text        NOT NULL DEFAULT 'COMMAND',
  created_at               timestamptz NOT NULL DEFAULT now(),
  started_at               timestamptz,
  completed_at             timestamptz,
  PRIMARY KEY (domain, batch_id)
);

CREATE TABLE IF NOT EXISTS commandbus.process (
  domain        text        NOT NULL,
  process_id    uuid        NOT NULL,
  process_type  text        NOT NULL,
  status        text        NOT NULL DEFAULT 'PENDING',
  current_step  text,
  state         jsonb       NOT NULL DEFAULT '{}'::jsonb,
  error_code    text,
  error_message text,
  created_at    timestamptz NOT NULL DEFAULT now(),
  updated_at    timestamptz NOT NULL DEFAULT now(),
  completed_at  timestamptz,
  batch_id      uuid,
  PRIMARY KEY (domain, process_id)
);

CREATE TABLE IF NOT EXISTS commandbus.process_audit (
  id            bigserial   PRIMARY KEY,
  domain        text        NOT NULL,
  process_id    uuid        NOT NULL,
  step_name     text        NOT NULL,
  command_id    uuid        NOT NULL,
  command_type  text        NOT NULL,
  command_data  jsonb,
  sent_at       timestamptz NOT NULL DEFAULT now(),
  reply_outcome text,
  reply_data    jsonb,
  received_at   timestamptz
);

-- Present in rcmd's schema and unused by it; kept for compatibility.
CREATE TABLE IF NOT EXISTS commandbus.payload_archive (
  domain      text        NOT NULL,
  command_id  uuid        NOT NULL,
  payload     jsonb,
  archived_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (domain, command_id)
);
