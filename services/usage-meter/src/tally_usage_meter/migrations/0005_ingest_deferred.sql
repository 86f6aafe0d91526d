-- Usage from `usage.ingest` that names a company or account rebilling could not be asked about
-- (rebilling down or hung) waits here instead of holding its partition: the rest of the batch
-- is recorded and the offsets move on, and `IngestDeferred` judges these again once rebilling
-- answers (docs/0029). The record is kept as it came, for its dead letter if
-- it is then refused, with its service's prices when it came (a price set since applies to
-- events received after: API.md): JSON [[currency, unit, unit_price_micros], ...].
CREATE TABLE IF NOT EXISTS ingest_deferred (
    company_id   text NOT NULL,
    event_id     text NOT NULL,
    value        bytea NOT NULL,
    record_key   bytea,
    topic        text NOT NULL,
    source_partition integer NOT NULL,
    source_offset    bigint NOT NULL,
    traceparent  text,
    prices       text NOT NULL,
    deferred_at  timestamptz NOT NULL,  -- when it came (its batch's first try)
    PRIMARY KEY (company_id, event_id)
);
