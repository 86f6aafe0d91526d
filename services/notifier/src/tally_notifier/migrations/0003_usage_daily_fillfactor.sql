-- usage_daily rows are updated in place by every batch of debits (amount += ...): room on
-- each page lets Postgres do it without touching the primary key (HOT updates).
ALTER TABLE usage_daily SET (fillfactor = 70);
