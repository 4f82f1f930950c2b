"""The shared contract: topics, wire records, settings, and the Postgres store."""
