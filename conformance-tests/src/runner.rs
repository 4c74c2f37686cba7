//! What every runner of the suite shares (the conformance and fault binaries, and
//! `surety verify`): which adapters to run, the panics cases raise on purpose, and
//! (feature `sql`) store-backed half messages for the brokers that have none of their own.

use crate::DELIBERATE_PANIC;

#[cfg(feature = "sql")]
pub use sql::{postgres_url, with_sql_half_messages};

/// The adapters a runner knows, in the order of the matrix.
pub const ADAPTERS: &[&str] = &["memory", "rabbitmq", "kafka", "rocketmq"];

/// Builds what `build` makes of each adapter named in `SURETY_ADAPTERS` (a comma list),
/// or of every adapter in [`ADAPTERS`] when the variable is unset or empty.
///
/// An adapter that was named but cannot be built fails the run: `None`, after saying why
/// on stderr. One that was not named is skipped with a line saying why.
pub fn adapters_from_env<T>(
    runner: &str,
    mut build: impl FnMut(&str) -> Result<T, String>,
) -> Option<Vec<(String, T)>> {
    let (named, explicit) = match std::env::var("SURETY_ADAPTERS") {
        Ok(list) if !list.trim().is_empty() => (
            list.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>(),
            true,
        ),
        _ => (ADAPTERS.iter().map(|s| s.to_string()).collect(), false),
    };
    let mut built = Vec::new();
    let mut failed = false;
    for adapter in named {
        match build(&adapter) {
            Ok(t) => built.push((adapter, t)),
            Err(why) if explicit => {
                eprintln!("{runner}: cannot run {adapter}: {why}");
                failed = true;
            }
            Err(why) => eprintln!("{runner}: skipping {adapter}: {why}"),
        }
    }
    if failed {
        eprintln!("{runner}: SURETY_ADAPTERS named adapters that cannot run; failing.");
        return None;
    }
    Some(built)
}

/// Cases panic on purpose (inside handlers and local transactions) to prove that a panic
/// is a failure, not a crash. This hides those panics from the output and reports every
/// other panic as before.
pub fn quiet_deliberate_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if !text.starts_with(DELIBERATE_PANIC) {
            default(info);
        }
    }));
}

/// The runner's use of `surety-sql`, only with the `sql` feature.
#[cfg(feature = "sql")]
mod sql {
    use std::sync::Arc;
    use std::time::Duration;

    use surety_core::Broker;
    use surety_sql::{Backend, CheckerConfig, RelayConfig, SqlStore, WithSqlHalfMessages};

    /// The PostgreSQL of `SURETY_POSTGRES_URL`, or the test database `scripts/brokers` starts.
    pub fn postgres_url() -> String {
        std::env::var("SURETY_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://surety:surety@127.0.0.1:5432/surety".into())
    }

    /// `broker` with `send_in_transaction` from the prepared-message store in `store` (which
    /// must be migrated), the way an application on RabbitMQ or Kafka gets half messages.
    /// Check and poll intervals are short so that check-back cases finish in seconds.
    pub fn with_sql_half_messages<DB: Backend>(
        broker: Arc<dyn Broker>,
        store: SqlStore<DB>,
    ) -> Arc<dyn Broker> {
        let checker = CheckerConfig {
            check_timeout: Duration::from_secs(2),
            check_interval: Duration::from_millis(500),
            poll_interval: Duration::from_millis(200),
            ..CheckerConfig::default()
        };
        let relay = RelayConfig {
            poll_interval: Duration::from_millis(100),
            ..RelayConfig::default()
        };
        Arc::new(WithSqlHalfMessages::new(broker, store, checker, relay))
    }
}
