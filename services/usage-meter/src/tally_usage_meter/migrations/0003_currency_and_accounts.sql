-- One price per (service, currency): a company's usage is priced in the company's currency.
-- Existing prices keep their currency (USD by default).
ALTER TABLE prices DROP CONSTRAINT prices_pkey;
ALTER TABLE prices ADD PRIMARY KEY (service, currency);

-- What rebilling says of companies (their currency) and accounts (their company), from
-- rebilling.events. A company never heard of is priced in USD, as before.
CREATE TABLE companies (
    company_id text PRIMARY KEY,
    currency   text NOT NULL DEFAULT 'USD',
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE accounts (
    account_id text PRIMARY KEY,
    company_id text NOT NULL
);
