-- The platform price catalog: amounts in micros (fractions of a cent are normal).
CREATE TABLE prices (
    service           text PRIMARY KEY,
    unit              text NOT NULL,
    unit_price_micros bigint NOT NULL CHECK (unit_price_micros >= 0),
    currency          text NOT NULL DEFAULT 'USD',
    updated_at        timestamptz NOT NULL DEFAULT now()
);

INSERT INTO prices (service, unit, unit_price_micros) VALUES
    ('email',    'email',          675),     -- 0.000675 per email
    ('sms',      'segment',        7900),    -- 0.0079 per SMS segment
    ('phone',    'minute',         14000),   -- 0.014 per minute
    ('ai',       '1k_tokens',      2000),    -- 0.002 per 1,000 tokens
    ('whatsapp', 'conversation',   58000);   -- 0.058 per conversation

-- Ingestion dedupe: an event id is accepted once, ever (survives restarts).
CREATE TABLE ingested (
    event_id    text PRIMARY KEY,
    company_id  text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- This service's own view of suspended wallets, fed by wallet.events.
CREATE TABLE suspended_wallets (
    owner       text NOT NULL CHECK (owner IN ('company', 'account')),
    owner_id    text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, owner_id)
);
