//! `surety verify --broker <url>`: the conformance cases against a user's own broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use surety_conformance::runner::with_sql_half_messages;
use surety_conformance::{CASES, Fixture, Report, Verdict};
use surety_core::{Broker, CapabilityCheck, Error, ErrorKind};
use surety_sql::sqlx::{Postgres, Sqlite};
use surety_sql::{Backend, Dialect, SqlStore, StoreConfig, TableNames};

use crate::Cli;
use crate::output::{Failure, print_json};
use surety_core::redact::{redact_url, scrub};

/// Prefix of the tables that back half messages on RabbitMQ and Kafka during a verify
/// run: kept apart from the application's outbox, so its relay never sees test rows.
const VERIFY_TABLES: &str = "surety_verify";

/// `surety verify`: the cases against the broker at `broker_url`; a failed case is an
/// operational failure.
pub(crate) async fn run(cli: &Cli, broker_url: &str, only: &[String]) -> Result<(), Failure> {
    surety_conformance::runner::quiet_deliberate_panics();
    // The database is optional here: it only backs RabbitMQ's and Kafka's half messages.
    let database = crate::database_url(&cli.db).ok();
    if verify(broker_url, database.as_deref(), only, cli.json).await? {
        Ok(())
    } else {
        Err(Failure::operational(
            "verification_failed",
            "at least one conformance case failed (see the matrix)",
        ))
    }
}

/// Connects, runs the cases (all, or those named in `only`) one after another, prints
/// the matrix. `Ok(false)` when a case failed.
async fn verify(
    broker_url: &str,
    database_url: Option<&str>,
    only: &[String],
    as_json: bool,
) -> Result<bool, Failure> {
    for name in only {
        if !CASES.iter().any(|c| c.name == name) {
            return Err(Failure::operational(
                "configuration",
                format!(
                    "unknown case {name:?}; cases: {}",
                    CASES.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    let fail = |e: Error| {
        let mut f = Failure::from_error(&e, Some(broker_url));
        f.text = scrub(&f.text, database_url);
        f
    };
    let (adapter, fixture) = fixture(broker_url, database_url).await.map_err(fail)?;
    let report = Report::default();
    let cases: Vec<_> = CASES
        .iter()
        .filter(|c| only.is_empty() || only.iter().any(|o| o == c.name))
        .collect();
    eprintln!(
        "verifying {} ({adapter}): {} case(s)",
        redact_url(broker_url),
        cases.len()
    );
    let mut failed = 0;
    for (i, case) in cases.iter().enumerate() {
        let started = Instant::now();
        let verdict = if let Some(why) = case.unsupported_by(&fixture) {
            Verdict::NotSupported(why)
        } else {
            // A case that panics outside the deliberate ones is a failure, not a crash
            // of the whole run.
            match tokio::spawn((case.run)(fixture.clone())).await {
                Ok(Ok(observed)) => Verdict::Pass(observed),
                Ok(Err(why)) => Verdict::Fail(why),
                Err(e) => Verdict::Fail(format!("the case panicked: {e}")),
            }
        };
        let short = match &verdict {
            Verdict::Pass(_) => "pass".to_owned(),
            Verdict::Fail(why) => {
                failed += 1;
                format!("FAIL: {}", scrub(why, Some(broker_url)))
            }
            Verdict::NotSupported(why) => format!("not supported ({why})"),
        };
        eprintln!(
            "[{}/{}] {} ... {} ({:.1}s)",
            i + 1,
            cases.len(),
            case.name,
            short,
            started.elapsed().as_secs_f64()
        );
        report.add(case.name, adapter, verdict);
    }
    let order: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    if as_json {
        let rows: Vec<_> = report
            .rows(&order)
            .into_iter()
            .map(|row| {
                let promise = CASES.iter().find(|c| c.name == row.case).map(|c| c.promise);
                match row.verdict {
                    Verdict::Pass(o) => {
                        json!({"case": row.case, "promise": promise, "result": "pass",
                        "messages": o.messages, "lost": o.lost, "duplicated": o.duplicated})
                    }
                    Verdict::Fail(why) => {
                        json!({"case": row.case, "promise": promise, "result": "fail",
                        "reason": scrub(&why, Some(broker_url))})
                    }
                    Verdict::NotSupported(why) => json!({"case": row.case, "promise": promise,
                        "result": "not_supported", "reason": why}),
                }
            })
            .collect();
        print_json(&json!({
            "broker": redact_url(broker_url),
            "adapter": adapter,
            "failed": failed,
            "cases": rows,
        }));
    } else {
        println!("{}", scrub(&report.markdown(&order), Some(broker_url)));
        println!("{failed} failed");
    }
    Ok(failed == 0)
}

/// The adapter behind the URL scheme, with timings that fit its broker (as the
/// conformance runner uses them).
async fn fixture(
    url: &str,
    database_url: Option<&str>,
) -> surety_core::Result<(&'static str, Fixture)> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
    match scheme {
        "memory" => {
            // An empty in-process broker with the suite's short check-back timings.
            let broker = surety::memory::MemoryBroker::with_config(surety::memory::MemoryConfig {
                transaction_timeout: Duration::from_millis(300),
                check_interval: Duration::from_millis(100),
                ..surety::memory::MemoryConfig::default()
            });
            Ok((
                "memory",
                Fixture::new(CapabilityCheck::wrap(Arc::new(broker)))
                    .quiet_period(Duration::from_millis(300))
                    .check_back_timeout(Duration::from_secs(10)),
            ))
        }
        "amqp" | "amqps" | "kafka" => {
            let broker = surety::connect(url).await?;
            let adapter = broker.name();
            let broker = with_half_messages(broker, database_url).await?;
            Ok((
                adapter,
                Fixture::new(broker)
                    .quiet_period(Duration::from_secs(1))
                    .check_back_timeout(Duration::from_secs(30)),
            ))
        }
        "rocketmq" => {
            let broker = surety::connect(url).await?;
            let adapter = broker.name();
            // RocketMQ checks half messages every few seconds after a few seconds.
            Ok((
                adapter,
                Fixture::new(broker)
                    .quiet_period(Duration::from_secs(2))
                    .check_back_timeout(Duration::from_secs(40))
                    .settled_check_backs(true)
                    .redrive_leaves_copies_behind(true),
            ))
        }
        _ => Err(Error::new(
            ErrorKind::Configuration,
            "expected a memory:, amqp://, amqps://, kafka:// or rocketmq:// broker URL",
        )),
    }
}

/// RabbitMQ and Kafka have no half messages of their own: with a database, the
/// transactional cases run on surety-sql's prepared-message store (as an application
/// would); without one they are reported "not supported".
async fn with_half_messages(
    broker: Arc<dyn Broker>,
    database_url: Option<&str>,
) -> surety_core::Result<Arc<dyn Broker>> {
    let Some(url) = database_url else {
        return Ok(broker);
    };
    let wrapped = match Dialect::of_url(url) {
        Some(Dialect::Postgres) => with_store::<Postgres>(broker, url).await?,
        Some(Dialect::Sqlite) => with_store::<Sqlite>(broker, url).await?,
        None => return Err(crate::commands::unknown_database()),
    };
    // The capability layer in front of the decorator sees the half messages it adds.
    Ok(CapabilityCheck::wrap(wrapped))
}

/// `broker` with half messages from the prepared-message store at `url`, migrated.
async fn with_store<DB: Backend>(
    broker: Arc<dyn Broker>,
    url: &str,
) -> surety_core::Result<Arc<dyn Broker>> {
    let config = StoreConfig::default().tables(TableNames::prefixed(VERIFY_TABLES));
    let store = SqlStore::<DB>::connect(url, config).await?;
    store.migrate().await?;
    Ok(with_sql_half_messages(broker, store))
}
