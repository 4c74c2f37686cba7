//! The store's own statements (`store.rs`): the migrations and their bookkeeping, and
//! retention's deletes.

use std::sync::Arc;

use sqlx::SqlStr;

use super::Render;
use crate::dialect::Dialect;

/// The migrations shipped with the crate, in order: version, name, template.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "outbox",
        include_str!("../../migrations/0001_outbox.sql"),
    ),
    (2, "inbox", include_str!("../../migrations/0002_inbox.sql")),
    (
        3,
        "dlq_audit",
        include_str!("../../migrations/0003_dlq_audit.sql"),
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

/// PostgreSQL: serialises concurrent migrators (`$1` the migrations table's name).
const PG_MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext($1))";

/// Deletes up to `$2` finished rows untouched for `$1` ms.
const CLEANUP_OUTBOX: &str = "DELETE FROM {outbox} WHERE id IN (
        SELECT id FROM {outbox}
        WHERE state IN ('SENT', 'COMPLETED', 'FAILED') AND updated_at < {now} - $1
        LIMIT $2)";

/// Deletes up to `$2` inbox keys older than `$1` ms.
const CLEANUP_INBOX: &str = "DELETE FROM {inbox} WHERE (consumer_name, message_id) IN (
        SELECT consumer_name, message_id FROM {inbox}
        WHERE processed_at < {now} - $1
        LIMIT $2)";

/// The store's own statements.
#[derive(Clone, Debug)]
pub(crate) struct Statements {
    pub(crate) create_migrations: SqlStr,
    pub(crate) applied_migrations: SqlStr,
    pub(crate) record_migration: SqlStr,
    /// The migrations, rendered: version, name, script.
    pub(crate) migrations: Arc<[(i64, &'static str, SqlStr)]>,
    pub(crate) migration_lock: Option<SqlStr>,
    pub(crate) cleanup_outbox: SqlStr,
    pub(crate) cleanup_inbox: SqlStr,
}

impl Statements {
    pub(crate) fn render(r: &Render<'_>) -> Self {
        Statements {
            create_migrations: r.sql(CREATE_MIGRATIONS),
            applied_migrations: r.sql(APPLIED_MIGRATIONS),
            record_migration: r.sql(RECORD_MIGRATION),
            migrations: MIGRATIONS
                .iter()
                .map(|(v, name, t)| (*v, *name, r.sql(t)))
                .collect(),
            migration_lock: (r.dialect() == Dialect::Postgres).then(|| r.sql(PG_MIGRATION_LOCK)),
            cleanup_outbox: r.sql(CLEANUP_OUTBOX),
            cleanup_inbox: r.sql(CLEANUP_INBOX),
        }
    }
}
