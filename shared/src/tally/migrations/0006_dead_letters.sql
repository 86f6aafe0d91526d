-- Records a consumer dead-lettered after failing on them alone (tally.consumer.Isolation):
-- each record once (a redelivered batch skips it), and the count per kind in a window that
-- every replica of the service shares (the poison budget).
CREATE TABLE dead_letters (
    topic       text        NOT NULL,
    part        integer     NOT NULL,
    record_offset bigint    NOT NULL,
    kind        text        NOT NULL,
    lettered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, part, record_offset)
);
CREATE INDEX dead_letters_kind ON dead_letters (kind, lettered_at);
