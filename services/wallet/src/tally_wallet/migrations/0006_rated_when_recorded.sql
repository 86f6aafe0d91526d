-- Usage is rated by the rebilling settings in effect when usage-meter recorded it, whichever
-- the wallet hears first (docs/0025). A usage event's company leg keeps the account it was
-- used by and when it was recorded, so settings heard after the usage can re-rate it; each
-- settings version is kept with the time it took effect, so usage heard after a change but
-- recorded before it is rated by the version before. Nullable columns: added without a rewrite.
ALTER TABLE transfers ADD COLUMN account_id text, ADD COLUMN recorded_at timestamptz;

ALTER TABLE rebilling_settings ADD COLUMN effective_at timestamptz;  -- NULL: since ever

CREATE TABLE rebilling_history (
    account_id   text NOT NULL,
    version      bigint NOT NULL,
    mode         text NOT NULL CHECK (mode IN ('off', 'rebill', 'rebill_markup')),
    markups      jsonb NOT NULL DEFAULT '{}',
    active       boolean NOT NULL,
    effective_at timestamptz NOT NULL,
    PRIMARY KEY (account_id, version)
);
