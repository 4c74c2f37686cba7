//! Shared scenarios for the PostgreSQL and SQLite test files. Each scenario runs on a
//! store with a unique table prefix (and, on SQLite, its own file), so parallel runs do not
//! collide. The publisher is the in-memory broker wrapped to count confirmed publishes per
//! message id; the store under test is real.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use surety_core::{
    Broker, ErrorKind, Message, MessageId, Publisher, Receipt, Result, RetryPolicy, Topology,
};
use surety_memory::MemoryBroker;
use surety_sql::sqlx::{self, AssertSqlSafe, Pool};
use surety_sql::{Backend, Dialect, SqlStore, StoreConfig, TableNames};
use tokio::sync::Notify;

pub const DEST: &str = "orders";
pub const GROUP: &str = "cart";

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

/// Plain SQL the tests run beside Surety's API, written once for any database: sqlx's
/// bounds are stated on the blanket impl, so scenarios only write `DB: TestDb`.
pub trait Raw: sqlx::Database {
    /// Runs `sql` with an optional text parameter on an open connection.
    fn exec_on<'a>(
        conn: &'a mut Self::Connection,
        sql: String,
        arg: Option<String>,
    ) -> BoxFuture<'a, sqlx::Result<()>>;
    /// Runs `sql` on the pool.
    fn exec(pool: &Pool<Self>, sql: String) -> BoxFuture<'_, sqlx::Result<()>>;
    /// Runs `sql` on the pool and reads one integer.
    fn scalar(pool: &Pool<Self>, sql: String) -> BoxFuture<'_, sqlx::Result<i64>>;
}

impl<DB> Raw for DB
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> i64: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    fn exec_on<'a>(
        conn: &'a mut DB::Connection,
        sql: String,
        arg: Option<String>,
    ) -> BoxFuture<'a, sqlx::Result<()>> {
        let mut query = sqlx::query(AssertSqlSafe(sql));
        if let Some(arg) = arg {
            query = query.bind(arg);
        }
        Box::pin(async move { query.execute(conn).await.map(|_| ()) })
    }

    fn exec(pool: &Pool<DB>, sql: String) -> BoxFuture<'_, sqlx::Result<()>> {
        Box::pin(async move {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(pool)
                .await
                .map(|_| ())
        })
    }

    fn scalar(pool: &Pool<DB>, sql: String) -> BoxFuture<'_, sqlx::Result<i64>> {
        Box::pin(async move {
            let row = sqlx::query(AssertSqlSafe(sql)).fetch_one(pool).await?;
            sqlx::Row::try_get(&row, 0usize)
        })
    }
}

/// A database the scenarios run on: where its test database is, and how to open it
/// read-only.
pub trait TestDb: Backend + Raw {
    /// The URL of the test database of `prefix`, and its file (SQLite).
    fn database(prefix: &str) -> (String, Option<PathBuf>);
    /// A URL of this database that nothing answers, or `None` where the database has
    /// no server.
    fn unreachable_url() -> Option<&'static str>;
    /// A pool on the same database whose every session is read-only: a PostgreSQL
    /// standby after a failover, a SQLite file on a disk remounted read-only.
    fn read_only(file: Option<&Path>) -> BoxFuture<'_, Pool<Self>>;
}

impl TestDb for sqlx::Postgres {
    fn database(_prefix: &str) -> (String, Option<PathBuf>) {
        (postgres_url(), None)
    }

    fn unreachable_url() -> Option<&'static str> {
        // Nothing listens on port 1.
        Some("postgres://surety:secret-password@127.0.0.1:1/surety")
    }

    fn read_only(_file: Option<&Path>) -> BoxFuture<'_, Pool<Self>> {
        use std::str::FromStr;
        Box::pin(async move {
            let options = sqlx::postgres::PgConnectOptions::from_str(&postgres_url())
                .unwrap()
                .options([("default_transaction_read_only", "on")]);
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect_with(options)
                .await
                .expect("connect read-only")
        })
    }
}

impl TestDb for sqlx::Sqlite {
    fn database(prefix: &str) -> (String, Option<PathBuf>) {
        let path = std::env::temp_dir().join(format!("surety-sql-{prefix}.db"));
        (format!("sqlite://{}", path.display()), Some(path))
    }

    fn unreachable_url() -> Option<&'static str> {
        None
    }

    fn read_only(file: Option<&Path>) -> BoxFuture<'_, Pool<Self>> {
        Box::pin(async move {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(file.expect("a SQLite fixture has a file"))
                .read_only(true);
            sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .expect("open read-only")
        })
    }
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

pub struct Fixture<DB: TestDb> {
    pub store: SqlStore<DB>,
    pub prefix: String,
    pub broker: MemoryBroker,
    pub publisher: Arc<Counting>,
    url: String,
    file: Option<PathBuf>,
}

impl<DB: TestDb> Fixture<DB> {
    pub async fn new() -> Fixture<DB> {
        Fixture::with_config(|c| c).await
    }

    pub async fn with_config(tweak: impl FnOnce(StoreConfig) -> StoreConfig) -> Fixture<DB> {
        let prefix = unique_prefix();
        let config = tweak(StoreConfig::default().tables(TableNames::prefixed(&prefix)));
        let (url, file) = DB::database(&prefix);
        let store = SqlStore::<DB>::connect(&url, config)
            .await
            .expect("connect to the test database");
        store.migrate().await.expect("migrate");
        // Migrating twice is a no-op.
        store.migrate().await.expect("migrate again");
        let orders = format!("CREATE TABLE {prefix}_orders (id TEXT PRIMARY KEY)");
        let effects = format!("CREATE TABLE {prefix}_effects (message_id TEXT NOT NULL)");
        for ddl in [orders, effects] {
            DB::exec(store.pool(), ddl)
                .await
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
            store,
            prefix,
            broker,
            publisher,
            url,
            file,
        }
    }

    pub fn dialect(&self) -> Dialect {
        DB::DIALECT
    }

    /// The URL of the fixture's database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops the test's tables (PostgreSQL) or file (SQLite).
    pub async fn cleanup(self) {
        match &self.file {
            None => {
                let p = &self.prefix;
                let ddl = format!(
                    "DROP TABLE IF EXISTS {p}_outbox, {p}_inbox, {p}_migrations, {p}_orders, {p}_effects"
                );
                let _ = DB::exec(self.store.pool(), ddl).await;
                self.store.close().await;
            }
            Some(path) => {
                self.store.close().await;
                remove_database_file(path);
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
    pub async fn reopen(&self) -> SqlStore<DB> {
        self.reopen_with(self.config()).await
    }

    /// Another store on the same tables with other settings.
    pub async fn reopen_with(&self, config: StoreConfig) -> SqlStore<DB> {
        SqlStore::connect(&self.url, config.tables(TableNames::prefixed(&self.prefix)))
            .await
            .expect("reopen the test database")
    }

    /// A store on the same tables whose every session is read-only.
    pub async fn read_only(&self) -> SqlStore<DB> {
        let pool = DB::read_only(self.file.as_deref()).await;
        SqlStore::new(pool, self.config()).unwrap()
    }

    /// The business change plus the outbox rows in one application transaction, then
    /// commit or roll back.
    pub async fn place_orders(&self, messages: &[Message], commit: bool) {
        let insert = format!("INSERT INTO {}_orders (id) VALUES ($1)", self.prefix);
        let mut tx = self.store.pool().begin().await.unwrap();
        for m in messages {
            let id = m.id().as_str().to_owned();
            DB::exec_on(&mut tx, insert.clone(), Some(id))
                .await
                .unwrap();
            self.store.outbox().enqueue(&mut tx, m).await.unwrap();
        }
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
    }

    pub async fn scalar(&self, sql: String) -> i64 {
        DB::scalar(self.store.pool(), sql).await.unwrap()
    }

    pub async fn execute(&self, sql: String) {
        DB::exec(self.store.pool(), sql).await.unwrap()
    }

    pub async fn state_of(&self, id: &MessageId) -> Option<surety_sql::OutboxEntry> {
        self.store.outbox().get(id).await.unwrap()
    }
}

/// Removes a SQLite database file and its journals.
pub fn remove_database_file(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
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

/// The `surety_inbox_duplicates_total` increments seen per `group` label. Every test
/// binary installs one process-wide recorder (the first call installs it); each test reads
/// its own consumer name, so tests running in parallel do not mix.
pub fn inbox_duplicates(consumer: &str) -> u64 {
    use std::sync::atomic::AtomicU64;
    use std::sync::{LazyLock, Once};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

    static COUNTS: LazyLock<Mutex<HashMap<String, Arc<AtomicU64>>>> = LazyLock::new(Mutex::default);
    static INSTALL: Once = Once::new();

    struct Duplicates;

    impl metrics::Recorder for Duplicates {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            if key.name() != surety_core::telemetry::INBOX_DUPLICATES {
                return Counter::noop();
            }
            let group = key
                .labels()
                .find(|l| l.key() == "group")
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            let cell = COUNTS.lock().unwrap().entry(group).or_default().clone();
            Counter::from_arc(cell)
        }

        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }

        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    INSTALL.call_once(|| {
        metrics::set_global_recorder(Duplicates).expect("the only recorder of this test binary")
    });
    COUNTS
        .lock()
        .unwrap()
        .get(consumer)
        .map_or(0, |n| n.load(Ordering::SeqCst))
}

pub mod inbox_handler;
pub mod scenarios;
