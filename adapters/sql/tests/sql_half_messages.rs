//! The conformance suite's half-message cases with `send_in_transaction` provided by this
//! crate's prepared-message store on PostgreSQL ([`WithSqlHalfMessages`]), over any
//! broker's plain publisher.

use std::sync::Arc;
use std::time::Duration;

use surety_conformance::runner::{quiet_deliberate_panics, with_sql_half_messages};
use surety_conformance::{CASES, Fixture};
use surety_core::{Broker, Capability};
use surety_sql::{PgStore, StoreConfig, TableNames};

fn postgres_url() -> String {
    std::env::var("SURETY_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://surety:surety@127.0.0.1:5432/surety".into())
}

async fn store(prefix: &str) -> PgStore {
    let store = PgStore::connect(
        &postgres_url(),
        StoreConfig::default().tables(TableNames::prefixed(prefix)),
    )
    .await
    .expect("connect to PostgreSQL");
    store.migrate().await.expect("migrate");
    store
}

async fn drop_tables(store: &PgStore, prefix: &str) {
    let ddl = format!("DROP TABLE IF EXISTS {prefix}_outbox, {prefix}_inbox, {prefix}_migrations");
    let _ = surety_sql::sqlx::raw_sql(surety_sql::sqlx::AssertSqlSafe(ddl))
        .execute(store.pool())
        .await;
    store.close().await;
}

/// Runs the cases; returns how many outbox rows each state ended with.
async fn run_half_message_cases(
    inner: Arc<dyn Broker>,
    quiet: Duration,
) -> std::collections::HashMap<surety_sql::EntryState, u64> {
    quiet_deliberate_panics();
    let prefix = format!(
        "hm{}_{}",
        std::process::id(),
        rand::random::<u32>() % 100_000
    );
    let store = store(&prefix).await;
    let broker = with_sql_half_messages(inner, store.clone());
    let fixture = Fixture::new(broker)
        .quiet_period(quiet)
        .check_back_timeout(Duration::from_secs(30));
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in CASES
        .iter()
        .filter(|c| c.requires.contains(&Capability::HalfMessages))
    {
        ran += 1;
        match (case.run)(fixture.clone()).await {
            Ok(observed) => println!("{}: pass {observed:?}", case.name),
            Err(why) => {
                println!("{}: FAIL {why}", case.name);
                failures.push(format!("{}: {why}", case.name));
            }
        }
    }
    drop(fixture);
    let counts = store.counts().await.unwrap();
    drop_tables(&store, &prefix).await;
    assert_eq!(ran, 3, "the suite's half-message cases");
    assert!(failures.is_empty(), "{failures:#?}");
    counts
}

/// The in-memory broker's own half messages are bypassed: every case goes through the
/// store. (RabbitMQ and Kafka runs need `surety-rabbitmq` / `surety-kafka` as
/// dev-dependencies, a Cargo.lock change left to the lead; see the crate report.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_half_messages_through_the_store() {
    let broker = surety_memory::MemoryBroker::new();
    let counts = run_half_message_cases(Arc::new(broker.clone()), Duration::from_millis(300)).await;
    println!("store rows after the cases: {counts:?}");
    // Committed: 1 + 2 + 1 messages went through the store's rows and relay.
    assert_eq!(counts.get(&surety_sql::EntryState::Sent), Some(&4));
    assert_eq!(
        broker.prepared_count(),
        0,
        "the broker's own half messages were not used"
    );
}
