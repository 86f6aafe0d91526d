-- Only user wallets' ledger lines are listed (GET .../wallet/transactions). System wallets stand
-- on the other side of nearly every transfer (each usage leg credits platform or company
-- revenue), so indexing their side cost one index entry per ledger line that no query reads.
-- Queries by wallet repeat the predicate (storage.list_transfers) so these indexes serve them.
DROP INDEX transfers_debit;
DROP INDEX transfers_credit;
CREATE INDEX transfers_debit ON transfers (debit_wallet, id DESC)
    WHERE debit_wallet NOT LIKE 'system:%';
CREATE INDEX transfers_credit ON transfers (credit_wallet, id DESC)
    WHERE credit_wallet NOT LIKE 'system:%';
