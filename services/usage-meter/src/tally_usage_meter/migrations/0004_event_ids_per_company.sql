-- tally: no-transaction
-- squawk-ignore-file ban-concurrent-index-creation-in-transaction
-- An event id is unique within its company, not across the platform (docs/0021): another
-- company's event with the same id is another event, accepted and charged, where it was
-- answered `duplicate` and never charged. The key leads with the event id, so a lookup by
-- event id alone (a usage-meter of the version before, during a rolling upgrade) still finds
-- its rows through the index. The new key's index is built beside the old one without
-- blocking ingestion; only the swap takes the table's lock, briefly. Each statement can run
-- again after a failure.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ingested_event_company ON ingested (event_id, company_id);
-- squawk-ignore ban-drop-constraint
ALTER TABLE ingested DROP CONSTRAINT IF EXISTS ingested_pkey,
    ADD CONSTRAINT ingested_pkey PRIMARY KEY USING INDEX ingested_event_company;
