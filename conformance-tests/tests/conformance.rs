//! Runs every conformance case against the adapters named in `SURETY_ADAPTERS`
//! (comma list of `memory`, `rabbitmq`, `kafka`, `rocketmq`), then prints the matrix.
//! The trials and the matrix come from [`surety_conformance::run`]; this file only
//! builds each adapter's fixture.
//!
//! Without `SURETY_ADAPTERS`: `memory` plus every adapter whose broker answers; the run
//! says which it skipped and why. Named adapters that cannot run fail the run.
// The RocketMQ client's futures are deeply nested types.
#![recursion_limit = "512"]

#[cfg(not(feature = "sql"))]
compile_error!(
    "this runner gives RabbitMQ and Kafka half messages through the `sql` feature (on by default)"
);

mod foreign;

use std::sync::Arc;
use std::time::Duration;

use surety_conformance::runner::{adapters_from_env, postgres_url};
use surety_conformance::{Fixture, runtime};
use surety_core::Broker;
use surety_memory::{MemoryBroker, MemoryConfig};
use surety_sql::{PgStore, StoreConfig, TableNames};

/// RabbitMQ and Kafka have no half messages of their own: `send_in_transaction` comes
/// from the prepared-message store of `surety-sql` on the test PostgreSQL, the way an
/// application gets it. Every other operation goes straight to the adapter.
fn with_sql_half_messages(broker: Arc<dyn Broker>) -> Result<Arc<dyn Broker>, String> {
    let url = postgres_url();
    let store = runtime()
        .block_on(PgStore::connect(
            &url,
            StoreConfig::default().tables(TableNames::prefixed("conformance")),
        ))
        .map_err(|e| format!("cannot reach PostgreSQL (SURETY_POSTGRES_URL): {e}"))?;
    runtime()
        .block_on(store.migrate())
        .map_err(|e| format!("cannot migrate the prepared-message store: {e}"))?;
    Ok(surety_conformance::runner::with_sql_half_messages(
        broker, store,
    ))
}

/// Builds the fixture of one adapter, or says why it cannot run.
fn fixture(adapter: &str) -> Result<Fixture, String> {
    match adapter {
        "memory" => {
            let broker = MemoryBroker::with_config(MemoryConfig {
                transaction_timeout: Duration::from_millis(300),
                check_interval: Duration::from_millis(100),
                ..MemoryConfig::default()
            });
            Ok(Fixture::new(Arc::new(broker))
                .quiet_period(Duration::from_millis(300))
                .check_back_timeout(Duration::from_secs(10)))
        }
        "kafka" => {
            let config = surety_kafka::KafkaConfig::from_env();
            let servers = config.bootstrap_servers.clone();
            let foreign = foreign::KafkaForeign::connect(&config)?;
            let broker = runtime()
                .block_on(surety_kafka::KafkaBroker::connect(config))
                .map_err(|e| format!("cannot reach Kafka at {servers}: {e}"))?;
            // A consumer group join takes a moment; a second of quiet catches late or
            // extra deliveries without letting retry cases run out their attempts.
            Ok(Fixture::new(with_sql_half_messages(Arc::new(broker))?)
                .quiet_period(Duration::from_secs(1))
                .check_back_timeout(Duration::from_secs(30))
                .foreign(Arc::new(foreign)))
        }
        "rabbitmq" => {
            let config = surety_rabbitmq::RabbitConfig::from_env()
                .map_err(|e| format!("SURETY_RABBITMQ_URL: {e}"))?;
            let url = config.redacted_url();
            let foreign = runtime().block_on(foreign::RabbitForeign::connect(&config))?;
            let broker = runtime()
                .block_on(surety_rabbitmq::RabbitBroker::connect(config))
                .map_err(|e| format!("cannot reach RabbitMQ at {url}: {e}"))?;
            // A consumer starts in milliseconds and retries in these cases wait at most
            // 300 ms in a delay queue: a second of quiet catches late or extra deliveries.
            Ok(Fixture::new(with_sql_half_messages(Arc::new(broker))?)
                .quiet_period(Duration::from_secs(1))
                .check_back_timeout(Duration::from_secs(30))
                .foreign(Arc::new(foreign)))
        }
        "rocketmq" => {
            let config = surety_rocketmq::RocketMqConfig::from_env();
            let namesrv = config.namesrv.clone();
            let foreign = foreign::RocketForeign::build(&config)?;
            runtime().block_on(foreign.start())?;
            let broker = runtime()
                .block_on(surety_rocketmq::RocketMqBroker::connect(config))
                .map_err(|e| format!("cannot reach RocketMQ at {namesrv}: {e}"))?;
            // Consumers start and rebalance in about a second; the broker checks half
            // messages every 3 s after 3 s (transactionCheckInterval, transactionTimeOut),
            // so a check-back resolves in 5-10 s.
            Ok(Fixture::new(Arc::new(broker))
                .quiet_period(Duration::from_secs(2))
                .check_back_timeout(Duration::from_secs(40))
                .settled_check_backs(true)
                .redrive_leaves_copies_behind(true)
                .foreign(Arc::new(foreign)))
        }
        other => Err(format!(
            "unknown adapter {other:?}; expected one of {}",
            surety_conformance::runner::ADAPTERS.join(", ")
        )),
    }
}

fn main() -> std::process::ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let Some(fixtures) = adapters_from_env("conformance", fixture) else {
        return std::process::ExitCode::FAILURE;
    };
    surety_conformance::run(&fixtures)
}
