//! Scenario 4, the outbox: the cost of enqueueing inside a business transaction
//! (business insert alone against business insert + [`surety_sql::Outbox::enqueue`], on
//! PostgreSQL and SQLite), and relay throughput: rows committed in PostgreSQL (published by
//! one or two [`Relay`]s) and in SQLite (one relay: SQLite has one writer, and the crate
//! says to run one relay per file), through Surety's publisher, against the raw
//! confirmed-publish ceiling of scenario 1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use surety_core::{Message, Publisher};
use surety_sql::sqlx::{self, AssertSqlSafe, Pool, Postgres, Sqlite};
use surety_sql::{
    Backend, Dialect, PgStore, Relay, RelayConfig, SqlStore, StoreConfig, TableNames,
};

use crate::measure::{self, Run};
use crate::{Options, Row, fail};

/// Tables of their own, so that the benchmark never touches the tests' rows.
pub const PREFIX: &str = "surety_bench";
/// Rows enqueued per (untimed) setup transaction.
const ENQUEUE_CHUNK: usize = 500;
/// The business row of scenarios 4 and 6 (table `surety_bench_orders`, an order per
/// transaction).
const INSERT_ORDER: &str = "INSERT INTO surety_bench_orders (customer, amount) VALUES ($1, $2)";

/// The PostgreSQL URL of `scripts/brokers` (or `SURETY_POSTGRES_URL`).
pub fn postgres_url() -> String {
    std::env::var("SURETY_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://surety:surety@127.0.0.1:5432/surety".into())
}

fn sqlite_file() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("surety-bench-{}.db", std::process::id()))
}

/// The benchmark's own SQL, written once for both databases: sqlx's bounds are proven by
/// the blanket impl for each database, so the scenarios only write `DB: BenchDb`.
pub trait BenchDb: Backend {
    /// Runs one statement of the benchmark's own (constant text, no input).
    fn exec<'a>(pool: &'a Pool<Self>, sql: &'static str) -> BoxFuture<'a, sqlx::Result<()>>;
    /// Inserts one order through `conn` (the business transaction).
    fn insert_order(
        conn: &mut Self::Connection,
        customer: String,
        amount: i64,
    ) -> BoxFuture<'_, sqlx::Result<()>>;
}

impl<DB> BenchDb for DB
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    fn exec<'a>(pool: &'a Pool<DB>, sql: &'static str) -> BoxFuture<'a, sqlx::Result<()>> {
        Box::pin(async move {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(pool)
                .await
                .map(|_| ())
        })
    }

    fn insert_order(
        conn: &mut DB::Connection,
        customer: String,
        amount: i64,
    ) -> BoxFuture<'_, sqlx::Result<()>> {
        let query = sqlx::query(INSERT_ORDER).bind(customer).bind(amount);
        Box::pin(async move { query.execute(conn).await.map(|_| ()) })
    }
}

/// A store with tables prefixed `prefix` on PostgreSQL or, on SQLite, on a file in the
/// temp directory (removed by [`remove_sqlite_files`]), migrated.
pub async fn store_with<DB: Backend>(prefix: &str) -> Result<SqlStore<DB>, String> {
    let url = match DB::DIALECT {
        Dialect::Sqlite => format!("sqlite:{}", sqlite_file().display()),
        Dialect::Postgres => postgres_url(),
    };
    let store = SqlStore::connect(
        &url,
        StoreConfig::default().tables(TableNames::prefixed(prefix)),
    )
    .await
    .map_err(fail("connect to the database"))?;
    store.migrate().await.map_err(fail("migrate"))?;
    Ok(store)
}

/// The benchmark store (tables `surety_bench_*`).
pub async fn store<DB: Backend>() -> Result<SqlStore<DB>, String> {
    store_with(PREFIX).await
}

/// Removes the benchmark's SQLite file and its WAL side files.
pub fn remove_sqlite_files() {
    let Some(name) = sqlite_file()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return;
    };
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dir.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Runs one statement of the benchmark's own (constant text, no input) on the store's
/// database.
pub async fn exec<DB: BenchDb>(store: &SqlStore<DB>, sql: &'static str) -> Result<(), String> {
    DB::exec(store.pool(), sql)
        .await
        .map_err(|e| format!("{sql}: {e}"))
}

/// Creates (or empties) the business table.
pub async fn business_table<DB: BenchDb>(store: &SqlStore<DB>) -> Result<(), String> {
    if store.dialect() == Dialect::Postgres {
        exec(
            store,
            "CREATE TABLE IF NOT EXISTS surety_bench_orders \
             (id BIGSERIAL PRIMARY KEY, customer TEXT NOT NULL, amount BIGINT NOT NULL)",
        )
        .await?;
    } else {
        exec(
            store,
            "CREATE TABLE IF NOT EXISTS surety_bench_orders \
             (id INTEGER PRIMARY KEY AUTOINCREMENT, customer TEXT NOT NULL, amount BIGINT NOT NULL)",
        )
        .await?;
    }
    exec(store, "DELETE FROM surety_bench_orders").await
}

/// One business transaction: insert an order and, with `message`, enqueue it in the
/// same transaction; commit.
pub async fn business_transaction<DB: BenchDb>(
    store: &SqlStore<DB>,
    i: usize,
    message: Option<&Message>,
) -> Result<(), String> {
    let mut tx = store.pool().begin().await.map_err(fail("begin"))?;
    DB::insert_order(&mut tx, format!("customer-{}", i % 1000), i as i64)
        .await
        .map_err(fail("insert an order"))?;
    if let Some(m) = message {
        store
            .outbox()
            .enqueue(&mut tx, m)
            .await
            .map_err(fail("enqueue"))?;
    }
    tx.commit().await.map_err(fail("commit"))
}

/// Scenario 4a: business insert alone against business insert + enqueue, each in its own
/// transaction, on PostgreSQL (`--db-window` in flight) and SQLite (one at a time).
pub async fn enqueue_cost(o: &Options) -> Result<Vec<Row>, String> {
    let pg = store::<Postgres>().await?;
    note_postgres_version(&pg).await;
    let mut rows = enqueue_cost_on(o, pg).await?;
    rows.extend(enqueue_cost_on(o, store::<Sqlite>().await?).await?);
    remove_sqlite_files();
    Ok(rows)
}

/// Scenario 4a on one database.
async fn enqueue_cost_on<DB: BenchDb>(
    o: &Options,
    store: SqlStore<DB>,
) -> Result<Vec<Row>, String> {
    let sqlite = store.dialect() == Dialect::Sqlite;
    business_table(&store).await?;
    clear(&store).await?;
    let window = if sqlite { 1 } else { o.db_window };
    let payload = o.payload_bytes();
    let alone = measure::workload(|n| {
        let store = &store;
        async move { measure::windowed(n, window, |i| business_transaction(store, i, None)).await }
    });
    let with_outbox = measure::workload(|n| {
        let (store, payload) = (&store, &payload);
        async move {
            measure::windowed(n, window, |i| {
                let message = Message::new("surety-bench-orders", payload.clone());
                async move { business_transaction(store, i, Some(&message)).await }
            })
            .await
        }
    });
    let reset: measure::Reset<'_> = Box::new(|| {
        let store = &store;
        Box::pin(async move {
            exec(store, "DELETE FROM surety_bench_orders").await?;
            clear(store).await
        })
    });
    let n = o.db_messages;
    let runs = measure::alternate(
        o.repetitions,
        o.warmup().min(n),
        &[(n, alone), (n, with_outbox)],
        Some(&reset),
    )
    .await?;
    let database = if sqlite { "SQLite" } else { "PostgreSQL" };
    let alone = measure::summarise(&runs[0]);
    let with = measure::summarise(&runs[1]);
    let cost = alone.rate / with.rate.max(1e-9);
    let row = |scenario: String, summary, ratio| Row {
        scenario_no: 4,
        broker: if sqlite { "sqlite" } else { "postgresql" },
        scenario,
        messages: n,
        window,
        payload: o.payload,
        summary,
        ratio,
    };
    let rows = vec![
        row(
            format!("business insert alone, one transaction each ({database})"),
            alone,
            "1.00 (baseline)".into(),
        ),
        row(
            format!("business insert + outbox enqueue, same transaction ({database})"),
            with,
            format!("{cost:.2}× the cost of the insert alone (no goal in the issue)"),
        ),
    ];
    exec(&store, "DROP TABLE IF EXISTS surety_bench_orders").await?;
    store.close().await;
    Ok(rows)
}

async fn note_postgres_version(store: &PgStore) {
    if let Ok(v) = sqlx::query_scalar::<_, String>("SHOW server_version")
        .fetch_one(store.pool())
        .await
    {
        crate::machine::note_version("PostgreSQL", v);
    }
}

/// Empties the benchmark outbox and commits `messages` pending rows for `destination`.
async fn fill<DB: BenchDb>(
    store: &SqlStore<DB>,
    destination: &str,
    messages: usize,
    o: &Options,
) -> Result<(), String> {
    clear(store).await?;
    let outbox = store.outbox();
    let payload = o.payload_bytes();
    let mut left = messages;
    while left > 0 {
        let n = left.min(ENQUEUE_CHUNK);
        let batch: Vec<Message> = (0..n)
            .map(|_| Message::new(destination, payload.clone()))
            .collect();
        // One transaction per chunk.
        let mut tx = store.pool().begin().await.map_err(fail("begin"))?;
        for m in &batch {
            outbox.enqueue(&mut tx, m).await.map_err(fail("enqueue"))?;
        }
        tx.commit().await.map_err(fail("commit"))?;
        left -= n;
    }
    Ok(())
}

/// Deletes every row of the benchmark outbox. The table name is the constant prefix
/// above, validated by `TableNames`; nothing external reaches the SQL.
pub async fn clear<DB: BenchDb>(store: &SqlStore<DB>) -> Result<(), String> {
    DB::exec(store.pool(), "DELETE FROM surety_bench_outbox")
        .await
        .map_err(fail("clear the benchmark outbox"))
}

/// One relay draining until nothing is due, as `Relay::drain` runs it (the next batch
/// leased while one publishes). Each message's latency is its batch's cycle: the time
/// from the previous batch's outcome (or the start) to its own.
async fn drain<DB: Backend>(relay: Relay<DB>) -> Result<(u64, Vec<Duration>), String> {
    let mut latencies = Vec::new();
    let mut last = Instant::now();
    let stats = relay
        .drain_with(|batch| {
            let now = Instant::now();
            latencies.extend(std::iter::repeat_n(now - last, batch.claimed as usize));
            last = now;
        })
        .await
        .map_err(fail("relay pass"))?;
    if stats.retried + stats.dead > 0 {
        return Err(format!("relay publish failures: {stats:?}"));
    }
    Ok((stats.sent, latencies))
}

/// Drains `messages` committed rows with `relays` relays at once.
async fn relay_run<DB: BenchDb>(
    store: &SqlStore<DB>,
    publisher: &Arc<dyn Publisher>,
    relays: usize,
    messages: usize,
    o: &Options,
) -> Result<Run, String> {
    let config = RelayConfig {
        batch_size: o.relay_batch,
        ..RelayConfig::default()
    };
    let start = Instant::now();
    let results = futures::future::join_all(
        (0..relays).map(|_| drain(Relay::new(store.clone(), publisher.clone(), config.clone()))),
    )
    .await;
    let elapsed = start.elapsed();
    let mut sent = 0;
    let mut latencies = Vec::with_capacity(messages);
    for r in results {
        let (s, l) = r?;
        sent += s;
        latencies.extend(l);
    }
    if sent as usize != messages {
        return Err(format!("relays sent {sent} of {messages} rows"));
    }
    Ok(Run { elapsed, latencies })
}

/// Commits `n` rows (untimed), then drains them with `relays` relays (timed).
fn relay_workload<'a, DB: BenchDb>(
    o: &'a Options,
    store: &'a SqlStore<DB>,
    destination: &'a str,
    publisher: &'a Arc<dyn Publisher>,
    relays: usize,
) -> measure::Workload<'a> {
    measure::workload(move |n| async move {
        fill(store, destination, n, o).await?;
        relay_run(store, publisher, relays, n, o).await
    })
}

/// One and two relays from PostgreSQL and one from SQLite to `destination`, with the
/// ratio to `raw_ceiling` (the raw client's confirmed-publish rate measured just before
/// on the same broker).
pub async fn bench(
    o: &Options,
    broker: &'static str,
    destination: &str,
    publisher: &Arc<dyn Publisher>,
    raw_ceiling: f64,
) -> Result<Vec<Row>, String> {
    let pg = store::<Postgres>().await?;
    let lite = store::<Sqlite>().await?;
    // Each workload commits its rows untimed, then times only the relays' drain.
    let runs = measure::alternate(
        o.repetitions,
        o.warmup(),
        &[
            (
                o.messages,
                relay_workload(o, &pg, destination, publisher, 1),
            ),
            (
                o.messages,
                relay_workload(o, &pg, destination, publisher, 2),
            ),
            (
                o.messages,
                relay_workload(o, &lite, destination, publisher, 1),
            ),
        ],
        None,
    )
    .await?;
    let [one, two, sqlite] = [&runs[0], &runs[1], &runs[2]];
    clear(&pg).await?;
    pg.close().await;
    lite.close().await;
    remove_sqlite_files();
    let one = measure::summarise(one);
    let two = measure::summarise(two);
    let sqlite = measure::summarise(sqlite);
    let versus = |s: &measure::Summary, goal: &str| {
        format!(
            "{:.2} ÷ raw ceiling ({goal})",
            s.rate / raw_ceiling.max(1e-9)
        )
    };
    let two_ratio = format!(
        "{}; {:.2}× one relay (goal > 1)",
        versus(&two, "no goal"),
        two.rate / one.rate.max(1e-9)
    );
    let row = |scenario: &str, summary: measure::Summary, ratio: String| Row {
        scenario_no: 4,
        broker,
        scenario: scenario.into(),
        messages: o.messages,
        window: o.relay_batch,
        payload: o.payload,
        summary,
        ratio,
    };
    Ok(vec![
        row(
            "outbox relay ×1 (PostgreSQL)",
            one.clone(),
            versus(&one, "goal ≥ 0.5"),
        ),
        row("outbox relay ×2 (PostgreSQL)", two, two_ratio),
        row(
            "outbox relay ×1 (SQLite)",
            sqlite.clone(),
            versus(&sqlite, "no goal"),
        ),
    ])
}
