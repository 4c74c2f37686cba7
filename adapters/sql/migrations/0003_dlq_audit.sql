-- The dead-letter re-drive audit: one row per message an operator re-drove from a broker's
-- dead-letter destination back to its origin, written after the broker confirmed the
-- publish. redriven_at is milliseconds since the Unix epoch (database clock).
CREATE TABLE IF NOT EXISTS {audit} (
    {id_column},
    actor            TEXT NOT NULL,
    adapter          TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    from_destination TEXT NOT NULL,
    to_destination   TEXT NOT NULL,
    consumer_group   TEXT NOT NULL,
    redriven_at      BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS {audit}_message_idx ON {audit} (message_id);
