-- Outgoing webhooks (api/webhook_endpoints.py, agents/webhooks.py, domain/webhooks.py).
CREATE TABLE webhook_endpoints (
    id               text PRIMARY KEY,          -- "ep_<hex>"
    url              text NOT NULL,
    events           text[] NOT NULL,           -- event types, or {"*"}
    description      text NOT NULL DEFAULT '',
    enabled          boolean NOT NULL DEFAULT true,
    disabled_reason  text,
    secret           text NOT NULL,             -- sealed (streams/channel_secrets.Sealer): {"secret": "whsec_..."}
    previous_secret  text,                      -- sealed; still signs until previous_until
    previous_until   timestamptz,
    failing_since    timestamptz,               -- first failed attempt since the last success
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);

-- One event's body, once, whichever endpoints get it (replays and retries send these bytes).
CREATE TABLE webhook_events (
    event_id   text PRIMARY KEY,
    type       text NOT NULL,
    key        text NOT NULL,                   -- the record key: a conversation thread, a schedule
    body       bytea NOT NULL,                  -- {"type","id","timestamp","data"} as published
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One (endpoint, event): the unit that is attempted, retried, parked and listed.
CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    endpoint_id     text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id        text NOT NULL REFERENCES webhook_events (event_id),
    event_type      text NOT NULL,
    lane            text NOT NULL,              -- the event's key: one lane per (endpoint, key) is sent in order
    partition       integer NOT NULL,           -- of <prefix>.outgoing-events: which worker sends it
    seq             bigint NOT NULL,            -- the event's offset there: the order within the lane
    status          text NOT NULL,              -- pending | succeeded | failed (parked)
    attempts        integer NOT NULL DEFAULT 0,
    retry_base      integer NOT NULL DEFAULT 0, -- attempts before the last manual retry / replay
    next_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (partition, seq) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id);

CREATE TABLE webhook_attempts (
    delivery_id bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL,
    status      integer,                        -- HTTP status; NULL when there was no answer
    latency_ms  real NOT NULL,
    error       text,
    response    text,                           -- the first 64 KB of the answer, at most 1,000 kept here
    PRIMARY KEY (delivery_id, attempt)
);
