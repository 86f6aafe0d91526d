-- An Idempotency-Key answers its first response again: stored as json (the text as written),
-- not jsonb (which reorders an object's keys), so the replay is the same bytes.
ALTER TABLE idempotency_keys ALTER COLUMN response TYPE json USING response::json;
