-- Packed rows as one msgpack array (tally.outbox.pack, docs/0018) go in columns of their own:
-- a relay of the previous version, still leading during a rolling upgrade, finds neither
-- ``messages`` nor ``messages_lz4`` in such a row, fails on it and leaves it for the new
-- relay, instead of reading the new layout as the old one. Rows in the old columns still relay.
ALTER TABLE outbox ADD COLUMN rows_mp bytea, ADD COLUMN rows_mp_lz4 bytea;
ALTER TABLE outbox ALTER COLUMN rows_mp SET STORAGE EXTERNAL;
ALTER TABLE outbox ALTER COLUMN rows_mp_lz4 SET STORAGE EXTERNAL;
