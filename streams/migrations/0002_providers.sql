-- Provider ingress: channel lookups by provider ids, delivery receipts, dead letters.

CREATE UNIQUE INDEX channels_whatsapp_phone ON channels ((config->>'phone_number_id'))
    WHERE provider = 'whatsapp';
CREATE UNIQUE INDEX channels_twilio_account ON channels ((config->>'account_sid'))
    WHERE provider = 'twilio';

ALTER TABLE messages ADD COLUMN status_at timestamptz;

-- Every receipt, in arrival order, with the provider's timestamp and errors. A receipt for a
-- message not stored yet waits here (applied = false) until the message appears.
CREATE TABLE message_receipts (
    id                   bigserial PRIMARY KEY,
    event_id             text NOT NULL UNIQUE,
    channel_id           text NOT NULL,
    provider_message_id  text NOT NULL,
    provider_status      text NOT NULL,
    status               text,
    provider_at          timestamptz NOT NULL,
    errors               jsonb NOT NULL DEFAULT '[]'::jsonb,
    payload              jsonb NOT NULL DEFAULT '{}'::jsonb,
    applied              boolean NOT NULL,
    received_at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX message_receipts_message ON message_receipts (channel_id, provider_message_id, id);
CREATE INDEX message_receipts_pending ON message_receipts (channel_id, provider_message_id)
    WHERE NOT applied;

-- A projection of the dead-letter topic, for the admin API; the topic is the truth.
CREATE TABLE dead_letters (
    id            bigserial PRIMARY KEY,
    dlq_partition integer NOT NULL,
    dlq_offset    bigint NOT NULL,
    source_topic  text NOT NULL,
    source_partition integer NOT NULL,
    source_offset bigint NOT NULL,
    key           text,
    value         text NOT NULL,
    error         text NOT NULL,
    attempts      integer NOT NULL,
    failed_at     timestamptz NOT NULL,
    retried_at    timestamptz,
    UNIQUE (dlq_partition, dlq_offset)
);
