//! Every SQL statement of the store, as templates.
//!
//! Templates name tables as `{outbox}`, `{inbox}`, `{migrations}`, `{audit}` and the dialect
//! differences as `{now}` (the database clock in milliseconds since the Unix epoch),
//! `{skip_locked}` (`FOR UPDATE SKIP LOCKED` on PostgreSQL, nothing on SQLite, whose
//! single writer serialises claims) and `{ids_in_p1}` / `{texts_in_p1}` (the elements of a
//! JSON array bound as `$1`, so a whole batch is one statement with one parameter). [`Sql::render`] substitutes only validated table names
//! and these fixed fragments; every value is a bound parameter (`$1`, `$2`, ..., which both
//! PostgreSQL and SQLite accept).

use std::sync::Arc;

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

use crate::config::TableNames;

/// The database behind a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// PostgreSQL: many relays, row leases with `FOR UPDATE SKIP LOCKED`.
    Postgres,
    /// SQLite: one writer at a time, so one relay per database file.
    Sqlite,
}

impl Dialect {
    /// `postgres` or `sqlite`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::Sqlite => "sqlite",
        }
    }

    fn now(self) -> &'static str {
        match self {
            Dialect::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Postgres => "FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        }
    }

    /// The integers of the JSON array bound as `$1`, as a subquery.
    fn ids_in_p1(self) -> &'static str {
        match self {
            Dialect::Postgres => {
                "(SELECT CAST(value AS BIGINT) FROM jsonb_array_elements_text(CAST($1 AS JSONB)))"
            }
            Dialect::Sqlite => "(SELECT value FROM json_each($1))",
        }
    }

    /// The strings of the JSON array bound as `$1`, as a subquery.
    fn texts_in_p1(self) -> &'static str {
        match self {
            Dialect::Postgres => "(SELECT jsonb_array_elements_text(CAST($1 AS JSONB)))",
            Dialect::Sqlite => "(SELECT value FROM json_each($1))",
        }
    }

    fn id_column(self) -> &'static str {
        match self {
            Dialect::Postgres => "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            Dialect::Sqlite => "id INTEGER PRIMARY KEY AUTOINCREMENT",
        }
    }

    fn blob(self) -> &'static str {
        match self {
            Dialect::Postgres => "BYTEA",
            Dialect::Sqlite => "BLOB",
        }
    }

    /// The statement that opens a write transaction: SQLite takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two writers never deadlock upgrading a read lock.
    pub(crate) fn begin_write(self) -> &'static str {
        match self {
            Dialect::Postgres => "BEGIN",
            Dialect::Sqlite => "BEGIN IMMEDIATE",
        }
    }
}

/// Row states.
pub(crate) mod state {
    pub const PREPARED: &str = "PREPARED";
    pub const PENDING: &str = "PENDING";
    pub const SENT: &str = "SENT";
    pub const DEAD: &str = "DEAD";
    pub const COMPLETED: &str = "COMPLETED";
    pub const FAILED: &str = "FAILED";
}

/// The migrations shipped with the crate, in order: version, name, template.
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "outbox", include_str!("../migrations/0001_outbox.sql")),
    (2, "inbox", include_str!("../migrations/0002_inbox.sql")),
    (
        3,
        "dlq_audit",
        include_str!("../migrations/0003_dlq_audit.sql"),
    ),
];

const CREATE_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS {migrations} (
    version    BIGINT PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)";
const APPLIED_MIGRATIONS: &str = "SELECT version FROM {migrations} ORDER BY version";
const RECORD_MIGRATION: &str =
    "INSERT INTO {migrations} (version, name, applied_at) VALUES ($1, $2, {now})";

const COLUMNS: &str = "id, message_id, destination, msg_key, headers, payload, created_at_ms, \
    state, producer_group, attempts, checks, due_at, last_error, enqueued_at, updated_at";

const INSERT: &str = "INSERT INTO {outbox}
    (message_id, destination, msg_key, headers, payload, created_at_ms, state, producer_group,
     attempts, checks, due_at, enqueued_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, 0, {now} + $9, {now}, {now})
    RETURNING id";

/// Leases due rows: `$1` owner, `$2` lease ms, `$3` limit. Counts the attempt now, so an
/// attempt that crashes the relay still counts.
const CLAIM_DUE: &str = "WITH due AS (
        SELECT id FROM {outbox}
        WHERE state = 'PENDING' AND due_at <= {now}
          AND (lease_until IS NULL OR lease_until <= {now})
        ORDER BY due_at, id
        LIMIT $3
        {skip_locked}
    )
    UPDATE {outbox}
    SET lease_owner = $1, lease_until = {now} + $2, attempts = attempts + 1, updated_at = {now}
    WHERE id IN (SELECT id FROM due)
    RETURNING {columns}";

/// Leases pending rows by message id for the fast path: `$1` JSON array of message ids,
/// `$2` owner, `$3` lease ms.
const CLAIM_IDS: &str = "UPDATE {outbox}
    SET lease_owner = $2, lease_until = {now} + $3, attempts = attempts + 1, updated_at = {now}
    WHERE message_id IN {texts_in_p1} AND state = 'PENDING' AND due_at <= {now}
      AND (lease_until IS NULL OR lease_until <= {now})
    RETURNING {columns}";

/// `$1` JSON array of row ids, `$2` owner. Only the lease holder marks a row sent. One
/// statement per batch: a statement per row cost the relay a round trip per message.
const MARK_SENT: &str = "UPDATE {outbox}
    SET state = 'SENT', lease_owner = NULL, lease_until = NULL, last_error = NULL,
        updated_at = {now}
    WHERE id IN {ids_in_p1} AND lease_owner = $2 AND state = 'PENDING'";

/// `$1` JSON array of row ids, `$2` owner. Hands leased rows back unpublished: the lease
/// and the attempt it counted are undone.
const RELEASE: &str = "UPDATE {outbox}
    SET lease_owner = NULL, lease_until = NULL, attempts = attempts - 1, updated_at = {now}
    WHERE id IN {ids_in_p1} AND lease_owner = $2 AND state = 'PENDING'";

/// `$1` id, `$2` owner, `$3` new state (PENDING or DEAD), `$4` delay ms, `$5` error.
const MARK_FAILED: &str = "UPDATE {outbox}
    SET state = $3, due_at = {now} + $4, last_error = $5, lease_owner = NULL,
        lease_until = NULL, updated_at = {now}
    WHERE id = $1 AND lease_owner = $2 AND state = 'PENDING'";

const GET: &str = "SELECT {columns} FROM {outbox} WHERE message_id = $1";

/// `$1` state, `$2` after id, `$3` limit.
const LIST_STATE: &str =
    "SELECT {columns} FROM {outbox} WHERE state = $1 AND id > $2 ORDER BY id LIMIT $3";

const REDRIVE_ONE: &str = "UPDATE {outbox}
    SET state = 'PENDING', attempts = 0, due_at = {now}, lease_owner = NULL,
        lease_until = NULL, updated_at = {now}
    WHERE message_id = $1 AND state = 'DEAD'";

const REDRIVE_ALL: &str = "UPDATE {outbox}
    SET state = 'PENDING', attempts = 0, due_at = {now}, lease_owner = NULL,
        lease_until = NULL, updated_at = {now}
    WHERE state = 'DEAD'";

const COUNTS: &str = "SELECT state, COUNT(*) FROM {outbox} GROUP BY state";

/// Milliseconds the oldest due pending row has waited (NULL when none is due).
const LAG: &str =
    "SELECT {now} - MIN(due_at) FROM {outbox} WHERE state = 'PENDING' AND due_at <= {now}";

/// Prepared rows of `$1` due for a check-back, at most `$2`.
const CHECK_CANDIDATES: &str = "SELECT {columns} FROM {outbox}
    WHERE state = 'PREPARED' AND producer_group = $1 AND due_at <= {now}
    ORDER BY due_at, id
    LIMIT $2
    {skip_locked}";

/// Counts a check and pushes the next one `$2` ms out.
const CLAIM_CHECK: &str = "UPDATE {outbox}
    SET checks = checks + 1, due_at = {now} + $2, updated_at = {now}
    WHERE id = $1 AND state = 'PREPARED'
    RETURNING checks";

/// Commit of a prepared row: due now for the relay (or the fast path).
const COMMIT_PREPARED: &str = "UPDATE {outbox}
    SET state = 'PENDING', due_at = {now}, lease_owner = NULL, lease_until = NULL,
        updated_at = {now}
    WHERE id = $1 AND state = 'PREPARED'";

/// The producer's own commit, leased to its relay (`$2` owner, `$3` lease ms) in the same
/// statement, so the fast path publishes without a second round trip to lease the row.
const COMMIT_PREPARED_LEASED: &str = "UPDATE {outbox}
    SET state = 'PENDING', due_at = {now}, lease_owner = $2, lease_until = {now} + $3,
        attempts = attempts + 1, updated_at = {now}
    WHERE id = $1 AND state = 'PREPARED'
    RETURNING {columns}";

const ROLLBACK_PREPARED: &str = "DELETE FROM {outbox} WHERE id = $1 AND state = 'PREPARED'";

/// A prepared row whose check-backs ran out: `$2` error.
const DEAD_PREPARED: &str = "UPDATE {outbox}
    SET state = 'DEAD', last_error = $2, due_at = {now}, updated_at = {now}
    WHERE id = $1 AND state = 'PREPARED'";

/// Deletes up to `$2` sent rows untouched for `$1` ms.
const CLEANUP_OUTBOX: &str = "DELETE FROM {outbox} WHERE id IN (
        SELECT id FROM {outbox}
        WHERE state IN ('SENT', 'COMPLETED', 'FAILED') AND updated_at < {now} - $1
        LIMIT $2)";

/// A receipt: `$1` message id, `$2` new state (COMPLETED or FAILED), `$3` the business
/// reason of a failure. Only a row still waiting for its receipt changes (PENDING too: the
/// receipt can overtake the relay's mark-sent), so a repeated receipt changes nothing.
const APPLY_RECEIPT: &str = "UPDATE {outbox}
    SET state = $2, last_error = $3, lease_owner = NULL, lease_until = NULL, updated_at = {now}
    WHERE message_id = $1 AND state IN ('PENDING', 'SENT')
    RETURNING {columns}";

/// Sent rows whose receipt is overdue (`$1` ms) go back to PENDING, due now, at most `$2`.
const REDELIVER_OVERDUE: &str = "UPDATE {outbox}
    SET state = 'PENDING', due_at = {now}, last_error = 'no receipt within the receipt timeout',
        updated_at = {now}
    WHERE id IN (
        SELECT id FROM {outbox}
        WHERE state = 'SENT' AND updated_at < {now} - $1
        ORDER BY updated_at
        LIMIT $2
        {skip_locked})";

const INBOX_INSERT: &str = "INSERT INTO {inbox} (consumer_name, message_id, processed_at)
    VALUES ($1, $2, {now})
    ON CONFLICT (consumer_name, message_id) DO NOTHING";

/// Deletes up to `$2` inbox keys older than `$1` ms.
const CLEANUP_INBOX: &str = "DELETE FROM {inbox} WHERE (consumer_name, message_id) IN (
        SELECT consumer_name, message_id FROM {inbox}
        WHERE processed_at < {now} - $1
        LIMIT $2)";

const AUDIT_INSERT: &str = "INSERT INTO {audit}
    (actor, adapter, message_id, from_destination, to_destination, consumer_group, redriven_at)
    VALUES ($1, $2, $3, $4, $5, $6, {now})
    RETURNING id, redriven_at";

/// `$1` after id, `$2` limit.
const AUDIT_LIST: &str = "SELECT id, actor, adapter, message_id, from_destination, to_destination,
        consumer_group, redriven_at
    FROM {audit} WHERE id > $1 ORDER BY id LIMIT $2";

/// PostgreSQL: serialises concurrent migrators (`$1` the migrations table's name).
pub(crate) const PG_MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext($1))";

/// The rendered statements of one store.
#[derive(Clone, Debug)]
pub(crate) struct Sql {
    pub dialect: Dialect,
    pub create_migrations: SqlStr,
    pub applied_migrations: SqlStr,
    pub record_migration: SqlStr,
    /// The migrations, rendered: version, name, script.
    pub migrations: Arc<[(i64, &'static str, SqlStr)]>,
    pub insert: SqlStr,
    pub claim_due: SqlStr,
    pub claim_ids: SqlStr,
    pub mark_sent: SqlStr,
    pub release: SqlStr,
    pub mark_failed: SqlStr,
    pub get: SqlStr,
    pub list_state: SqlStr,
    pub redrive_one: SqlStr,
    pub redrive_all: SqlStr,
    pub counts: SqlStr,
    pub lag: SqlStr,
    pub check_candidates: SqlStr,
    pub claim_check: SqlStr,
    pub commit_prepared: SqlStr,
    pub commit_prepared_leased: SqlStr,
    pub rollback_prepared: SqlStr,
    pub dead_prepared: SqlStr,
    pub cleanup_outbox: SqlStr,
    pub apply_receipt: SqlStr,
    pub redeliver_overdue: SqlStr,
    pub inbox_insert: SqlStr,
    pub cleanup_inbox: SqlStr,
    pub audit_insert: SqlStr,
    pub audit_list: SqlStr,
}

impl Sql {
    /// Renders every template for `dialect`. `tables` must have been validated.
    pub(crate) fn render(dialect: Dialect, tables: &TableNames) -> Sql {
        let fill = |template: &str| -> SqlStr {
            // Only validated identifiers and the fixed fragments above are substituted.
            let text = template
                .replace("{columns}", COLUMNS)
                .replace("{outbox}", &tables.outbox)
                .replace("{inbox}", &tables.inbox)
                .replace("{migrations}", &tables.migrations)
                .replace("{audit}", &tables.audit)
                .replace("{now}", dialect.now())
                .replace("{skip_locked}", dialect.skip_locked())
                .replace("{ids_in_p1}", dialect.ids_in_p1())
                .replace("{texts_in_p1}", dialect.texts_in_p1())
                .replace("{id_column}", dialect.id_column())
                .replace("{blob}", dialect.blob());
            AssertSqlSafe(Arc::<str>::from(text)).into_sql_str()
        };
        Sql {
            dialect,
            create_migrations: fill(CREATE_MIGRATIONS),
            applied_migrations: fill(APPLIED_MIGRATIONS),
            record_migration: fill(RECORD_MIGRATION),
            migrations: MIGRATIONS
                .iter()
                .map(|(v, name, t)| (*v, *name, fill(t)))
                .collect(),
            insert: fill(INSERT),
            claim_due: fill(CLAIM_DUE),
            claim_ids: fill(CLAIM_IDS),
            mark_sent: fill(MARK_SENT),
            release: fill(RELEASE),
            mark_failed: fill(MARK_FAILED),
            get: fill(GET),
            list_state: fill(LIST_STATE),
            redrive_one: fill(REDRIVE_ONE),
            redrive_all: fill(REDRIVE_ALL),
            counts: fill(COUNTS),
            lag: fill(LAG),
            check_candidates: fill(CHECK_CANDIDATES),
            claim_check: fill(CLAIM_CHECK),
            commit_prepared: fill(COMMIT_PREPARED),
            commit_prepared_leased: fill(COMMIT_PREPARED_LEASED),
            rollback_prepared: fill(ROLLBACK_PREPARED),
            dead_prepared: fill(DEAD_PREPARED),
            cleanup_outbox: fill(CLEANUP_OUTBOX),
            apply_receipt: fill(APPLY_RECEIPT),
            redeliver_overdue: fill(REDELIVER_OVERDUE),
            inbox_insert: fill(INBOX_INSERT),
            cleanup_inbox: fill(CLEANUP_INBOX),
            audit_insert: fill(AUDIT_INSERT),
            audit_list: fill(AUDIT_LIST),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_leaves_no_placeholder() {
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            let sql = Sql::render(dialect, &TableNames::prefixed("app"));
            for s in [
                &sql.claim_due,
                &sql.claim_ids,
                &sql.mark_sent,
                &sql.release,
                &sql.insert,
                &sql.cleanup_inbox,
                &sql.check_candidates,
                &sql.commit_prepared_leased,
                &sql.audit_insert,
                &sql.audit_list,
            ] {
                assert!(!s.as_str().contains('{'), "{}", s.as_str());
            }
            for (_, _, m) in sql.migrations.iter() {
                assert!(!m.as_str().contains('{'), "{}", m.as_str());
                assert!(m.as_str().contains("app_"));
            }
        }
        let pg = Sql::render(Dialect::Postgres, &TableNames::default());
        assert!(pg.claim_due.as_str().contains("FOR UPDATE SKIP LOCKED"));
        let lite = Sql::render(Dialect::Sqlite, &TableNames::default());
        assert!(!lite.claim_due.as_str().contains("FOR UPDATE"));
    }
}
