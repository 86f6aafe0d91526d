-- Large packed batches are stored lz4-compressed by the writer (tally.outbox.enqueue): JSON
-- envelopes shrink about five times, and Postgres writes, WAL-logs, reads and deletes a fifth
-- of the TOAST chunks (round 4 of #8, docs/0004). A row has ``messages`` or ``messages_lz4``.
-- Postgres' own lz4 would do the same, but not every server is built with it.
ALTER TABLE outbox ADD COLUMN messages_lz4 bytea;
ALTER TABLE outbox ALTER COLUMN messages_lz4 SET STORAGE EXTERNAL;
