-- User schedules (/v1/schedules, domain/schedules.py): the state, its history, the answer to every
-- command (the API waits for it), and the outbox of emitted events (published by agents/outbox.py
-- to <prefix>.outgoing-events). All written by the lifecycle agent in its batch's transaction.
CREATE TABLE schedules (
    key          text PRIMARY KEY,      -- [A-Za-z0-9._:-]{1,200}; its Kafka key is "schedule:<key>"
    status       text NOT NULL,         -- scheduled | fired | succeeded | failed | cancelled
    version      integer NOT NULL,      -- +1 at every reschedule and manual retry
    epoch        bigint NOT NULL,       -- creation time (ms): token = "<epoch>.<version>"
    run_at       timestamptz NOT NULL,
    due_at       timestamptz,           -- the pending firing (run_at or a retry's time); NULL: none
    event_type   text NOT NULL,
    payload      jsonb NOT NULL,
    max_attempts integer NOT NULL,
    backoff_ms   bigint NOT NULL,
    delay_ms     bigint,                -- the client's delay, when it gave one instead of run_at
    attempts     integer NOT NULL,
    last_error   text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    fired_at     timestamptz,
    revision     bigint NOT NULL        -- write counter: updates are conditional on the one read
);
CREATE INDEX schedules_by_status ON schedules (status, run_at, key);
CREATE INDEX schedules_by_type ON schedules (event_type, run_at, key);
CREATE INDEX schedules_by_run_at ON schedules (run_at, key);

CREATE TABLE schedule_history (
    key     text NOT NULL,
    version integer NOT NULL,
    kind    text NOT NULL,              -- created, rescheduled, restarted, fired, cancelled, ...
    at      timestamptz NOT NULL,
    detail  text,
    event_id text NOT NULL              -- the command or firing that made it
);
CREATE INDEX schedule_history_key ON schedule_history (key, at);

-- The agent's answer to each command, by the command's event id: the API waits for its row.
CREATE TABLE schedule_results (
    event_id   text PRIMARY KEY,
    status     integer NOT NULL,        -- the HTTP status of the answer
    body       jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedule_results_created ON schedule_results (created_at);

-- Events to publish on <prefix>.outgoing-events; event_id is the message id receivers dedupe by.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    event_id     text NOT NULL UNIQUE,  -- derived from the source event's id: stable across retries
    type         text NOT NULL,
    key          text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL,
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
