-- Usage is rated by the rebilling settings in effect when usage-meter recorded it, whichever
-- the wallet hears first (docs/0025). A usage event's company leg keeps the account it was
-- used by, when it was recorded and when it occurred, so settings heard after the usage can
-- re-rate it (and correct the account's usage in the minute it was counted in). Nullable
-- columns: added without a rewrite.
ALTER TABLE transfers
    ADD COLUMN account_id text,
    ADD COLUMN recorded_at timestamptz,
    ADD COLUMN occurred_at timestamptz;
-- A line's created_at is when it was inserted, with its id, not when its transaction began:
-- the re-rating walks a company's lines back by id until they are older than a change, and a
-- transaction's start would make a slow transaction's new line look old.
ALTER TABLE transfers ALTER COLUMN created_at SET DEFAULT clock_timestamp();

-- effective_at: when the newest version took effect (NULL: since ever); changes: counts every
-- version stored (the newest or a late one), which a usage batch reads again before it commits.
ALTER TABLE rebilling_settings
    ADD COLUMN effective_at timestamptz,
    ADD COLUMN changes bigint NOT NULL DEFAULT 0;

-- Every version heard, with when it took effect ('-infinity': since ever, the versions stored
-- before this migration; a version published without it takes effect when heard).
CREATE TABLE rebilling_history (
    account_id   text NOT NULL,
    version      bigint NOT NULL,
    mode         text NOT NULL CHECK (mode IN ('off', 'rebill', 'rebill_markup')),
    markups      jsonb NOT NULL DEFAULT '{}',
    active       boolean NOT NULL,
    effective_at timestamptz NOT NULL,
    PRIMARY KEY (account_id, version)
);
INSERT INTO rebilling_history (account_id, version, mode, markups, active, effective_at)
SELECT account_id, version, mode, markups, active, '-infinity' FROM rebilling_settings;
