-- Records a consumer dead-lettered after failing on them alone (tally.consumer.Isolation):
-- each record once per consumer group (a redelivered batch writes no second letter; a record
-- at a reused offset, after a topic is rebuilt, differs by its digest), and the count per group
-- and kind in a window that every replica of the service shares (the poison budget).
CREATE TABLE dead_letters (
    group_id      text        NOT NULL,
    topic         text        NOT NULL,
    part          integer     NOT NULL,
    record_offset bigint      NOT NULL,
    digest        bytea       NOT NULL,
    kind          text        NOT NULL,
    lettered_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, part, record_offset, digest)
);
CREATE INDEX dead_letters_kind ON dead_letters (group_id, kind, lettered_at);
