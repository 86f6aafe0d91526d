-- 'wallet': a recharge or top-up credited to a wallet; 'charge': a card charge for another
-- service (e.g. a resold subscription), never credited to a wallet.
ALTER TABLE recharge_attempts ADD COLUMN purpose text NOT NULL DEFAULT 'wallet'
    CHECK (purpose IN ('wallet', 'charge'));
ALTER TABLE recharge_attempts ADD COLUMN description text;
