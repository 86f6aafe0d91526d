-- A threshold crossing fires on the first debit below the threshold while armed; it disarms
-- until a credit lifts the balance back to the threshold. A new wallet starts armed, so a
-- wallet that starts below its threshold (a new one at 0) is pre-loaded at its first usage.
ALTER TABLE wallets ADD COLUMN threshold_armed boolean NOT NULL DEFAULT true;
