-- Outgoing events are published in order per key: every outbox row records the partition of its
-- key (the producer's murmur2 partitioner over PARLEY_TOPIC_PARTITIONS, computed in Python at
-- insert; SQL has no murmur2), and the relay (agents/outbox.py) publishes one partition's rows in
-- id order, one relay per partition at a time. Rows written before this migration keep a NULL
-- partition and are published by whichever relay holds the pseudo-partition -1.
ALTER TABLE outbox ADD COLUMN partition integer;
-- What the relay reads: a partition's unpublished rows in id order (NULL partition included:
-- a btree answers `partition IS NULL`). It replaces the index on id alone.
CREATE INDEX outbox_unpublished_by_partition ON outbox (partition, id) WHERE published_at IS NULL;
DROP INDEX outbox_unpublished;
