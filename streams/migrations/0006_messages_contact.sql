-- A message id is unique per sender, not per channel: two contacts of a generic channel may
-- both send "1". The unique key used to drop the second contact's message silently.
ALTER TABLE messages ADD COLUMN contact_id text;
UPDATE messages m SET contact_id = c.contact_id FROM conversations c WHERE c.id = m.conversation_id;
ALTER TABLE messages ALTER COLUMN contact_id SET NOT NULL;
ALTER TABLE messages DROP CONSTRAINT messages_channel_id_direction_provider_message_id_key;
ALTER TABLE messages ADD CONSTRAINT messages_sender_key
    UNIQUE (channel_id, direction, contact_id, provider_message_id);
-- Receipts find outbound messages by (channel, provider id) alone: keep that lookup indexed.
CREATE INDEX messages_provider_id ON messages (channel_id, provider_message_id);
