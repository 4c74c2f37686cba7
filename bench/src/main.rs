//! Benchmarks of Surety against the raw clients it wraps, side by side in one run.
//!
//! Each scenario publishes a fixed number of messages of one payload size with the same
//! number in flight (the window), several times, through Surety's `Publisher` and
//! through the raw client doing the same confirmed publish, on the real brokers that
//! `scripts/brokers up` starts. It prints one table: median messages/s over the
//! repetitions, p50/p99 latency over every message, and the ratio Surety ÷ raw.
//! RabbitMQ also gets lapin's confirm strategies against transactions, and every broker
//! gets the outbox relay (rows committed in PostgreSQL, drained by one and by two
//! [`surety_sql::Relay`]s) against the raw confirmed-publish rate just measured.
//!
//! It starts nothing itself: the brokers are those of `scripts/brokers up`, found through
//! `SURETY_RABBITMQ_URL`, `SURETY_KAFKA_BOOTSTRAP`, `SURETY_ROCKETMQ_NAMESRV` and
//! `SURETY_POSTGRES_URL` (defaults: the local ones). It writes to its own destinations
//! (`surety-bench*`) and its own outbox tables (`surety_bench_*`).
//!
//! Benchmarks report; they never assert timing. Build with `--release` for numbers worth
//! quoting: a debug build measures the debug build.
//!
//! ```text
//! cargo run --release --bin surety-bench -- --messages 10000 --repetitions 5 \
//!     --brokers rabbitmq,kafka,rocketmq --write docs/benchmarks.md
//! ```

// The RocketMQ client's futures nest deeper than the default limit.
#![recursion_limit = "512"]

mod kafka;
mod measure;
mod outbox;
mod rabbit;
mod rocket;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;

use measure::{Run, Summary};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(about = "Surety against the raw broker clients, side by side")]
pub struct Options {
    /// Messages per run.
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Runs per scenario; the table shows the median rate.
    #[arg(long, default_value_t = 5)]
    pub repetitions: usize,
    /// Brokers to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "rabbitmq,kafka,rocketmq")]
    pub brokers: Vec<String>,
    /// Payload size in bytes (1 KiB by default; try 100 and 65536).
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Confirmed publishes in flight at once.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Messages per run of the slow one-at-a-time RabbitMQ strategies (tx per message,
    /// confirm per message); capped at `--messages`.
    #[arg(long, default_value_t = 1_000)]
    pub slow_messages: usize,
    /// Skip the RabbitMQ confirm-strategy scenarios.
    #[arg(long = "no-strategies", action = clap::ArgAction::SetFalse)]
    pub strategies: bool,
    /// Skip the outbox relay scenarios (PostgreSQL with one and two relays, SQLite with one).
    #[arg(long = "no-outbox", action = clap::ArgAction::SetFalse)]
    pub outbox: bool,
    /// Rows a relay leases and publishes per batch (its confirms are in flight together).
    #[arg(long, default_value_t = 100)]
    pub relay_batch: usize,
    /// Also write the table, with date, command and machine, to this file.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

impl Options {
    fn payload_bytes(&self) -> Bytes {
        // Not all zeros, so that nothing along the way can compress it to nothing.
        Bytes::from(
            (0..self.payload)
                .map(|i| (i * 31 % 251) as u8)
                .collect::<Vec<u8>>(),
        )
    }

    /// Messages of the untimed warm-up run.
    fn warmup(&self) -> usize {
        self.messages.clamp(1, 500)
    }

    fn slow_messages(&self) -> usize {
        self.slow_messages.clamp(1, self.messages.max(1))
    }
}

/// One line of the table.
pub struct Row {
    /// Which broker.
    pub broker: &'static str,
    /// What was measured.
    pub scenario: String,
    /// Messages per run.
    pub messages: usize,
    /// Messages in flight at once.
    pub window: usize,
    /// Rate and latencies.
    pub summary: Summary,
    /// The ratio against this scenario's baseline, as text.
    pub ratio: String,
}

/// The raw row and the Surety row of scenario 1, with the ratio on the Surety row.
pub fn pair(
    broker: &'static str,
    raw_name: &str,
    o: &Options,
    raw: &[Run],
    surety: &[Run],
) -> Vec<Row> {
    let raw = measure::summarise(raw);
    let surety = measure::summarise(surety);
    let ratio = surety.rate / raw.rate.max(1e-9);
    vec![
        Row {
            broker,
            scenario: format!("raw: {raw_name}"),
            messages: o.messages,
            window: o.window,
            summary: raw,
            ratio: "1.00 (baseline)".into(),
        },
        Row {
            broker,
            scenario: "surety: Publisher::publish".into(),
            messages: o.messages,
            window: o.window,
            summary: surety,
            ratio: format!("{ratio:.2} Surety ÷ raw (goal ≥ 0.95)"),
        },
    ]
}

/// Turns an error into a message with what was being done.
pub fn fail<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| broker | scenario | messages | window | msgs/s (median) | p50 | p99 | ratio |\n\
         |---|---|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            r.broker,
            r.scenario,
            r.messages,
            r.window,
            r.summary.rate,
            r.summary.p50.as_secs_f64() * 1e3,
            r.summary.p99.as_secs_f64() * 1e3,
            r.ratio
        );
    }
    out
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let build = if cfg!(debug_assertions) {
        "debug build (numbers are not representative)"
    } else {
        "release build"
    };
    format!("{cores} CPUs (nproc), {model}, {build}")
}

/// Today's UTC date as `YYYY-MM-DD` (days-to-civil conversion, proleptic Gregorian).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[tokio::main]
async fn main() -> ExitCode {
    let o = Options::parse();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for broker in &o.brokers {
        eprintln!("benchmarking {broker}...");
        let result = match broker.trim() {
            "rabbitmq" => rabbit::bench(&o).await,
            "kafka" => kafka::bench(&o).await,
            "rocketmq" => Box::pin(rocket::bench(&o)).await,
            other => Err(format!(
                "unknown broker {other:?} (rabbitmq, kafka, rocketmq)"
            )),
        };
        match result {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("{broker}: FAILED: {e}");
                failed.push(format!("{broker}: {e}"));
            }
        }
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut report = table(&rows);
    let _ = write!(
        report,
        "\nMachine: {}. Payload {} B, window {}, {} repetitions, {} messages per run.\n",
        machine(),
        o.payload,
        o.window,
        o.repetitions,
        o.messages
    );
    for f in &failed {
        let _ = writeln!(report, "\nFAILED {f}");
    }
    println!("{report}");
    if let Some(path) = &o.write {
        let doc = format!(
            "# Benchmarks\n\nRun on {} with `{command}`.\n\n{report}",
            today()
        );
        if let Err(e) = std::fs::write(path, doc) {
            eprintln!("could not write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_is_well_formed() {
        let d = today();
        assert_eq!(d.len(), 10, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
