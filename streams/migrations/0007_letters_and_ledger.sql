-- A letter keeps at most 100,000 characters of its raw value (so it always fits in one Kafka
-- record); these say what was cut. The original is fetched from its topic position on re-drive.
ALTER TABLE dead_letters ADD COLUMN value_bytes bigint NOT NULL DEFAULT -1;
ALTER TABLE dead_letters ADD COLUMN truncated boolean NOT NULL DEFAULT false;
-- The ledger is pruned by age, oldest first, in chunks.
CREATE INDEX processed_events_processed_at ON processed_events (processed_at);
