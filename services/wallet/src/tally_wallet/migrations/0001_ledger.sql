-- Wallets: user wallets (company, account) and system wallets that stand on the other side of
-- every transfer (platform revenue, company revenue, stripe clearing, manual credits).
-- balance = credits - debits, kept materialised; the ledger (transfers) is the truth.
CREATE TABLE wallets (
    id               text PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('company', 'account', 'system')),
    company_id       text,
    account_id       text,
    currency         text NOT NULL,
    balance          bigint NOT NULL DEFAULT 0,
    threshold        bigint NOT NULL DEFAULT 10000000,
    reload_amount    bigint NOT NULL DEFAULT 50000000,
    auto_recharge    boolean NOT NULL DEFAULT true,
    smart_adjustment boolean NOT NULL DEFAULT true,
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wallets_company ON wallets (company_id) WHERE kind <> 'system';

-- Transfers: immutable, TigerBeetle-style. The key is the idempotency key: a second transfer
-- with the same key is never applied. Amount is positive; direction is debit -> credit.
CREATE TABLE transfers (
    id                   bigserial PRIMARY KEY,
    key                  text NOT NULL UNIQUE,
    debit_wallet         text NOT NULL,
    credit_wallet        text NOT NULL,
    amount               bigint NOT NULL CHECK (amount > 0),
    kind                 text NOT NULL,
    service              text,
    usage_event_id       text,
    reference            text,
    debit_balance_after  bigint NOT NULL,
    credit_balance_after bigint NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (debit_wallet <> credit_wallet)
);
CREATE INDEX transfers_debit ON transfers (debit_wallet, id DESC);
CREATE INDEX transfers_credit ON transfers (credit_wallet, id DESC);
