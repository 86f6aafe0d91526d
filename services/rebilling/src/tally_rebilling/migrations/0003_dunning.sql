-- Period billing with dunning (docs/0009). Every (subscription, period) has one leg per payer:
-- `platform` (the company's card, the platform price) and, for resold subscriptions, `account`
-- (the account's card on the company's connected Stripe, the company price). Each leg is charged
-- at most once; a failed leg waits for its next try (the runner's backoff, or at once when its
-- payer saves or defaults a card); after the last try the subscription is cancelled.
ALTER TABLE subscriptions ADD COLUMN first_period text;
ALTER TABLE subscriptions ADD COLUMN cancel_at_period_end boolean NOT NULL DEFAULT false;
ALTER TABLE subscriptions ADD COLUMN cancelled_at timestamptz;
ALTER TABLE subscriptions ADD COLUMN cancel_reason text;
UPDATE subscriptions SET first_period = to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM');
ALTER TABLE subscriptions ALTER COLUMN first_period SET NOT NULL;
ALTER TABLE subscriptions ADD CONSTRAINT subscriptions_status
    CHECK (status IN ('active', 'past_due', 'cancelled'));

CREATE TABLE period_legs (
    subscription_id text NOT NULL REFERENCES subscriptions (id),
    period          text NOT NULL,
    leg             text NOT NULL CHECK (leg IN ('platform', 'account')),
    company_id      text NOT NULL,
    account_id      text NOT NULL,
    amount          bigint NOT NULL CHECK (amount >= 0),
    status          text NOT NULL CHECK (status IN ('due', 'charged', 'failed')),
    failures        integer NOT NULL DEFAULT 0,  -- tries that failed; the next try is failures + 1
    next_try_at     timestamptz NOT NULL,
    last_error      text,
    last_try_at     timestamptz,  -- wall clock: a card saved after it brings the leg forward
    charged_at      timestamptz,
    PRIMARY KEY (subscription_id, period, leg)
);
CREATE INDEX period_legs_due ON period_legs (next_try_at) WHERE status <> 'charged';
CREATE INDEX period_legs_company ON period_legs (company_id, period);

-- Existing charges become legs. A period that failed before this migration is dunned from its
-- first try again: that try's key is the one the old runner used, so a leg the old runner did
-- charge (its platform leg, charged before the account's failed) is found, not charged twice.
INSERT INTO period_legs (subscription_id, period, leg, company_id, account_id, amount, status,
                         next_try_at, last_error, charged_at)
SELECT c.subscription_id, c.period, 'platform', c.company_id, s.account_id, c.platform_amount,
       CASE WHEN c.status = 'charged' THEN 'charged' ELSE 'due' END, now(), c.error, c.charged_at
FROM subscription_charges c JOIN subscriptions s ON s.id = c.subscription_id;
INSERT INTO period_legs (subscription_id, period, leg, company_id, account_id, amount, status,
                         next_try_at, last_error, charged_at)
SELECT c.subscription_id, c.period, 'account', c.company_id, s.account_id, c.company_amount,
       CASE WHEN c.status = 'charged' THEN 'charged' ELSE 'due' END, now(), c.error, c.charged_at
FROM subscription_charges c JOIN subscriptions s ON s.id = c.subscription_id
WHERE s.deployment = 'resell' AND c.company_amount > 0;
DROP TABLE subscription_charges;
