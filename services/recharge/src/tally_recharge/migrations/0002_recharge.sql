ALTER TABLE recharge_attempts
    ADD COLUMN owner          text NOT NULL DEFAULT 'company' CHECK (owner IN ('company', 'account')),
    ADD COLUMN stripe_account text,
    ADD COLUMN charged_minor  bigint,
    ADD COLUMN payment_intent text,
    ADD COLUMN payment_method text,
    ADD COLUMN fee_micros     bigint,
    ADD COLUMN reload_micros  bigint,
    ADD COLUMN smart_adjustment boolean NOT NULL DEFAULT false,
    ADD COLUMN round          integer NOT NULL DEFAULT 1,
    ADD COLUMN not_before     timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN leased_until   timestamptz,
    ADD COLUMN error          text,
    ADD COLUMN seq            bigserial;
-- One automatic recharge in flight per wallet: a duplicate or concurrent trigger finds it and
-- stops. (Manual top-ups are explicit and run at once.)
CREATE UNIQUE INDEX recharge_attempts_one_pending ON recharge_attempts (wallet_id)
    WHERE status = 'pending' AND trigger = 'auto';
CREATE INDEX recharge_attempts_due ON recharge_attempts (not_before) WHERE status = 'pending';
CREATE INDEX recharge_attempts_wallet_seq ON recharge_attempts (wallet_id, seq DESC);

CREATE TABLE payment_methods (
    id                text PRIMARY KEY,
    owner             text NOT NULL CHECK (owner IN ('company', 'account')),
    owner_id          text NOT NULL,
    company_id        text NOT NULL,
    stripe_account    text,
    customer_id       text NOT NULL,
    brand             text,
    last4             text,
    is_default        boolean NOT NULL DEFAULT false,
    attached_at       timestamptz NOT NULL DEFAULT now(),
    last_succeeded_at timestamptz,
    seq               bigserial
);
CREATE INDEX payment_methods_owner ON payment_methods (owner, owner_id);
CREATE UNIQUE INDEX payment_methods_one_default ON payment_methods (owner, owner_id)
    WHERE is_default;

-- What the recharge service knows of companies and accounts (from rebilling.events).
CREATE TABLE companies (
    company_id        text PRIMARY KEY,
    currency          text NOT NULL DEFAULT 'USD',
    stripe_account_id text,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE accounts (
    account_id text PRIMARY KEY,
    company_id text NOT NULL
);

-- Per wallet: consecutive failed auto-recharge rounds, and when the tier last moved.
CREATE TABLE wallet_policy (
    wallet_id            text PRIMARY KEY,
    consecutive_failures integer NOT NULL DEFAULT 0,
    tier_since           timestamptz NOT NULL DEFAULT '-infinity'
);
