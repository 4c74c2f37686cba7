-- The outbox: application messages (enqueued in the application's transaction), prepared
-- half messages of the store-backed transactional publisher, and their delivery state.
--
-- state: PREPARED -> PENDING -> SENT; PREPARED -> deleted (rollback) or DEAD
--        PENDING -> DEAD (attempts used up) -> PENDING (re-drive)
-- due_at: when the row is next looked at (PENDING: next publish attempt; PREPARED: next
-- check-back). lease_owner/lease_until: the relay publishing the row right now; an
-- expired lease (a crashed relay) lets another relay take the row. Times are milliseconds since the
-- Unix epoch, taken from the database clock.
CREATE TABLE IF NOT EXISTS {outbox} (
    {id_column},
    message_id     TEXT NOT NULL,
    destination    TEXT NOT NULL,
    msg_key        TEXT,
    headers        TEXT NOT NULL,
    payload        {blob} NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    state          TEXT NOT NULL,
    producer_group TEXT,
    attempts       BIGINT NOT NULL DEFAULT 0,
    checks         BIGINT NOT NULL DEFAULT 0,
    due_at         BIGINT NOT NULL,
    lease_owner    TEXT,
    lease_until    BIGINT,
    last_error     TEXT,
    enqueued_at    BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    CONSTRAINT {outbox}_message_id_key UNIQUE (message_id)
);

CREATE INDEX IF NOT EXISTS {outbox}_state_due_idx ON {outbox} (state, due_at);
