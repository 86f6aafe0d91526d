-- The wallet's own copy of what other services decide (fed by their topics).
CREATE TABLE rebilling_settings (
    account_id  text PRIMARY KEY,
    company_id  text NOT NULL,
    mode        text NOT NULL CHECK (mode IN ('off', 'rebill', 'rebill_markup')),
    markups     jsonb NOT NULL DEFAULT '{}',
    active      boolean NOT NULL DEFAULT true,
    version     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE companies (
    company_id       text PRIMARY KEY,
    currency         text NOT NULL DEFAULT 'USD',
    stripe_connected boolean NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE accounts (
    account_id  text PRIMARY KEY,
    company_id  text NOT NULL,
    licenses    integer,            -- NULL: never told (no seat rule applies)
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_company ON accounts (company_id);

-- "Request credits": at most one pending request per account.
CREATE TABLE credit_requests (
    id            text PRIMARY KEY,
    account_id    text NOT NULL,
    company_id    text NOT NULL,
    amount        bigint NOT NULL CHECK (amount > 0),
    currency      text NOT NULL,
    reference     text,
    status        text NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    requested_by  text,
    resolved_by   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz,
    seq           bigserial NOT NULL UNIQUE
);
CREATE UNIQUE INDEX credit_requests_one_pending ON credit_requests (account_id)
    WHERE status = 'pending';
CREATE INDEX credit_requests_company ON credit_requests (company_id, seq DESC);
