-- When the leg's payer last saved or defaulted a card (docs/0009): a try that began before it
-- and failed — also one whose payment was still processing when the card came — is followed at
-- once by the next try, not after the dunning wait.
ALTER TABLE period_legs ADD COLUMN card_saved_at timestamptz;
