-- Parley's authoritative state. The conversation row is written only by the lifecycle agent
-- that owns the thread's partition; every write is idempotent through processed_events.

CREATE TABLE channels (
    id          text PRIMARY KEY,
    provider    text NOT NULL,
    -- provider settings including secrets; never returned by the API
    config      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conversations (
    id                        uuid PRIMARY KEY,
    channel_id                text NOT NULL,
    contact_id                text NOT NULL,
    state                     text NOT NULL,
    version                   integer NOT NULL,
    opened_at                 timestamptz NOT NULL,
    updated_at                timestamptz NOT NULL,
    deadline_at               timestamptz,
    close_reason              text,
    closed_at                 timestamptz,
    previous_conversation_id  uuid REFERENCES conversations (id),
    assigned_agent            text,
    pending_close_reason      text,
    state_before_close        text,
    window_expires_at         timestamptz
);
-- At most one open conversation per thread; the latest per thread is found by this index too.
CREATE UNIQUE INDEX conversations_open_thread ON conversations (channel_id, contact_id)
    WHERE state <> 'closed';
CREATE INDEX conversations_thread_latest ON conversations (channel_id, contact_id, opened_at DESC);
-- The backup sweep looks only at overdue open conversations.
CREATE INDEX conversations_deadline ON conversations (deadline_at) WHERE state <> 'closed';
CREATE INDEX conversations_listing ON conversations (opened_at DESC, id DESC);

CREATE TABLE messages (
    id                   bigserial PRIMARY KEY,
    conversation_id      uuid NOT NULL REFERENCES conversations (id),
    channel_id           text NOT NULL,
    provider_message_id  text NOT NULL,
    direction            text NOT NULL,
    type                 text NOT NULL,
    text                 text,
    payload              jsonb NOT NULL DEFAULT '{}'::jsonb,
    status               text NOT NULL,
    sent_at              timestamptz NOT NULL,
    -- clock_timestamp(), not now(): the row's real insert time, for webhook-to-row latency
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (channel_id, direction, provider_message_id)
);
CREATE INDEX messages_conversation ON messages (conversation_id, id);

CREATE TABLE conversation_events (
    id               bigserial PRIMARY KEY,
    conversation_id  uuid NOT NULL REFERENCES conversations (id),
    event_id         text NOT NULL,
    kind             text NOT NULL,
    from_state       text,
    to_state         text,
    cause            text NOT NULL,
    detail           text NOT NULL DEFAULT '',
    version          integer NOT NULL,
    occurred_at      timestamptz NOT NULL
);
CREATE INDEX conversation_events_conversation ON conversation_events (conversation_id, id);

-- One row per Kafka event applied: a redelivered event finds its id here and changes nothing.
CREATE TABLE processed_events (
    event_id      text PRIMARY KEY,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
