-- One outbox row per enqueue: the messages of a whole batch packed in one value (see
-- tally.outbox.pack). Rows written before this keep topic/key/value and still relay.
ALTER TABLE outbox ADD COLUMN messages bytea, ADD COLUMN count integer NOT NULL DEFAULT 1;
ALTER TABLE outbox ALTER COLUMN topic DROP NOT NULL, ALTER COLUMN value DROP NOT NULL;
-- Already compact JSON and short-lived: compressing it would only cost CPU.
ALTER TABLE outbox ALTER COLUMN messages SET STORAGE EXTERNAL;
