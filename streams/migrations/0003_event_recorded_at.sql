-- When each audit row was written (occurred_at is the event's own time): the difference is the
-- pipeline's lag, which operators and the benchmark read.
ALTER TABLE conversation_events ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT clock_timestamp();
