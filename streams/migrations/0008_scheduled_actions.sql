-- The durable intent of every "later": one row per pending action, written in the same
-- transaction as the change that armed or disarmed it (domain/actions.py). The workers index
-- their partitions' rows after every assignment, and the backup sweep fires overdue ones, so an
-- action survives a crash between the Postgres commit and the timer table's write.
CREATE TABLE scheduled_actions (
    owner      text NOT NULL,        -- the Kafka key: a thread "channel/contact" or "schedule:<key>"
    name       text NOT NULL,        -- "close", "schedule", ...
    token      text NOT NULL,        -- this arming; a firing with another token is stale
    due_at     timestamptz NOT NULL,
    -- the owner's partition (the producer's murmur2 partitioner). NULL only for rows carried over
    -- below, filled in by `parley migrate` / the worker at start (SQL has no murmur2).
    partition  integer,
    PRIMARY KEY (owner, name)
);
CREATE INDEX scheduled_actions_due ON scheduled_actions (partition, due_at);

-- Every open conversation's deadline becomes its "close" action.
INSERT INTO scheduled_actions (owner, name, token, due_at)
SELECT channel_id || '/' || contact_id, 'close', id::text || ':' || version, deadline_at
FROM conversations WHERE state <> 'closed' AND deadline_at IS NOT NULL;
