-- The inbox: one key per (consumer, message) whose effect was applied, written in the
-- same transaction as the effect. processed_at is milliseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS {inbox} (
    consumer_name TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    processed_at  BIGINT NOT NULL,
    PRIMARY KEY (consumer_name, message_id)
);

CREATE INDEX IF NOT EXISTS {inbox}_processed_idx ON {inbox} (processed_at);
