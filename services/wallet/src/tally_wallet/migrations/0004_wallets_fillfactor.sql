-- Every batch of usage rewrites the balance of each wallet it touches. With free room on each
-- page (fillfactor 70) Postgres updates a wallet in place (a HOT update: no new entry in the
-- primary key or company index), which keeps the cost of a debit flat as wallets grow.
-- Applies to pages written from now on; VACUUM FULL wallets to repack an existing table.
ALTER TABLE wallets SET (fillfactor = 70);
