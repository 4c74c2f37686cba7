//! Surety's metrics exported to Prometheus.
//!
//! Surety records through the `metrics` facade and never installs a recorder: the
//! application picks the exporter. This example installs `metrics-exporter-prometheus`,
//! runs a small order flow (outbox on SQLite, relay, a consumer with retries, a dead
//! letter and the inbox absorbing a duplicate) and prints the Prometheus text for the
//! `surety_*` series. With `--serve 127.0.0.1:9464` it then serves the same text over
//! HTTP until stopped, for a Prometheus to scrape.
//!
//! Run: `cargo run --example metrics_prometheus [-- --broker <url>] [--serve <addr>]`
//! (default: the in-memory broker; the outbox and inbox are always on a temporary SQLite
//! file).

#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use support::RunIds;
use surety::sql::{InboxOutcome, Relay, RelayConfig, SqliteStore, StoreConfig, TableNames, sqlx};
use surety::{
    Delivery, Error, ErrorKind, Message, Outcome, RetryPolicy, Subscription, Topology, handler_fn,
};

const ORDERS: &str = "surety-demo-metrics";
const GROUP: &str = "surety-demo-metrics-cart";
const ORDER_COUNT: usize = 10;

fn db(e: sqlx::Error) -> Error {
    Error::new(ErrorKind::Storage, "example query failed").with_source(e)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // 1. The exporter: a global recorder every `metrics::counter!` in Surety reports to.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let path = std::env::temp_dir().join(format!("surety-metrics-{}.db", std::process::id()));
    let store = SqliteStore::connect(
        &format!("sqlite://{}", path.display()),
        StoreConfig::default().tables(TableNames::prefixed("metrics_demo")),
    )
    .await?;
    store.migrate().await?;
    let pool = store.pool().clone();

    let broker = surety::connect(&support::broker_url()).await?;
    println!("broker: {}", broker.name());
    broker.declare(&Topology::new(ORDERS).group(GROUP)).await?;

    // 2. The consumer: order 3 fails once (a retry), the poison order is rejected (a dead
    //    letter), everything else goes through the inbox (a duplicate is skipped).
    let run = RunIds::default();
    let settled = Arc::new(AtomicUsize::new(0));
    let (ids, done, inbox_store) = (run.clone(), settled.clone(), store.clone());
    let handler = handler_fn(move |d: Delivery| {
        let (ids, done, store) = (ids.clone(), done.clone(), inbox_store.clone());
        async move {
            if !ids.contains(d.message.id()) {
                return Ok(Outcome::Ack);
            }
            let n = d.message.header("n").unwrap_or_default().to_owned();
            if n == "poison" {
                done.fetch_add(1, Ordering::SeqCst);
                return Ok(Outcome::Reject {
                    reason: "not an order".into(),
                });
            }
            if n == "3" && d.attempt == 1 {
                return Err("database busy".into());
            }
            let outcome = store
                .inbox()
                .process("cart", &d.message, |_tx| {
                    Box::pin(async { Ok::<_, Error>(()) }) // the cart's effect would go here
                })
                .await?;
            if matches!(outcome, InboxOutcome::Applied(())) || n == "1" {
                done.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, surety::HandlerError>(Outcome::Ack)
        }
    });
    let consumer = broker
        .subscriber()
        .await?
        .subscribe(
            Subscription::new(ORDERS, GROUP).retry(
                RetryPolicy::with_max_attempts(3)
                    .backoff(Duration::from_millis(100), Duration::from_millis(500)),
            ),
            Arc::new(handler),
        )
        .await?;

    // 3. The producer: orders and their messages commit together in the outbox...
    let mut first = None;
    for n in 1..=ORDER_COUNT {
        let message = Message::new(ORDERS, format!("order {n}")).with_header("n", n.to_string());
        run.add(message.id());
        let mut tx = pool.begin().await.map_err(db)?;
        store.outbox().enqueue(&mut *tx, &message).await?;
        tx.commit().await.map_err(db)?;
        if first.is_none() {
            first = Some(message);
        }
    }
    // ... and the depth and lag gauges are read before the relay runs.
    store.counts().await?;
    store.lag().await?;
    let stats = Relay::new(
        store.clone(),
        broker.publisher().await?,
        RelayConfig::default(),
    )
    .drain()
    .await?;
    println!("relay published {}", stats.sent);
    let publisher = broker.publisher().await?;
    // A redelivery of order 1 (as after a lost confirm) and a poison message.
    publisher.publish(first.as_ref().expect("an order")).await?;
    let poison = Message::new(ORDERS, "garbage").with_header("n", "poison");
    run.add(poison.id());
    publisher.publish(&poison).await?;

    // order 1 counts twice (applied, then the duplicate), plus the poison message.
    let expected = ORDER_COUNT + 2;
    let all = support::wait_until(|| settled.load(Ordering::SeqCst) >= expected).await;
    consumer.shutdown().await;
    store.counts().await?;
    store.lag().await?;
    store.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }

    // 4. What Prometheus would scrape.
    let text = prometheus.render();
    println!("--- Prometheus exposition (surety_* series)");
    for line in text.lines().filter(|l| l.contains("surety_")) {
        println!("{line}");
    }
    if !all {
        return Err("the consumer did not settle every message".into());
    }
    for name in [
        surety::telemetry::CONFIRMED,
        surety::telemetry::ACKED,
        surety::telemetry::RETRIED,
        surety::telemetry::DEAD_LETTERED,
        surety::telemetry::INBOX_DUPLICATES,
        surety::telemetry::OUTBOX_DEPTH,
    ] {
        if !text.contains(name) {
            return Err(format!("metric {name} was not recorded").into());
        }
    }
    println!("ok: publish, consume, retry, dead letter, inbox and outbox metrics exported");

    if let Some(addr) = support::arg("--serve") {
        serve(&addr, move || prometheus.render())?;
    }
    Ok(())
}

/// A minimal scrape endpoint: every request gets the current exposition text.
fn serve(addr: &str, render: impl Fn() -> String) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    println!("serving metrics on http://{addr}/metrics (Ctrl-C to stop)");
    for stream in listener.incoming() {
        let mut stream = stream?;
        let mut request = [0u8; 1024];
        if stream.read(&mut request)? == 0 {
            continue; // closed before sending a request
        }
        let body = render();
        write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )?;
    }
    Ok(())
}
