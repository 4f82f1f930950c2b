-- The console's overview (GET /v1/overview, api/overview.py) reads only bounded ranges of
-- indexes. These three are what it needs beyond the existing ones (closed conversations by
-- closed_at is 0015's conversations_closed); each is partial, so the write paths pay little:
-- dead letters not yet retried, webhook deliveries parked as failed (per endpoint) and outbound
-- sends that failed.
CREATE INDEX dead_letters_not_retried ON dead_letters (id) WHERE retried_at IS NULL;
CREATE INDEX webhook_deliveries_failed ON webhook_deliveries (endpoint_id) WHERE status = 'failed';
CREATE INDEX outbound_sends_failed ON outbound_sends (id) WHERE status = 'failed';
