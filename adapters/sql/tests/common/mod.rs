//! Shared scenarios for the PostgreSQL and SQLite test files. Each scenario runs on a
//! store with a unique table prefix (and, on SQLite, its own file), so parallel runs do not
//! collide. The publisher is the in-memory broker wrapped to count confirmed publishes per
//! message id; the store under test is real.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use surety_core::{
    Broker, ErrorKind, Message, MessageId, Publisher, Receipt, Result, RetryPolicy, Topology,
};
use surety_memory::MemoryBroker;
use surety_sql::sqlx::{self, AssertSqlSafe};
use surety_sql::{Dialect, SqlStore, StoreConfig, TableNames};
use tokio::sync::Notify;

pub const DEST: &str = "orders";
pub const GROUP: &str = "cart";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    Sqlite,
}

pub fn postgres_url() -> String {
    std::env::var("SURETY_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://surety:surety@127.0.0.1:5432/surety".into())
}

fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>() % 100_000
    )
}

/// Counts confirmed publishes per message id, forwarding to the memory broker.
pub struct Counting {
    inner: Arc<dyn Publisher>,
    seen: Mutex<HashMap<MessageId, u32>>,
}

impl Counting {
    pub fn count(&self, id: &MessageId) -> u32 {
        self.seen.lock().unwrap().get(id).copied().unwrap_or(0)
    }
    pub fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    pub fn total(&self) -> u64 {
        self.seen
            .lock()
            .unwrap()
            .values()
            .map(|&n| u64::from(n))
            .sum()
    }
}

#[async_trait]
impl Publisher for Counting {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        let receipt = self.inner.publish(message).await?;
        *self
            .seen
            .lock()
            .unwrap()
            .entry(message.id().clone())
            .or_default() += 1;
        Ok(receipt)
    }
}

/// A publisher that never confirms: the relay hangs between lease and mark-sent until
/// it is killed. `entered` fires when a publish has started.
pub struct Hanging {
    pub entered: Notify,
}

#[async_trait]
impl Publisher for Hanging {
    async fn publish(&self, _message: &Message) -> Result<Receipt> {
        self.entered.notify_one();
        std::future::pending().await
    }
}

pub struct Fixture {
    pub kind: Kind,
    pub store: SqlStore,
    pub prefix: String,
    pub broker: MemoryBroker,
    pub publisher: Arc<Counting>,
    file: Option<PathBuf>,
}

impl Fixture {
    pub async fn new(kind: Kind) -> Fixture {
        Fixture::with_config(kind, |c| c).await
    }

    pub async fn with_config(
        kind: Kind,
        tweak: impl FnOnce(StoreConfig) -> StoreConfig,
    ) -> Fixture {
        let prefix = unique_prefix();
        let config = tweak(StoreConfig::default().tables(TableNames::prefixed(&prefix)));
        let (url, file) = match kind {
            Kind::Postgres => (postgres_url(), None),
            Kind::Sqlite => {
                let path = std::env::temp_dir().join(format!("surety-sql-{prefix}.db"));
                (format!("sqlite://{}", path.display()), Some(path))
            }
        };
        let store = SqlStore::connect(&url, config)
            .await
            .expect("connect to the test database");
        assert_eq!(
            store.dialect(),
            match kind {
                Kind::Postgres => Dialect::Postgres,
                Kind::Sqlite => Dialect::Sqlite,
            }
        );
        store.migrate().await.expect("migrate");
        // Migrating twice is a no-op.
        store.migrate().await.expect("migrate again");
        let orders = format!("CREATE TABLE {prefix}_orders (id TEXT PRIMARY KEY)");
        let effects = format!("CREATE TABLE {prefix}_effects (message_id TEXT NOT NULL)");
        for ddl in [orders, effects] {
            match kind {
                Kind::Postgres => sqlx::raw_sql(AssertSqlSafe(ddl))
                    .execute(store.pg_pool().unwrap())
                    .await
                    .map(|_| ()),
                Kind::Sqlite => sqlx::raw_sql(AssertSqlSafe(ddl))
                    .execute(store.sqlite_pool().unwrap())
                    .await
                    .map(|_| ()),
            }
            .expect("create a business table");
        }
        let broker = MemoryBroker::new();
        broker
            .declare(&Topology::new(DEST).group(GROUP))
            .await
            .unwrap();
        let publisher = Arc::new(Counting {
            inner: broker.publisher().await.unwrap(),
            seen: Mutex::default(),
        });
        Fixture {
            kind,
            store,
            prefix,
            broker,
            publisher,
            file,
        }
    }

    /// Drops the test's tables (PostgreSQL) or file (SQLite).
    pub async fn cleanup(self) {
        match self.kind {
            Kind::Postgres => {
                let p = &self.prefix;
                let ddl = format!(
                    "DROP TABLE IF EXISTS {p}_outbox, {p}_inbox, {p}_migrations, {p}_orders, {p}_effects"
                );
                let _ = sqlx::raw_sql(AssertSqlSafe(ddl))
                    .execute(self.store.pg_pool().unwrap())
                    .await;
                self.store.close().await;
            }
            Kind::Sqlite => {
                self.store.close().await;
                if let Some(path) = &self.file {
                    for suffix in ["", "-wal", "-shm"] {
                        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                    }
                }
            }
        }
    }

    pub fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }

    fn config(&self) -> StoreConfig {
        StoreConfig::default().tables(TableNames::prefixed(&self.prefix))
    }

    /// Another store on the same tables, as a restarted process would open it.
    pub async fn reopen(&self) -> SqlStore {
        let url = match (&self.kind, &self.file) {
            (Kind::Postgres, _) => postgres_url(),
            (Kind::Sqlite, Some(path)) => format!("sqlite://{}", path.display()),
            (Kind::Sqlite, None) => unreachable!("a SQLite fixture has a file"),
        };
        SqlStore::connect(&url, self.config())
            .await
            .expect("reopen the test database")
    }

    /// A store on the same tables whose every session is read-only: a PostgreSQL standby
    /// after a failover, a SQLite file on a disk remounted read-only.
    pub async fn read_only(&self) -> SqlStore {
        use std::str::FromStr;
        match (&self.kind, &self.file) {
            (Kind::Postgres, _) => {
                let options = sqlx::postgres::PgConnectOptions::from_str(&postgres_url())
                    .unwrap()
                    .options([("default_transaction_read_only", "on")]);
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect_with(options)
                    .await
                    .expect("connect read-only");
                SqlStore::postgres(pool, self.config()).unwrap()
            }
            (Kind::Sqlite, Some(path)) => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true);
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .expect("open read-only");
                SqlStore::sqlite(pool, self.config()).unwrap()
            }
            (Kind::Sqlite, None) => unreachable!("a SQLite fixture has a file"),
        }
    }

    /// The business change plus the outbox rows in one application transaction, then
    /// commit or roll back.
    pub async fn place_orders(&self, messages: &[Message], commit: bool) {
        let insert = format!("INSERT INTO {}_orders (id) VALUES ($1)", self.prefix);
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.unwrap();
                for m in messages {
                    sqlx::query(AssertSqlSafe(insert.clone()))
                        .bind(m.id().as_str())
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    self.store.outbox().enqueue(&mut *tx, m).await.unwrap();
                }
                if commit {
                    tx.commit().await.unwrap();
                } else {
                    tx.rollback().await.unwrap();
                }
            }};
        }
        match self.kind {
            Kind::Postgres => run!(self.store.pg_pool().unwrap()),
            Kind::Sqlite => run!(self.store.sqlite_pool().unwrap()),
        }
    }

    pub async fn scalar(&self, sql: String) -> i64 {
        match self.kind {
            Kind::Postgres => sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(self.store.pg_pool().unwrap())
                .await
                .unwrap(),
            Kind::Sqlite => sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(self.store.sqlite_pool().unwrap())
                .await
                .unwrap(),
        }
    }

    pub async fn execute(&self, sql: String) {
        match self.kind {
            Kind::Postgres => sqlx::query(AssertSqlSafe(sql))
                .execute(self.store.pg_pool().unwrap())
                .await
                .map(|_| ()),
            Kind::Sqlite => sqlx::query(AssertSqlSafe(sql))
                .execute(self.store.sqlite_pool().unwrap())
                .await
                .map(|_| ()),
        }
        .unwrap()
    }

    pub async fn state_of(&self, id: &MessageId) -> Option<surety_sql::OutboxEntry> {
        self.store.outbox().get(id).await.unwrap()
    }
}

pub fn order(n: usize) -> Message {
    Message::new(DEST, format!("order {n}")).with_key(format!("customer-{}", n % 7))
}

pub fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::with_max_attempts(max_attempts)
        .backoff(Duration::ZERO, Duration::ZERO)
        .jitter(0.0)
}

/// Polls `check` every 50 ms until it holds; panics after `limit` (a safety net, not a
/// timing assertion).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn ids(messages: &[Message]) -> HashSet<MessageId> {
    messages.iter().map(|m| m.id().clone()).collect()
}

pub fn is_kind(e: &surety_core::Error, kind: ErrorKind) -> bool {
    e.kind() == kind
}
pub mod scenarios;
