-- The currency of every company id money was recorded for, created here or not (docs/0027).
-- Usage, a credit or a top-up may name a company before it is created: it is charged in USD,
-- and the id's currency is fixed here at the first such money (POST
-- /v1/companies/{cid}/currency-pin). Creating the company in another currency is then refused
-- (409 currency_conflict): its wallet already holds USD, and money in two currencies could
-- never meet. A company created first pins its own currency. Both write this row, so the two
-- are ordered by its key.
CREATE TABLE currency_pins (
    company_id text PRIMARY KEY,
    currency   text NOT NULL,
    pinned_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO currency_pins (company_id, currency, pinned_at)
SELECT id, currency, created_at FROM companies;
