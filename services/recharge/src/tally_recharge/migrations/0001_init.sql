-- Stripe customers (platform Stripe for companies, the company's connected Stripe for accounts)
-- and recharge attempts, written before Stripe is called.
CREATE TABLE customers (
    owner              text NOT NULL CHECK (owner IN ('company', 'account')),
    owner_id           text NOT NULL,
    company_id         text NOT NULL,
    stripe_account     text,
    stripe_customer_id text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, owner_id)
);

CREATE TABLE recharge_attempts (
    id             text PRIMARY KEY,
    wallet_id      text NOT NULL,
    company_id     text NOT NULL,
    account_id     text,
    trigger        text NOT NULL CHECK (trigger IN ('auto', 'manual')),
    amount_micros  bigint NOT NULL CHECK (amount_micros > 0),
    currency       text NOT NULL,
    status         text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    tries          jsonb NOT NULL DEFAULT '[]',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recharge_attempts_wallet ON recharge_attempts (wallet_id, created_at DESC);
