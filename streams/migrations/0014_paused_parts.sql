-- The emergency switch (the seeds' pause/resume): a part listed here is paused on every worker
-- until it is removed (POST /v1/admin/pause and /resume). A row survives restarts; every worker
-- reads the table at start and every second, and NOTIFY tells it at once.
CREATE TABLE paused_parts (
    part      text PRIMARY KEY CHECK (part IN ('lifecycle', 'sender', 'webhooks')),
    paused_at timestamptz NOT NULL DEFAULT now(),
    reason    text NOT NULL DEFAULT ''
);

CREATE FUNCTION parley_paused_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('parley_paused', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER paused_parts_changed AFTER INSERT OR UPDATE OR DELETE ON paused_parts
    FOR EACH STATEMENT EXECUTE FUNCTION parley_paused_changed();
