-- One row counting the rebilling settings versions the wallet stored (docs/0025). A usage
-- batch reads it when it rates and again once it holds its company wallets; only when it
-- moved (rarely: settings change seldom) does the batch read its accounts' settings again.
CREATE TABLE rebilling_clock (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    changes  bigint NOT NULL
);
INSERT INTO rebilling_clock (changes) VALUES (0);
