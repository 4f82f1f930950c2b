-- Channel secrets sealed at rest (streams/channel_secrets.py): `config` keeps the clear lookup
-- fields, `sealed` the Fernet token of the secrets. Rows from before keep their secrets in
-- `config` with `sealed` NULL until `parley rotate-secrets` seals them.
ALTER TABLE channels ADD COLUMN sealed text;
ALTER TABLE channels ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- Every API process caches channels and listens on `parley_channels`: any change to a row, by
-- the API, `parley rotate-secrets` or plain SQL, reaches every cache when it commits.
CREATE FUNCTION parley_channel_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('parley_channels', COALESCE(NEW.id, OLD.id));
    RETURN NULL;
END
$$;
CREATE TRIGGER channels_changed AFTER INSERT OR UPDATE OR DELETE ON channels
    FOR EACH ROW EXECUTE FUNCTION parley_channel_changed();
