CREATE TABLE companies (
    company_id  text PRIMARY KEY,
    name        text,
    owner_email text,
    timezone    text NOT NULL DEFAULT 'UTC'
);
CREATE TABLE accounts (
    account_id  text PRIMARY KEY,
    company_id  text NOT NULL,
    name        text,
    owner_email text
);

-- Usage per account, per day (in the company's time zone) and service, at the price the
-- account pays (or the company's cost for accounts without rebilling). Period totals are
-- sums of days from the start of the period.
CREATE TABLE usage_daily (
    account_id text NOT NULL,
    company_id text NOT NULL,
    day        date NOT NULL,
    service    text NOT NULL,
    currency   text NOT NULL,
    amount     bigint NOT NULL,
    PRIMARY KEY (account_id, day, service)
);

-- Mail to send: written in the transaction that decides it, sent (and retried) by the mailer.
-- dedupe_key makes a redelivered event or a restart queue nothing twice.
CREATE TABLE emails (
    id          bigserial PRIMARY KEY,
    dedupe_key  text NOT NULL UNIQUE,
    recipients  jsonb NOT NULL,
    subject     text NOT NULL,
    body_text   text NOT NULL,
    body_html   text NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts    integer NOT NULL DEFAULT 0,
    next_try_at timestamptz NOT NULL DEFAULT now(),
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX emails_due ON emails (next_try_at) WHERE status = 'pending';

-- In-app notifications for companies.
CREATE TABLE notifications (
    id          text PRIMARY KEY,
    company_id  text NOT NULL,
    kind        text NOT NULL,
    title       text NOT NULL,
    body        text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    read_at     timestamptz,
    seq         bigserial
);
CREATE INDEX notifications_company ON notifications (company_id, seq DESC);
