-- Outbound messages Parley sends through the providers (agents/sender.py, api/messages.py).
-- A send is accepted by the lifecycle agent (in the conversation's order), queued here, relayed to
-- <prefix>.sends keyed by channel (one worker paces a business number), and sent lane by lane.
CREATE TABLE outbound_sends (
    id                  uuid PRIMARY KEY,        -- Parley's message id: biz_opaque_callback_data, StatusCallback
    conversation_id     uuid NOT NULL REFERENCES conversations (id),
    channel_id          text NOT NULL,
    contact_id          text NOT NULL,
    partition           integer NOT NULL,        -- of <prefix>.sends: partition_of(channel_id)
    seq                 bigserial,               -- acceptance order: a conversation's messages go in it
    type                text NOT NULL,
    content             jsonb NOT NULL,          -- channels/outbound.py content
    body_hash           text NOT NULL,           -- same Idempotency-Key with another body: 422
    status              text NOT NULL,           -- queued | sending | sent | failed
    attempts            integer NOT NULL DEFAULT 0,
    retry_base          integer NOT NULL DEFAULT 0,  -- attempts before the last manual retry
    next_attempt_at     timestamptz,
    sending_at          timestamptz,             -- when the last attempt left: in doubt from then on
    provider_message_id text,                    -- wamid / SM sid once the provider took it
    error_code          text,
    error_title         text,
    accepted_at         timestamptz NOT NULL,
    sent_at             timestamptz,
    updated_at          timestamptz NOT NULL
);
CREATE INDEX outbound_sends_open ON outbound_sends (partition, seq) WHERE status IN ('queued', 'sending');
CREATE INDEX outbound_sends_conversation ON outbound_sends (conversation_id, seq);
CREATE INDEX outbound_sends_provider_id ON outbound_sends (channel_id, provider_message_id);

-- A channel whose token the provider refused (Graph 190, Twilio 20003): paused until updated.
CREATE TABLE channel_send_state (
    channel_id text PRIMARY KEY,
    paused     boolean NOT NULL,
    reason     text,
    updated_at timestamptz NOT NULL
);

-- The outbox also hands accepted sends to <prefix>.sends (keyed by channel); its relay routes
-- each row to its topic.
ALTER TABLE outbox ADD COLUMN topic text NOT NULL DEFAULT 'outgoing-events';

-- The API's memory of Idempotency-Keys of sends (the message id derives from the key): the first
-- body wins at once, before the lifecycle agent has queued it, so another body is a 422 even
-- when the two requests race.
CREATE TABLE send_requests (
    id         uuid PRIMARY KEY,
    body_hash  text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
