-- Event ids are forgotten after the dedupe window (TALLY_DEDUPE_WINDOW_DAYS, docs/0007).
-- Rows arrive in received_at order, so a BRIN index finds the old ones for a few pages of
-- index, where a btree on a column written with every event would cost each insert.
CREATE INDEX ingested_received_brin ON ingested USING brin (received_at);
