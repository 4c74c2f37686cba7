//! The store: a pool on one database, the statements rendered for its tables (`sql/`),
//! the migrations, and retention. What happens to rows lives beside the mechanism it
//! serves (`outbox.rs`, `lease.rs`, `transitions.rs`, `prepared.rs`, `checker.rs`,
//! `receipts.rs`, `inbox.rs`, `audit.rs`).

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Pool, SqlStr, Transaction};
use surety_core::Result;

use crate::backend::{Arg, Backend, On};
use crate::config::StoreConfig;
use crate::dialect::Dialect;
use crate::entry::{Columns, count, millis};
use crate::error::storage;
use crate::sql::Sql;

/// A store on PostgreSQL (feature `postgres`).
#[cfg(feature = "postgres")]
pub type PgStore = SqlStore<sqlx::Postgres>;

/// A store on SQLite (feature `sqlite`).
#[cfg(feature = "sqlite")]
pub type SqliteStore = SqlStore<sqlx::Sqlite>;

/// What a cleanup pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanupStats {
    /// Outbox rows past their retention.
    pub outbox_rows: u64,
    /// Inbox keys past their retention.
    pub inbox_keys: u64,
}

/// The local message table on one database (`DB` is `sqlx::Postgres` or `sqlx::Sqlite`,
/// see [`PgStore`] and [`SqliteStore`]): outbox, prepared messages, inbox, receipts and
/// the re-drive audit. Cheap to clone: clones share one pool.
///
/// ```no_run
/// # async fn run() -> surety_core::Result<()> {
/// use surety_sql::{SqliteStore, StoreConfig};
/// let store = SqliteStore::connect("sqlite://orders.db", StoreConfig::default()).await?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
pub struct SqlStore<DB: Backend> {
    pub(crate) inner: Arc<StoreInner<DB>>,
}

pub(crate) struct StoreInner<DB: Backend> {
    pub(crate) pool: Pool<DB>,
    pub(crate) sql: Sql,
    pub(crate) config: StoreConfig,
}

impl<DB: Backend> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        SqlStore {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for SqlStore<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("dialect", &DB::DIALECT)
            .field("tables", &self.inner.config.tables)
            .finish()
    }
}

impl<DB: Backend> SqlStore<DB> {
    /// Opens a pool from a URL of this database: `postgres://` or `postgresql://` for
    /// PostgreSQL; `sqlite:` for SQLite (the file is created if missing, in WAL mode with
    /// the configured busy timeout). A URL of another database is a `Configuration`
    /// error.
    pub async fn connect(url: &str, config: StoreConfig) -> Result<Self> {
        config.tables.validate()?;
        let pool = DB::open(url, &config).await?;
        SqlStore::new(pool, config)
    }

    /// A store on an existing pool (the application's own). On SQLite give its
    /// connections a busy timeout (`SqliteConnectOptions::busy_timeout`): writers wait
    /// for one another.
    pub fn new(pool: Pool<DB>, config: StoreConfig) -> Result<Self> {
        config.tables.validate()?;
        let sql = Sql::render(DB::DIALECT, &config.tables);
        Ok(SqlStore {
            inner: Arc::new(StoreInner { pool, sql, config }),
        })
    }

    /// Which database this is.
    pub fn dialect(&self) -> Dialect {
        DB::DIALECT
    }

    /// The settings.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The pool, to begin the application's own transactions on.
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    pub(crate) fn sql(&self) -> &Sql {
        &self.inner.sql
    }

    /// Closes the pool: later operations fail with an `Unavailable` error.
    pub async fn close(&self) {
        self.inner.pool.close().await
    }

    /// Opens a write transaction on the store's pool (on SQLite it takes the write lock
    /// at once).
    pub(crate) async fn begin(&self, operation: &'static str) -> Result<Transaction<'static, DB>> {
        self.inner
            .pool
            .begin_with(DB::DIALECT.begin_write())
            .await
            .map_err(|e| storage(operation, e))
    }

    /// Applies the migrations shipped with the crate that this database lacks. Safe to
    /// call from every process at start: on PostgreSQL concurrent callers wait on an
    /// advisory lock, on SQLite on the write lock.
    pub async fn migrate(&self) -> Result<()> {
        let sql = &self.inner.sql.store;
        let migrations = &self.inner.config.tables.migrations;
        let e = |e| storage("migrate", e);
        let mut tx = self.begin("migrate").await?;
        if let Some(lock) = &sql.migration_lock {
            DB::execute(On::Conn(&mut *tx), lock, &[Arg::Text(migrations)])
                .await
                .map_err(e)?;
        }
        DB::script(On::Conn(&mut *tx), &sql.create_migrations)
            .await
            .map_err(e)?;
        let rows = DB::fetch(On::Conn(&mut *tx), &sql.applied_migrations, &[])
            .await
            .map_err(e)?;
        let applied = rows
            .iter()
            .map(|row| Columns::<DB>::of(row, "read applied migrations").int(0))
            .collect::<Result<Vec<i64>>>()?;
        for (version, name, script) in sql.migrations.iter() {
            if applied.contains(version) {
                continue;
            }
            DB::script(On::Conn(&mut *tx), script).await.map_err(e)?;
            let record = [Arg::Int(*version), Arg::Text(name)];
            DB::execute(On::Conn(&mut *tx), &sql.record_migration, &record)
                .await
                .map_err(e)?;
            tracing::info!(
                version,
                name,
                dialect = DB::DIALECT.as_str(),
                "applied migration"
            );
        }
        tx.commit().await.map_err(e)
    }

    /// The audit of dead-letter re-drives.
    pub fn dlq_audit(&self) -> crate::DlqAudit<DB> {
        crate::DlqAudit::new(self.clone())
    }

    /// The outbox: enqueue in the application's transaction, inspect, re-drive.
    pub fn outbox(&self) -> crate::Outbox<DB> {
        crate::Outbox::new(self.clone())
    }

    /// Prepared (half) messages: prepare, commit, roll back.
    pub fn prepared(&self) -> crate::PreparedMessages<DB> {
        crate::PreparedMessages::new(self.clone())
    }

    /// The idempotent inbox.
    pub fn inbox(&self) -> crate::Inbox<DB> {
        crate::Inbox::new(self.clone())
    }

    /// Receipts from consumers: completion and business failure (see [`crate::Receipts`]).
    pub fn receipts(&self) -> crate::Receipts<DB> {
        crate::Receipts::new(self.clone())
    }

    /// Deletes, in batches, finished outbox rows (`SENT`, `COMPLETED`, `FAILED`) older
    /// than [`StoreConfig::sent_retention`] and inbox keys older than
    /// [`StoreConfig::inbox_retention`].
    pub async fn cleanup(&self) -> Result<CleanupStats> {
        let config = &self.inner.config;
        let sql = &self.inner.sql.store;
        let outbox_rows = self
            .delete_in_batches(
                &sql.cleanup_outbox,
                config.sent_retention,
                "clean up the outbox",
            )
            .await?;
        let inbox_keys = self
            .delete_in_batches(
                &sql.cleanup_inbox,
                config.inbox_retention,
                "clean up the inbox",
            )
            .await?;
        Ok(CleanupStats {
            outbox_rows,
            inbox_keys,
        })
    }

    /// Runs a `(retention, batch)` delete until a batch comes back short, so no single
    /// statement holds locks on a large table for long. Returns the rows deleted.
    async fn delete_in_batches(
        &self,
        statement: &SqlStr,
        retention: Duration,
        operation: &'static str,
    ) -> Result<u64> {
        let batch = count(self.inner.config.cleanup_batch.max(1));
        let args = [Arg::Int(millis(retention)), Arg::Int(batch)];
        let mut total = 0;
        loop {
            let n = DB::execute(On::Pool(&self.inner.pool), statement, &args)
                .await
                .map_err(|e| storage(operation, e))?;
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }
}
