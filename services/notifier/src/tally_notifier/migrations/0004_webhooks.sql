-- Outbound webhooks (API.md, notifier): a company's endpoints, and a durable queue of
-- deliveries, one per (endpoint, event), sent and retried by the notifier's webhook sender.

CREATE TABLE webhook_endpoints (
    id            text PRIMARY KEY,
    company_id    text NOT NULL,
    url           text NOT NULL,
    event_types   text[] NOT NULL,          -- names, or {'*'}
    secret        text NOT NULL,            -- whsec_…: it signs, so it is kept as given
    status        text NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled', 'deleted')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    failing_since timestamptz,              -- the first failure since the last success
    disabled_at   timestamptz,
    leased_until  timestamptz,              -- a sender is delivering to it (one at a time)
    seq           bigserial
);
CREATE INDEX webhook_endpoints_company ON webhook_endpoints (company_id, seq DESC);

-- One event for one endpoint. ``payload`` is the envelope exactly as signed and sent; the
-- event id is the ``webhook-id`` of every attempt. ``retry_until``: no automatic attempt after
-- it (NULL: ``created_at`` + TALLY_WEBHOOK_RETRY_HOURS; a manual retry is one attempt).
CREATE TABLE webhook_deliveries (
    id              text PRIMARY KEY,
    endpoint_id     text NOT NULL REFERENCES webhook_endpoints (id),
    company_id      text NOT NULL,
    account_id      text,                   -- the account the event names (tenant check at send)
    event_id        text NOT NULL,
    event_type      text NOT NULL,
    payload         bytea NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'succeeded', 'failed', 'dropped')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    retry_until     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    response_code   integer,
    latency_ms      integer,
    last_error      text,
    seq             bigserial,
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, seq DESC);

-- The delivery log: every attempt, its answer (status code and a small excerpt), its time.
CREATE TABLE webhook_attempts (
    delivery_id   text NOT NULL REFERENCES webhook_deliveries (id),
    attempt       integer NOT NULL,
    at            timestamptz NOT NULL DEFAULT now(),
    response_code integer,
    latency_ms    integer NOT NULL,
    error         text,
    excerpt       text,
    PRIMARY KEY (delivery_id, attempt)
);
