-- Licenses are bought (docs/0009): a purchase charges the company's card quantity x the
-- platform's monthly license price at once, and the pool grows only when that charge succeeds;
-- every period after, the pool's total is charged as one more recurring charge (a subscription
-- of kind `licenses`, one per company, with the pool's total as its quantity), dunned like the
-- others.
ALTER TABLE subscriptions ALTER COLUMN account_id DROP NOT NULL;
ALTER TABLE subscriptions ADD COLUMN kind text NOT NULL DEFAULT 'product'
    CHECK (kind IN ('product', 'licenses'));
ALTER TABLE subscriptions ADD COLUMN quantity integer NOT NULL DEFAULT 1 CHECK (quantity >= 0);
CREATE UNIQUE INDEX subscriptions_one_license_pool ON subscriptions (company_id)
    WHERE kind = 'licenses';
ALTER TABLE period_legs ALTER COLUMN account_id DROP NOT NULL;

CREATE TABLE license_purchases (
    id         text PRIMARY KEY,
    company_id text NOT NULL REFERENCES companies (id),
    quantity   integer NOT NULL CHECK (quantity > 0),
    amount     bigint NOT NULL CHECK (amount >= 0),
    period     text NOT NULL,
    status     text NOT NULL CHECK (status IN ('pending', 'charged', 'failed')),
    error      text,
    created_at timestamptz NOT NULL DEFAULT now(),
    settled_at timestamptz
);
CREATE INDEX license_purchases_pending ON license_purchases (created_at) WHERE status = 'pending';

-- Pools that exist were never charged: they are billed from the next period on.
INSERT INTO subscriptions (id, account_id, company_id, product, deployment, platform_price,
                           company_price, first_period, kind, quantity)
SELECT 'lic_' || p.company_id, NULL, p.company_id, 'licenses', 'direct', 10000000, 0,
       to_char((now() AT TIME ZONE 'UTC') + interval '1 month', 'YYYY-MM'), 'licenses', p.total
FROM license_pools p WHERE p.total > 0;
