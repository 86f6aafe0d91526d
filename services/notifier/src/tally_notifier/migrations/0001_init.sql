-- Alert rules per account and the log of what was sent (at most one usage alert per account
-- per day, across restarts).
CREATE TABLE alert_rules (
    account_id  text PRIMARY KEY,
    company_id  text NOT NULL,
    enabled     boolean NOT NULL DEFAULT true,
    conditions  jsonb NOT NULL DEFAULT '[]',
    recipients  jsonb NOT NULL DEFAULT '[]',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sent_notifications (
    account_id text NOT NULL,
    kind       text NOT NULL,
    day        date NOT NULL,
    sent_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, kind, day)
);
