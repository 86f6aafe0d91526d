-- The auto-recharge rule (docs/0008). A wallet is re-evaluated whenever one of the rule's inputs
-- may have changed: a check is queued (one per wallet) and the charger evaluates it against the
-- wallet's live state.
CREATE TABLE recharge_checks (
    wallet_id   text PRIMARY KEY,
    owner       text NOT NULL CHECK (owner IN ('company', 'account')),
    company_id  text NOT NULL,
    account_id  text,
    not_before  timestamptz NOT NULL DEFAULT now(),
    traceparent text,  -- the trace of what triggered it (a usage event's crossing)
    queued_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recharge_checks_due ON recharge_checks (not_before);

-- A recharge is in flight until the wallet has credited it: a succeeded attempt whose credit has
-- not reached the wallet yet still counts (else a check in between would charge twice).
-- Attempts that succeeded before this migration were credited long ago.
ALTER TABLE recharge_attempts ADD COLUMN credited_at timestamptz;
UPDATE recharge_attempts SET credited_at = updated_at WHERE status = 'succeeded';

-- 'cancelled': a pending recharge the rule no longer wants (auto-recharge turned off, the
-- balance back at its threshold, no card left) before any card was charged for it.
ALTER TABLE recharge_attempts DROP CONSTRAINT recharge_attempts_status_check;
ALTER TABLE recharge_attempts ADD CONSTRAINT recharge_attempts_status_check
    CHECK (status IN ('pending', 'succeeded', 'failed', 'cancelled'));

-- Fencing: whoever leased an attempt holds this token; only the holder may settle it.
ALTER TABLE recharge_attempts ADD COLUMN lease_token text;

-- After a cancellation (repeated failures) the rule waits until the wallet confirms that
-- auto-recharge is off, so a check racing the cancellation cannot start a new round.
ALTER TABLE wallet_policy ADD COLUMN cancelling boolean NOT NULL DEFAULT false;
