-- The console's overview (GET /v1/overview, api/overview.py) reads only bounded ranges of
-- indexes. These four are what it needs beyond the existing ones; each is partial or small,
-- so the write paths pay little: closed conversations by when they closed (closed per minute,
-- close reasons of the last 24 h), dead letters not yet retried, webhook deliveries parked as
-- failed (per endpoint) and outbound sends that failed.
CREATE INDEX conversations_closed_at ON conversations (closed_at) WHERE state = 'closed';
CREATE INDEX dead_letters_not_retried ON dead_letters (id) WHERE retried_at IS NULL;
CREATE INDEX webhook_deliveries_failed ON webhook_deliveries (endpoint_id) WHERE status = 'failed';
CREATE INDEX outbound_sends_failed ON outbound_sends (id) WHERE status = 'failed';
