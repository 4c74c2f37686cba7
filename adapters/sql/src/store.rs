//! The store: a pool on PostgreSQL or SQLite, its rendered SQL, and every operation on
//! the tables. The same code runs on both databases: [`with_pool!`] expands a body once
//! per pool type, so each expansion is checked against its own driver.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{PgConnection, Row, SqlStr, SqliteConnection};
use surety_core::{Error, ErrorKind, Message, MessageId, Result, telemetry};

use crate::config::StoreConfig;
use crate::error::{ADAPTER, corrupt, is_unique_violation, storage};
use crate::sql::{Dialect, PG_MIGRATION_LOCK, Sql, state};

/// The pool behind a store.
#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$p` bound to the store's pool, whichever database it is.
macro_rules! with_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            $crate::store::Pool::Postgres($p) => $body,
            $crate::store::Pool::Sqlite($p) => $body,
        }
    };
}
pub(crate) use with_pool;

/// Where an outbox row is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EntryState {
    /// A half message: stored, invisible, waiting for its local transaction or check-back.
    Prepared,
    /// Committed and waiting to be published (or being published under a lease).
    Pending,
    /// Published with confirm.
    Sent,
    /// Attempts (or check-backs) ran out: listed for an operator, re-drivable.
    Dead,
    /// The consumer's receipt said it was processed (receipts only).
    Completed,
    /// The consumer's receipt reported a business failure and the producer compensated
    /// (receipts only); `last_error` holds the reason.
    Failed,
}

impl EntryState {
    /// The name stored in the `state` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            EntryState::Prepared => state::PREPARED,
            EntryState::Pending => state::PENDING,
            EntryState::Sent => state::SENT,
            EntryState::Dead => state::DEAD,
            EntryState::Completed => state::COMPLETED,
            EntryState::Failed => state::FAILED,
        }
    }

    /// Every state, for reports.
    pub const ALL: [EntryState; 6] = [
        EntryState::Prepared,
        EntryState::Pending,
        EntryState::Sent,
        EntryState::Dead,
        EntryState::Completed,
        EntryState::Failed,
    ];

    fn parse(text: &str) -> Result<Self> {
        EntryState::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| corrupt(format!("unknown outbox state {text:?}")))
    }
}

/// One outbox row, as stored.
#[derive(Clone, Debug)]
pub struct OutboxEntry {
    pub(crate) id: i64,
    /// The message, exactly as enqueued.
    pub message: Message,
    /// Its state.
    pub state: EntryState,
    /// The producer group of a half message.
    pub producer_group: Option<String>,
    /// Publish attempts so far (an attempt counts when a relay leases the row).
    pub attempts: u32,
    /// Check-backs asked so far (half messages).
    pub checks: u32,
    /// The last publish error, or why the row is dead.
    pub last_error: Option<String>,
    /// When the row is next looked at (next attempt, next check-back).
    pub due_at: SystemTime,
    /// When it was written.
    pub enqueued_at: SystemTime,
    /// When it last changed.
    pub updated_at: SystemTime,
}

impl OutboxEntry {
    /// The row's position in the table (its primary key), for paging with
    /// [`crate::Outbox::list`]. Positions grow with insertion but commit order may differ.
    pub fn position(&self) -> i64 {
        self.id
    }
}

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Decodes a row selected with the `{columns}` list, on either database.
fn decode_entry<R>(row: &R) -> Result<OutboxEntry>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let d = |e: sqlx::Error| storage("decode outbox row", e);
    let id: i64 = row.try_get(0).map_err(d)?;
    let message_id: String = row.try_get(1).map_err(d)?;
    let destination: String = row.try_get(2).map_err(d)?;
    let key: Option<String> = row.try_get(3).map_err(d)?;
    let headers: String = row.try_get(4).map_err(d)?;
    let payload: Vec<u8> = row.try_get(5).map_err(d)?;
    let created_at_ms: i64 = row.try_get(6).map_err(d)?;
    let state: String = row.try_get(7).map_err(d)?;
    let producer_group: Option<String> = row.try_get(8).map_err(d)?;
    let attempts: i64 = row.try_get(9).map_err(d)?;
    let checks: i64 = row.try_get(10).map_err(d)?;
    let due_at: i64 = row.try_get(11).map_err(d)?;
    let last_error: Option<String> = row.try_get(12).map_err(d)?;
    let enqueued_at: i64 = row.try_get(13).map_err(d)?;
    let updated_at: i64 = row.try_get(14).map_err(d)?;
    let id_text = message_id.clone();
    let message_id = MessageId::parse(message_id)
        .map_err(|e| corrupt(format!("outbox row {id} has a bad message id")).with_source(e))?;
    let headers: BTreeMap<String, String> = serde_json::from_str(&headers).map_err(|e| {
        corrupt(format!(
            "outbox row {id} has headers that are not a JSON object"
        ))
        .with_context("message_id", id_text)
        .with_source(e)
    })?;
    let mut message = Message::new(destination, payload)
        .with_id(message_id)
        .with_created_at(at(created_at_ms));
    if let Some(key) = key {
        message = message.with_key(key);
    }
    *message.headers_mut() = headers;
    Ok(OutboxEntry {
        id,
        message,
        state: EntryState::parse(&state)?,
        producer_group,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        checks: u32::try_from(checks).unwrap_or(u32::MAX),
        last_error,
        due_at: at(due_at),
        enqueued_at: at(enqueued_at),
        updated_at: at(updated_at),
    })
}

fn decode_all<R>(rows: Vec<R>) -> Result<Vec<OutboxEntry>>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut entries = rows
        .iter()
        .map(decode_entry)
        .collect::<Result<Vec<OutboxEntry>>>()?;
    // `UPDATE ... RETURNING` gives rows in no promised order; a batch is published in
    // enqueue order.
    entries.sort_by_key(|e| e.id);
    Ok(entries)
}

/// A JSON array of `items`, bound as one parameter by the batch statements.
fn json_list<T: Into<serde_json::Value>>(items: impl IntoIterator<Item = T>) -> String {
    serde_json::Value::Array(items.into_iter().map(Into::into).collect()).to_string()
}

/// What a cleanup pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanupStats {
    /// Outbox rows past their retention.
    pub outbox_rows: u64,
    /// Inbox keys past their retention.
    pub inbox_keys: u64,
}

/// The local message table on PostgreSQL or SQLite: outbox, prepared messages and
/// inbox. Cheap to clone: clones share one pool.
///
/// ```no_run
/// # async fn run() -> surety_core::Result<()> {
/// use surety_sql::{SqlStore, StoreConfig};
/// let store = SqlStore::connect("sqlite://orders.db", StoreConfig::default()).await?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqlStore {
    pub(crate) inner: Arc<StoreInner>,
}

pub(crate) struct StoreInner {
    pub(crate) pool: Pool,
    pub(crate) sql: Sql,
    pub(crate) config: StoreConfig,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("dialect", &self.inner.sql.dialect)
            .field("tables", &self.inner.config.tables)
            .finish()
    }
}

impl SqlStore {
    /// Opens a pool from a URL: `postgres://` or `postgresql://` for PostgreSQL,
    /// `sqlite:` for SQLite (the file is created if missing, in WAL mode with the
    /// configured busy timeout).
    pub async fn connect(url: &str, config: StoreConfig) -> Result<SqlStore> {
        config.tables.validate()?;
        let bad_url = |what: &str| {
            // The URL may hold a password: never echo it.
            Error::new(
                ErrorKind::Configuration,
                format!("the {what} URL does not parse"),
            )
            .with_context("adapter", ADAPTER)
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url).map_err(|_| bad_url("PostgreSQL"))?;
            let pool = PgPoolOptions::new()
                .max_connections(config.max_connections.max(1))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(|e| storage("connect to PostgreSQL", e))?;
            SqlStore::postgres(pool, config)
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|_| bad_url("SQLite"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(config.busy_timeout);
            let pool = SqlitePoolOptions::new()
                .max_connections(config.max_connections.max(1))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(|e| storage("open SQLite", e))?;
            SqlStore::sqlite(pool, config)
        } else {
            Err(Error::new(
                ErrorKind::Configuration,
                "expected a postgres://, postgresql:// or sqlite: URL",
            )
            .with_context("adapter", ADAPTER))
        }
    }

    /// A store on an existing PostgreSQL pool (the application's own).
    pub fn postgres(pool: PgPool, config: StoreConfig) -> Result<SqlStore> {
        SqlStore::new(Pool::Postgres(pool), Dialect::Postgres, config)
    }

    /// A store on an existing SQLite pool (the application's own). Give its connections a
    /// busy timeout (`SqliteConnectOptions::busy_timeout`): writers wait for one another.
    pub fn sqlite(pool: SqlitePool, config: StoreConfig) -> Result<SqlStore> {
        SqlStore::new(Pool::Sqlite(pool), Dialect::Sqlite, config)
    }

    fn new(pool: Pool, dialect: Dialect, config: StoreConfig) -> Result<SqlStore> {
        config.tables.validate()?;
        let sql = Sql::render(dialect, &config.tables);
        Ok(SqlStore {
            inner: Arc::new(StoreInner { pool, sql, config }),
        })
    }

    /// Which database this is.
    pub fn dialect(&self) -> Dialect {
        self.inner.sql.dialect
    }

    /// The settings.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The PostgreSQL pool, to begin the application's own transactions on.
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match &self.inner.pool {
            Pool::Postgres(p) => Some(p),
            Pool::Sqlite(_) => None,
        }
    }

    /// The SQLite pool, to begin the application's own transactions on.
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.inner.pool {
            Pool::Sqlite(p) => Some(p),
            Pool::Postgres(_) => None,
        }
    }

    /// Closes the pool: later operations fail with a `Storage` error.
    pub async fn close(&self) {
        with_pool!(&self.inner.pool, p => p.close().await)
    }

    /// Applies the migrations shipped with the crate that this database lacks. Safe to
    /// call from every process at start: on PostgreSQL concurrent callers wait on an
    /// advisory lock, on SQLite on the write lock.
    pub async fn migrate(&self) -> Result<()> {
        let sql = &self.inner.sql;
        let migrations = &self.inner.config.tables.migrations;
        let e = |e| storage("migrate", e);
        with_pool!(&self.inner.pool, p => {
            let mut tx = p.begin_with(sql.dialect.begin_write()).await.map_err(e)?;
            if sql.dialect == Dialect::Postgres {
                sqlx::query(PG_MIGRATION_LOCK)
                    .bind(migrations)
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?;
            }
            sqlx::raw_sql(sql.create_migrations.clone()).execute(&mut *tx).await.map_err(e)?;
            let applied: Vec<i64> = sqlx::query_scalar(sql.applied_migrations.clone())
                .fetch_all(&mut *tx)
                .await
                .map_err(e)?;
            for (version, name, script) in sql.migrations.iter() {
                if applied.contains(version) {
                    continue;
                }
                sqlx::raw_sql(script.clone()).execute(&mut *tx).await.map_err(e)?;
                sqlx::query(sql.record_migration.clone())
                    .bind(*version)
                    .bind(*name)
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?;
                tracing::info!(version, name, dialect = sql.dialect.as_str(), "applied migration");
            }
            tx.commit().await.map_err(e)?;
        });
        Ok(())
    }

    /// The audit of dead-letter re-drives.
    pub fn dlq_audit(&self) -> crate::DlqAudit {
        crate::DlqAudit::new(self.clone())
    }

    /// The outbox: enqueue in the application's transaction, inspect, re-drive.
    pub fn outbox(&self) -> crate::Outbox {
        crate::Outbox::new(self.clone())
    }

    /// Prepared (half) messages: prepare, commit, roll back.
    pub fn prepared(&self) -> crate::PreparedMessages {
        crate::PreparedMessages::new(self.clone())
    }

    /// The idempotent inbox.
    pub fn inbox(&self) -> crate::Inbox {
        crate::Inbox::new(self.clone())
    }

    /// Receipts from consumers: completion and business failure (see [`crate::Receipts`]).
    pub fn receipts(&self) -> crate::Receipts {
        crate::Receipts::new(self.clone())
    }

    /// Deletes, in batches, sent outbox rows older than [`StoreConfig::sent_retention`]
    /// and inbox keys older than [`StoreConfig::inbox_retention`].
    pub async fn cleanup(&self) -> Result<CleanupStats> {
        let config = &self.inner.config;
        let sql = &self.inner.sql;
        let batch = i64::try_from(config.cleanup_batch.max(1)).unwrap_or(i64::MAX);
        let outbox_rows = self
            .delete_in_batches(
                &sql.cleanup_outbox,
                config.sent_retention,
                batch,
                "clean up the outbox",
            )
            .await?;
        let inbox_keys = self
            .delete_in_batches(
                &sql.cleanup_inbox,
                config.inbox_retention,
                batch,
                "clean up the inbox",
            )
            .await?;
        let stats = CleanupStats {
            outbox_rows,
            inbox_keys,
        };
        Ok(stats)
    }

    /// Runs a `(retention, batch)` delete until a batch comes back short, so no single
    /// statement holds locks on a large table for long. Returns the rows deleted.
    async fn delete_in_batches(
        &self,
        statement: &SqlStr,
        retention: Duration,
        batch: i64,
        operation: &'static str,
    ) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = with_pool!(&self.inner.pool, p => sqlx::query(statement.clone())
                .bind(millis(retention))
                .bind(batch)
                .execute(p)
                .await
                .map(|r| r.rows_affected()))
            .map_err(|e| storage(operation, e))?;
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }

    /// Sent rows whose receipt is older than `timeout` go back to PENDING (due now), at most
    /// `limit`. Returns how many.
    pub(crate) async fn redeliver_overdue(&self, timeout: Duration, limit: usize) -> Result<u64> {
        let sql = &self.inner.sql;
        with_pool!(&self.inner.pool, p => sqlx::query(sql.redeliver_overdue.clone())
            .bind(millis(timeout))
            .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
            .execute(p)
            .await
            .map(|r| r.rows_affected()))
        .map_err(|e| storage("re-deliver rows without a receipt", e))
    }

    /// Records a receipt on the store's own pool. Returns the row when it changed.
    pub(crate) async fn apply_receipt(
        &self,
        message_id: &MessageId,
        state: EntryState,
        reason: Option<&str>,
    ) -> Result<Option<OutboxEntry>> {
        let sql = &self.inner.sql;
        with_pool!(&self.inner.pool, p => {
            let rows = sqlx::query(sql.apply_receipt.clone())
                .bind(message_id.as_str())
                .bind(state.as_str())
                .bind(reason)
                .fetch_all(p)
                .await
                .map_err(|e| storage("record a receipt", e))?;
            Ok(decode_all(rows)?.pop())
        })
    }

    /// Rows per state (states without rows are absent). Also sets the
    /// [`telemetry::OUTBOX_DEPTH`] gauge.
    pub async fn counts(&self) -> Result<HashMap<EntryState, u64>> {
        let sql = &self.inner.sql;
        let rows: Vec<(String, i64)> = with_pool!(&self.inner.pool, p => {
            sqlx::query_as(sql.counts.clone()).fetch_all(p).await
        })
        .map_err(|e| storage("count outbox rows", e))?;
        let mut counts = HashMap::new();
        for (s, n) in rows {
            counts.insert(EntryState::parse(&s)?, n.max(0) as u64);
        }
        for s in EntryState::ALL {
            let n = counts.get(&s).copied().unwrap_or(0);
            metrics::gauge!(telemetry::OUTBOX_DEPTH, "adapter" => ADAPTER, "state" => s.as_str())
                .set(n as f64);
        }
        Ok(counts)
    }

    /// How long the oldest due pending row has waited (zero when none is due). Also sets
    /// the [`telemetry::RELAY_LAG_SECONDS`] gauge.
    pub async fn lag(&self) -> Result<Duration> {
        let sql = &self.inner.sql;
        let lag: Option<i64> = with_pool!(&self.inner.pool, p => {
            sqlx::query_scalar(sql.lag.clone()).fetch_one(p).await
        })
        .map_err(|e| storage("measure relay lag", e))?;
        let lag = Duration::from_millis(lag.unwrap_or(0).max(0) as u64);
        metrics::gauge!(telemetry::RELAY_LAG_SECONDS, "adapter" => ADAPTER).set(lag.as_secs_f64());
        Ok(lag)
    }

    // -----------------------------------------------------------------------------------
    // Operations used by the outbox, relay and prepared store.

    /// Inserts a row on the store's own pool (half messages).
    pub(crate) async fn insert_prepared(
        &self,
        message: &Message,
        group: &str,
        check_after: Duration,
    ) -> Result<i64> {
        with_pool!(&self.inner.pool, p => {
            let mut conn = p.acquire().await.map_err(|e| storage("prepare a message", e))?;
            insert_row(&mut *conn, self, message, state::PREPARED, Some(group), millis(check_after)).await
        })
    }

    pub(crate) async fn claim_due(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        let sql = &self.inner.sql;
        with_pool!(&self.inner.pool, p => {
            let rows = sqlx::query(sql.claim_due.clone())
                .bind(owner)
                .bind(millis(lease))
                .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
                .fetch_all(p)
                .await
                .map_err(|e| storage("lease due outbox rows", e))?;
            decode_all(rows)
        })
    }

    pub(crate) async fn claim_ids(
        &self,
        owner: &str,
        lease: Duration,
        ids: &[MessageId],
    ) -> Result<Vec<OutboxEntry>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = &self.inner.sql;
        let ids = json_list(ids.iter().map(|id| id.as_str()));
        with_pool!(&self.inner.pool, p => {
            let rows = sqlx::query(sql.claim_ids.clone())
                .bind(&ids)
                .bind(owner)
                .bind(millis(lease))
                .fetch_all(p)
                .await
                .map_err(|e| storage("lease outbox rows", e))?;
            decode_all(rows)
        })
    }

    /// Hands rows this owner leased but did not publish back to every relay. Returns how
    /// many it still held.
    pub(crate) async fn release(&self, owner: &str, ids: &[i64]) -> Result<u64> {
        let sql = self.inner.sql.release.clone();
        self.update_leased(sql, "hand back leased outbox rows", owner, ids)
            .await
    }

    /// Marks confirmed rows sent, only where this owner still holds the lease. Returns
    /// how many were marked.
    pub(crate) async fn mark_sent(&self, owner: &str, ids: &[i64]) -> Result<u64> {
        let sql = self.inner.sql.mark_sent.clone();
        self.update_leased(sql, "mark outbox rows sent", owner, ids)
            .await
    }

    /// Runs a statement over rows by id (`$1`, a JSON list) that `owner` (`$2`) leases.
    async fn update_leased(
        &self,
        sql: SqlStr,
        what: &'static str,
        owner: &str,
        ids: &[i64],
    ) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let ids = json_list(ids.iter().copied());
        with_pool!(&self.inner.pool, p => {
            let done = sqlx::query(sql.clone())
                .bind(&ids)
                .bind(owner)
                .execute(p)
                .await
                .map_err(|e| storage(what, e))?;
            Ok(done.rows_affected())
        })
    }

    /// Records failed attempts: `(id, next state, delay, error)`, only where this owner
    /// holds the lease.
    pub(crate) async fn mark_failed(
        &self,
        owner: &str,
        failures: &[(i64, EntryState, Duration, String)],
    ) -> Result<u64> {
        if failures.is_empty() {
            return Ok(0);
        }
        let sql = &self.inner.sql;
        let e = |e| storage("record failed outbox attempts", e);
        with_pool!(&self.inner.pool, p => {
            let mut tx = p.begin_with(sql.dialect.begin_write()).await.map_err(e)?;
            let mut marked = 0;
            for (id, next, delay, error) in failures {
                marked += sqlx::query(sql.mark_failed.clone())
                    .bind(*id)
                    .bind(owner)
                    .bind(next.as_str())
                    .bind(millis(*delay))
                    .bind(error.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?
                    .rows_affected();
            }
            tx.commit().await.map_err(e)?;
            Ok(marked)
        })
    }

    pub(crate) async fn get(&self, id: &MessageId) -> Result<Option<OutboxEntry>> {
        let sql = &self.inner.sql;
        with_pool!(&self.inner.pool, p => {
            let row = sqlx::query(sql.get.clone())
                .bind(id.as_str())
                .fetch_optional(p)
                .await
                .map_err(|e| storage("read an outbox row", e))?;
            row.as_ref().map(decode_entry).transpose()
        })
    }

    pub(crate) async fn list(
        &self,
        state: EntryState,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        let sql = &self.inner.sql;
        with_pool!(&self.inner.pool, p => {
            let rows = sqlx::query(sql.list_state.clone())
                .bind(state.as_str())
                .bind(after)
                .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
                .fetch_all(p)
                .await
                .map_err(|e| storage("list outbox rows", e))?;
            decode_all(rows)
        })
    }

    pub(crate) async fn redrive(&self, id: Option<&MessageId>) -> Result<u64> {
        let sql = &self.inner.sql;
        with_pool!(&self.inner.pool, p => match id {
            Some(id) => sqlx::query(sql.redrive_one.clone()).bind(id.as_str()).execute(p).await.map(|r| r.rows_affected()),
            None => sqlx::query(sql.redrive_all.clone()).execute(p).await.map(|r| r.rows_affected()),
        })
        .map_err(|e| storage("re-drive dead outbox rows", e))
    }

    /// Leases up to `limit` prepared rows of `group` due for a check-back, skipping
    /// `skip` (local transactions still running in this process): each gets one more
    /// check counted and its next check pushed `interval` out.
    pub(crate) async fn claim_checks(
        &self,
        group: &str,
        interval: Duration,
        limit: usize,
        skip: &std::collections::HashSet<i64>,
    ) -> Result<Vec<OutboxEntry>> {
        let sql = &self.inner.sql;
        let e = |e| storage("lease prepared messages for check-back", e);
        with_pool!(&self.inner.pool, p => {
            let mut tx = p.begin_with(sql.dialect.begin_write()).await.map_err(e)?;
            let rows = sqlx::query(sql.check_candidates.clone())
                .bind(group)
                .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
                .fetch_all(&mut *tx)
                .await
                .map_err(e)?;
            let mut entries = decode_all(rows)?;
            entries.retain(|entry| !skip.contains(&entry.id));
            for entry in &mut entries {
                let checks: i64 = sqlx::query_scalar(sql.claim_check.clone())
                    .bind(entry.id)
                    .bind(millis(interval))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(e)?;
                entry.checks = u32::try_from(checks).unwrap_or(u32::MAX);
            }
            tx.commit().await.map_err(e)?;
            Ok(entries)
        })
    }

    /// PREPARED → PENDING, due now. False when the row was no longer prepared (resolved
    /// elsewhere).
    pub(crate) async fn commit_prepared(&self, id: i64) -> Result<bool> {
        let sql = &self.inner.sql;
        with_pool!(&self.inner.pool, p => sqlx::query(sql.commit_prepared.clone())
            .bind(id)
            .execute(p)
            .await
            .map(|r| r.rows_affected() == 1))
        .map_err(|e| storage("commit a prepared message", e))
    }

    /// PREPARED → PENDING, leased to `owner` for `lease`: the committing producer's relay
    /// publishes it next. `None` when the row was no longer prepared.
    pub(crate) async fn commit_prepared_leased(
        &self,
        id: i64,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<OutboxEntry>> {
        let sql = &self.inner.sql;
        with_pool!(&self.inner.pool, p => {
            let rows = sqlx::query(sql.commit_prepared_leased.clone())
                .bind(id)
                .bind(owner)
                .bind(millis(lease))
                .fetch_all(p)
                .await
                .map_err(|e| storage("commit a prepared message", e))?;
            decode_all(rows).map(|mut entries| entries.pop())
        })
    }

    /// Deletes a prepared row. False when it was no longer prepared.
    pub(crate) async fn rollback_prepared(&self, id: i64) -> Result<bool> {
        let sql = &self.inner.sql;
        with_pool!(&self.inner.pool, p => sqlx::query(sql.rollback_prepared.clone())
            .bind(id)
            .execute(p)
            .await
            .map(|r| r.rows_affected() == 1))
        .map_err(|e| storage("roll back a prepared message", e))
    }

    pub(crate) async fn dead_prepared(&self, id: i64, error: &str) -> Result<bool> {
        let sql = &self.inner.sql;
        with_pool!(&self.inner.pool, p => sqlx::query(sql.dead_prepared.clone())
            .bind(id)
            .bind(error)
            .execute(p)
            .await
            .map(|r| r.rows_affected() == 1))
        .map_err(|e| storage("mark a prepared message dead", e))
    }
}

// ---------------------------------------------------------------------------------------
// The application's connection.

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::PgConnection {}
    impl Sealed for sqlx::SqliteConnection {}
}

/// A connection the outbox and inbox can work in: [`PgConnection`] or
/// [`SqliteConnection`], usually the application's open transaction (`&mut *tx`).
///
/// Only connections implement it, never pools: a pool would run each statement in a
/// transaction of its own and silently break "the message exists if and only if the
/// business change committed".
pub trait SqlConnection: sealed::Sealed + sqlx::Connection + Send + 'static {
    /// The sqlx database of this connection.
    type Db: sqlx::Database<Connection = Self>;

    /// The dialect of this connection.
    const DIALECT: Dialect;

    #[doc(hidden)]
    fn insert_row<'a>(
        &'a mut self,
        store: &'a SqlStore,
        message: &'a Message,
        state: &'static str,
        group: Option<&'a str>,
        delay_ms: i64,
    ) -> BoxFuture<'a, Result<i64>>;

    #[doc(hidden)]
    fn insert_inbox_key<'a>(
        &'a mut self,
        store: &'a SqlStore,
        consumer: &'a str,
        message_id: &'a str,
    ) -> BoxFuture<'a, Result<bool>>;

    #[doc(hidden)]
    fn apply_receipt<'a>(
        &'a mut self,
        store: &'a SqlStore,
        message_id: &'a str,
        state: &'static str,
        reason: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<OutboxEntry>>>;

    #[doc(hidden)]
    fn begin_on(store: &SqlStore) -> BoxFuture<'_, Result<sqlx::Transaction<'static, Self::Db>>>;
}

fn wrong_database(expected: Dialect, got: Dialect) -> Error {
    Error::new(
        ErrorKind::Configuration,
        format!(
            "this store is on {}, but the connection is {}",
            expected.as_str(),
            got.as_str()
        ),
    )
    .with_context("adapter", ADAPTER)
}

macro_rules! impl_sql_connection {
    ($conn:ty, $db:ty, $dialect:expr, $variant:ident) => {
        impl SqlConnection for $conn {
            type Db = $db;
            const DIALECT: Dialect = $dialect;

            fn insert_row<'a>(
                &'a mut self,
                store: &'a SqlStore,
                message: &'a Message,
                state: &'static str,
                group: Option<&'a str>,
                delay_ms: i64,
            ) -> BoxFuture<'a, Result<i64>> {
                Box::pin(async move {
                    if store.dialect() != Self::DIALECT {
                        return Err(wrong_database(store.dialect(), Self::DIALECT));
                    }
                    let headers = serde_json::to_string(message.headers()).map_err(|e| {
                        Error::invalid("headers do not encode as JSON").with_source(e)
                    })?;
                    sqlx::query(store.inner.sql.insert.clone())
                        .bind(message.id().as_str())
                        .bind(message.destination())
                        .bind(message.key())
                        .bind(headers)
                        .bind(message.payload().as_ref())
                        .bind(i64::try_from(message.created_at_millis()).unwrap_or(i64::MAX))
                        .bind(state)
                        .bind(group)
                        .bind(delay_ms)
                        .fetch_one(&mut *self)
                        .await
                        .and_then(|row| row.try_get::<i64, _>(0))
                        .map_err(|e| {
                            if is_unique_violation(&e) {
                                Error::invalid(format!(
                                    "a message with id {} is already in the outbox",
                                    message.id()
                                ))
                                .with_context("message_id", message.id().as_str())
                                .with_source(e)
                            } else {
                                storage("enqueue a message", e)
                                    .with_context("message_id", message.id().as_str())
                            }
                        })
                })
            }

            fn insert_inbox_key<'a>(
                &'a mut self,
                store: &'a SqlStore,
                consumer: &'a str,
                message_id: &'a str,
            ) -> BoxFuture<'a, Result<bool>> {
                Box::pin(async move {
                    if store.dialect() != Self::DIALECT {
                        return Err(wrong_database(store.dialect(), Self::DIALECT));
                    }
                    sqlx::query(store.inner.sql.inbox_insert.clone())
                        .bind(consumer)
                        .bind(message_id)
                        .execute(&mut *self)
                        .await
                        .map(|r| r.rows_affected() == 1)
                        .map_err(|e| storage("record an inbox key", e))
                })
            }

            fn apply_receipt<'a>(
                &'a mut self,
                store: &'a SqlStore,
                message_id: &'a str,
                state: &'static str,
                reason: Option<&'a str>,
            ) -> BoxFuture<'a, Result<Option<OutboxEntry>>> {
                Box::pin(async move {
                    if store.dialect() != Self::DIALECT {
                        return Err(wrong_database(store.dialect(), Self::DIALECT));
                    }
                    let rows = sqlx::query(store.inner.sql.apply_receipt.clone())
                        .bind(message_id)
                        .bind(state)
                        .bind(reason)
                        .fetch_all(&mut *self)
                        .await
                        .map_err(|e| storage("record a receipt", e))?;
                    Ok(decode_all(rows)?.pop())
                })
            }

            fn begin_on(
                store: &SqlStore,
            ) -> BoxFuture<'_, Result<sqlx::Transaction<'static, Self::Db>>> {
                Box::pin(async move {
                    match &store.inner.pool {
                        Pool::$variant(p) => p
                            .begin_with(Self::DIALECT.begin_write())
                            .await
                            .map_err(|e| storage("begin a transaction", e)),
                        #[allow(unreachable_patterns)]
                        _ => Err(wrong_database(store.dialect(), Self::DIALECT)),
                    }
                })
            }
        }
    };
}

impl_sql_connection!(PgConnection, sqlx::Postgres, Dialect::Postgres, Postgres);
impl_sql_connection!(SqliteConnection, sqlx::Sqlite, Dialect::Sqlite, Sqlite);

/// Inserts a row through `conn` (any [`SqlConnection`]).
pub(crate) async fn insert_row<C: SqlConnection>(
    conn: &mut C,
    store: &SqlStore,
    message: &Message,
    state: &'static str,
    group: Option<&str>,
    delay_ms: i64,
) -> Result<i64> {
    conn.insert_row(store, message, state, group, delay_ms)
        .await
}
