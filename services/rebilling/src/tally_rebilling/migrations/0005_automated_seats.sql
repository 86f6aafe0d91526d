-- Seats of stripe_connect_automated workspaces (docs/0009): the company's monthly seat price,
-- and per workspace one `seats` subscription (quantity = seats) charged to the account's card
-- through the company's connected Stripe; a seat added mid-period is one more leg of the period
-- (`account:<invitation>`), charged at once and dunned like the others.
ALTER TABLE companies ADD COLUMN seat_price bigint NOT NULL DEFAULT 0 CHECK (seat_price >= 0);
ALTER TABLE subscriptions DROP CONSTRAINT subscriptions_kind_check;
ALTER TABLE subscriptions ADD CONSTRAINT subscriptions_kind_check
    CHECK (kind IN ('product', 'licenses', 'seats'));
CREATE UNIQUE INDEX subscriptions_one_seat_plan ON subscriptions (account_id)
    WHERE kind = 'seats';
ALTER TABLE period_legs DROP CONSTRAINT period_legs_leg_check;
ALTER TABLE period_legs ADD CONSTRAINT period_legs_leg_check
    CHECK (leg ~ '^(platform|account)(:[A-Za-z0-9_.-]+)?$');
