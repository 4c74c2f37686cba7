//! Outbox relay throughput: rows committed in PostgreSQL (published by one or two
//! [`Relay`]s) and in SQLite (one relay: SQLite has one writer, and the crate says to run
//! one relay per file), through Surety's publisher, against the raw confirmed-publish
//! ceiling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use surety_core::{Message, Publisher};
use surety_sql::{Relay, RelayConfig, SqlStore, StoreConfig, TableNames};

use crate::measure::{self, Run};
use crate::{Options, Row, fail};

/// Tables of their own, so that the benchmark never touches the tests' rows.
const PREFIX: &str = "surety_bench";
/// Rows enqueued per (untimed) setup transaction.
const ENQUEUE_CHUNK: usize = 500;

/// The benchmark store on PostgreSQL or, with `sqlite`, on a file in the temp directory,
/// migrated.
async fn store(sqlite: bool) -> Result<SqlStore, String> {
    let url = if sqlite {
        let file = std::env::temp_dir().join(format!("surety-bench-{}.db", std::process::id()));
        format!("sqlite:{}", file.display())
    } else {
        std::env::var("SURETY_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://surety:surety@127.0.0.1:5432/surety".into())
    };
    let store = SqlStore::connect(
        &url,
        StoreConfig::default().tables(TableNames::prefixed(PREFIX)),
    )
    .await
    .map_err(fail("connect to the database"))?;
    store.migrate().await.map_err(fail("migrate"))?;
    Ok(store)
}

/// Empties the benchmark outbox and commits `messages` pending rows for `destination`.
async fn fill(
    store: &SqlStore,
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
        // One transaction per chunk, on whichever database the store holds.
        if let Some(pool) = store.pg_pool() {
            let mut tx = pool.begin().await.map_err(fail("begin"))?;
            for m in &batch {
                outbox.enqueue(&mut *tx, m).await.map_err(fail("enqueue"))?;
            }
            tx.commit().await.map_err(fail("commit"))?;
        } else if let Some(pool) = store.sqlite_pool() {
            let mut tx = pool.begin().await.map_err(fail("begin"))?;
            for m in &batch {
                outbox.enqueue(&mut *tx, m).await.map_err(fail("enqueue"))?;
            }
            tx.commit().await.map_err(fail("commit"))?;
        }
        left -= n;
    }
    Ok(())
}

/// Deletes every row of the benchmark outbox. The table name is the constant prefix
/// above, validated by `TableNames`; nothing external reaches the SQL.
async fn clear(store: &SqlStore) -> Result<(), String> {
    const DELETE: &str = "DELETE FROM surety_bench_outbox";
    let result = if let Some(pool) = store.pg_pool() {
        surety_sql::sqlx::query(DELETE)
            .execute(pool)
            .await
            .map(|_| ())
    } else if let Some(pool) = store.sqlite_pool() {
        surety_sql::sqlx::query(DELETE)
            .execute(pool)
            .await
            .map(|_| ())
    } else {
        Ok(())
    };
    result.map_err(fail("clear the benchmark outbox"))
}

/// One relay draining until nothing is due; each message's latency is its batch's.
async fn drain(relay: Relay) -> Result<(u64, Vec<Duration>), String> {
    let mut sent = 0;
    let mut latencies = Vec::new();
    loop {
        let t = Instant::now();
        let stats = relay.run_once().await.map_err(fail("relay pass"))?;
        if stats.claimed == 0 {
            return Ok((sent, latencies));
        }
        if stats.retried + stats.dead > 0 {
            return Err(format!("relay publish failures: {stats:?}"));
        }
        sent += stats.sent;
        latencies.extend(std::iter::repeat_n(t.elapsed(), stats.claimed as usize));
    }
}

/// Drains `messages` committed rows with `relays` relays at once.
async fn relay_run(
    store: &SqlStore,
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
    let pg = store(false).await?;
    let lite = store(true).await?;
    for s in [&pg, &lite] {
        fill(s, destination, o.warmup(), o).await?;
        relay_run(s, publisher, 1, o.warmup(), o).await?;
    }
    let (mut one, mut two, mut sqlite) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.repetitions {
        fill(&pg, destination, o.messages, o).await?;
        one.push(relay_run(&pg, publisher, 1, o.messages, o).await?);
        fill(&pg, destination, o.messages, o).await?;
        two.push(relay_run(&pg, publisher, 2, o.messages, o).await?);
        fill(&lite, destination, o.messages, o).await?;
        sqlite.push(relay_run(&lite, publisher, 1, o.messages, o).await?);
    }
    clear(&pg).await?;
    pg.close().await;
    lite.close().await;
    // The SQLite file is the benchmark's own; WAL side files go with it.
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        let prefix = format!("surety-bench-{}.db", std::process::id());
        for entry in dir.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let one = measure::summarise(&one);
    let two = measure::summarise(&two);
    let sqlite = measure::summarise(&sqlite);
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
        broker,
        scenario: scenario.into(),
        messages: o.messages,
        window: o.relay_batch,
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
