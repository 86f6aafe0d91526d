-- The cards the leg's last try charged (recharge's answer): a card saved that the last try did
-- not reach (saved while the try was reading the payer's cards) brings the next try forward even
-- though it was saved before the try began (docs/0009; clocks of two services never decide it).
ALTER TABLE period_legs ADD COLUMN tried_cards text[] NOT NULL DEFAULT '{}';
