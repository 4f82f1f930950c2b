-- A user message changes its conversation's deadline, version, updated_at and service window:
-- columns no index needs. conversations_deadline (0001) indexed deadline_at for the sweep, which
-- reads scheduled_actions since 0008; nothing reads it now, and it made every such UPDATE a
-- non-HOT one: a new entry in each of the table's eight indexes per message. Without it, and
-- with room left in each page for the new row version, the update stays on its page (HOT) and
-- touches no index. (Measured with the worker draining 100k messages: see the README's
-- Benchmarks section.)
DROP INDEX IF EXISTS conversations_deadline;
ALTER TABLE conversations SET (fillfactor = 80);
