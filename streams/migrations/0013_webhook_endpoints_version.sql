-- The fan-out (agents/webhooks.py) decides once which endpoints get an event, from its cache of
-- the endpoints. NOTIFY refreshes that cache, but a notification arrives on another connection at
-- its own pace, so an endpoint created (or subscribed, or enabled) just before an event could
-- miss that event for good. Each change that matters to the fan-out bumps this counter in the
-- changing transaction; the fan-out reads it before each batch and reloads when it moved. So an
-- endpoint whose change committed before an event was published is always seen by its fan-out.
CREATE TABLE webhook_endpoints_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint NOT NULL
);
INSERT INTO webhook_endpoints_version VALUES (true, 0);

CREATE FUNCTION parley_webhook_endpoints_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE webhook_endpoints_version SET version = version + 1;
    RETURN NULL;
END
$$;
-- Not on failing_since, which the sender writes as attempts fail and succeed: the fan-out does
-- not depend on it, and reloading every endpoint on each of those would cost it for nothing.
CREATE TRIGGER webhook_endpoints_changed
    AFTER INSERT OR DELETE OR UPDATE OF events, enabled ON webhook_endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION parley_webhook_endpoints_changed();
