-- The trace a recharge belongs to (the usage event that crossed the threshold).
ALTER TABLE recharge_attempts ADD COLUMN traceparent text;
