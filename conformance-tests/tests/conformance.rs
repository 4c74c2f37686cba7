//! Runs every conformance case against the adapters named in `SURETY_ADAPTERS`
//! (comma list of `memory`, `rabbitmq`, `kafka`, `rocketmq`), then prints the matrix.
//!
//! Without `SURETY_ADAPTERS`: `memory` plus every adapter whose broker answers; the run
//! says which it skipped and why. Named adapters that cannot run fail the run.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};
use surety_conformance::runner::{adapters_from_env, quiet_deliberate_panics};
use surety_conformance::{CASES, Fixture, Report, Verdict};
use surety_core::{Broker, CapabilityCheck};
use surety_memory::{MemoryBroker, MemoryConfig};
use surety_sql::{PgStore, StoreConfig, TableNames};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
});

static REPORT: LazyLock<Report> = LazyLock::new(Report::default);

/// RabbitMQ and Kafka have no half messages of their own: `send_in_transaction` comes
/// from the prepared-message store of `surety-sql` on the test PostgreSQL, the way an
/// application gets it. Every other operation goes straight to the adapter.
fn with_sql_half_messages(broker: Arc<dyn Broker>) -> Result<Arc<dyn Broker>, String> {
    let url = std::env::var("SURETY_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://surety:surety@127.0.0.1:5432/surety".into());
    let store = RUNTIME
        .block_on(PgStore::connect(
            &url,
            StoreConfig::default().tables(TableNames::prefixed("conformance")),
        ))
        .map_err(|e| format!("cannot reach PostgreSQL (SURETY_POSTGRES_URL): {e}"))?;
    RUNTIME
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
            let broker = RUNTIME
                .block_on(surety_kafka::KafkaBroker::connect(config))
                .map_err(|e| format!("cannot reach Kafka at {servers}: {e}"))?;
            // A consumer group join takes a moment; a second of quiet catches late or
            // extra deliveries without letting retry cases run out their attempts.
            Ok(Fixture::new(with_sql_half_messages(Arc::new(broker))?)
                .quiet_period(Duration::from_secs(1))
                .check_back_timeout(Duration::from_secs(30)))
        }
        "rabbitmq" => {
            let config = surety_rabbitmq::RabbitConfig::from_env()
                .map_err(|e| format!("SURETY_RABBITMQ_URL: {e}"))?;
            let url = config.redacted_url();
            let broker = RUNTIME
                .block_on(surety_rabbitmq::RabbitBroker::connect(config))
                .map_err(|e| format!("cannot reach RabbitMQ at {url}: {e}"))?;
            // A consumer starts in milliseconds and retries in these cases wait at most
            // 300 ms in a delay queue: a second of quiet catches late or extra deliveries.
            Ok(Fixture::new(with_sql_half_messages(Arc::new(broker))?)
                .quiet_period(Duration::from_secs(1))
                .check_back_timeout(Duration::from_secs(30)))
        }
        "rocketmq" => {
            let config = surety_rocketmq::RocketMqConfig::from_env();
            let namesrv = config.namesrv.clone();
            let broker = RUNTIME
                .block_on(surety_rocketmq::RocketMqBroker::connect(config))
                .map_err(|e| format!("cannot reach RocketMQ at {namesrv}: {e}"))?;
            // Consumers start and rebalance in about a second; the broker checks half
            // messages every 3 s after 3 s (transactionCheckInterval, transactionTimeOut),
            // so a check-back resolves in 5-10 s.
            Ok(Fixture::new(Arc::new(broker))
                .quiet_period(Duration::from_secs(2))
                .check_back_timeout(Duration::from_secs(40))
                .settled_check_backs(true))
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
    quiet_deliberate_panics();
    let args = Arguments::from_args();

    // Every adapter behind the capability layer, as applications get it from
    // `surety::connect`: an unsupported call fails there.
    let fixture = |adapter: &str| {
        fixture(adapter).map(|f| Fixture {
            broker: CapabilityCheck::wrap(f.broker.clone()),
            ..f
        })
    };
    let Some(fixtures) = adapters_from_env("conformance", fixture) else {
        return std::process::ExitCode::FAILURE;
    };
    eprintln!(
        "conformance: running against {}",
        fixtures
            .iter()
            .map(|(a, _)| a.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut trials = Vec::new();
    for (adapter, fixture) in &fixtures {
        let caps = fixture.broker.capabilities();
        for case in CASES {
            let name = format!("{adapter}::{}", case.name);
            let missing: Vec<String> = case
                .requires
                .iter()
                .filter(|c| !caps.supports(**c))
                .map(|c| c.to_string())
                .collect();
            if !missing.is_empty() {
                let why = format!("needs {}", missing.join(", "));
                if args
                    .filter
                    .as_ref()
                    .is_none_or(|f| name.contains(f.as_str()))
                {
                    REPORT.add(case.name, adapter, Verdict::NotSupported(why.clone()));
                }
                trials.push(
                    Trial::test(name, || Ok(()))
                        .with_kind(why)
                        .with_ignored_flag(true),
                );
                continue;
            }
            let fixture = fixture.clone();
            let adapter = adapter.clone();
            trials.push(Trial::test(name, move || {
                let result = RUNTIME.block_on((case.run)(fixture));
                match result {
                    Ok(observed) => {
                        REPORT.add(case.name, &adapter, Verdict::Pass(observed));
                        Ok(())
                    }
                    Err(why) => {
                        REPORT.add(case.name, &adapter, Verdict::Fail(why.clone()));
                        Err(Failed::from(why))
                    }
                }
            }));
        }
    }

    let conclusion = libtest_mimic::run(&args, trials);
    let order: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    println!("\n## Guarantee matrix\n\n{}", REPORT.markdown(&order));
    conclusion.exit_code()
}
