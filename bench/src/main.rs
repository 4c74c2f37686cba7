//! Benchmarks of Surety against the raw clients it wraps, side by side in one run.
//!
//! The scenarios are those of issue 9, numbered the same way:
//!
//! 1. Confirmed publish: Surety's `Publisher` against the raw client doing the same
//!    confirmed publish (lapin confirm mode, rdkafka idempotent `FutureProducer`,
//!    rocketmq-client-rust sync send), same payload, same window of messages in flight;
//!    at the main payload size and at the extra sizes (`--extra-payloads`).
//! 2. RabbitMQ: transactions against confirm strategies (the articles' "~250×" claim).
//! 3. Transactional send against plain confirmed send: RocketMQ native half messages
//!    (raw and Surety), Kafka transactions per batch (raw and Surety), and Surety's
//!    store-backed half messages (`WithSqlHalfMessages`) on RabbitMQ and Kafka.
//! 4. Outbox: enqueue cost inside a business transaction (PostgreSQL, SQLite), and relay
//!    throughput (PostgreSQL with one and two relays, SQLite with one) against the raw
//!    confirmed-publish ceiling of scenario 1.
//! 5. Inbox: consume + effect + dedup record against consume + effect on PostgreSQL.
//! 6. End-to-end latency, business commit → consumer effect, through the outbox fast path
//!    (`Relay::publish_now` after the commit) and through a polling relay alone.
//!
//! Every table row shows the median messages/s over the repetitions, p50/p99 latency
//! over every message, and its ratio next to the issue's goal.
//!
//! It starts nothing itself: the brokers are those of `scripts/brokers up`, found through
//! `SURETY_RABBITMQ_URL`, `SURETY_KAFKA_BOOTSTRAP`, `SURETY_ROCKETMQ_NAMESRV` and
//! `SURETY_POSTGRES_URL` (defaults: the local ones). It writes to its own destinations
//! (`surety-bench*`) and its own tables (`surety_bench_*`).
//!
//! Benchmarks report; they never assert timing. Build with `--release` for numbers worth
//! quoting: a debug build measures the debug build.
//!
//! ```text
//! cargo build --release --locked --bin surety-bench
//! target/release/surety-bench --write docs/benchmarks.md
//! ```

// The RocketMQ client's futures nest deeper than the default limit.
#![recursion_limit = "512"]

mod consume;
mod halfmsg;
mod kafka;
mod machine;
mod measure;
mod outbox;
mod rabbit;
mod rocket;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use bytes::Bytes;
use clap::Parser;

use measure::{Run, Summary};

/// Command-line options. The defaults are the full run (all scenarios, three brokers).
#[derive(Parser, Debug)]
#[command(about = "Surety against the raw broker clients, side by side")]
pub struct Options {
    /// Messages per run of the publish scenarios (1, 2, 3) and of the relay (4).
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Runs per scenario; the table shows the median rate.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Brokers to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "rabbitmq,kafka,rocketmq")]
    pub brokers: Vec<String>,
    /// Scenarios to run (numbers of issue 9), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6")]
    pub scenarios: Vec<u8>,
    /// Main payload size in bytes, used by every scenario.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Further payload sizes for scenario 1 (comma-separated; 0 for none). Their
    /// runs carry at most `--extra-bytes` of payload, so big payloads get fewer messages.
    #[arg(long, value_delimiter = ',', default_value = "100,65536")]
    pub extra_payloads: Vec<usize>,
    /// Payload bytes per run at the extra sizes (caps their message count).
    #[arg(long, default_value_t = 64 << 20)]
    pub extra_bytes: usize,
    /// Confirmed publishes in flight at once.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Messages per run of the slow one-at-a-time RabbitMQ strategies (tx per message,
    /// confirm per message); capped at `--messages`.
    #[arg(long, default_value_t = 1_000)]
    pub slow_messages: usize,
    /// Rows a relay leases and publishes per batch (its confirms are in flight together).
    #[arg(long, default_value_t = 100)]
    pub relay_batch: usize,
    /// Messages per run of the transactional-send scenario (3).
    #[arg(long, default_value_t = 1_000)]
    pub tx_messages: usize,
    /// Messages per Kafka transaction in scenario 3.
    #[arg(long, default_value_t = 100)]
    pub tx_batch: usize,
    /// Business transactions per run of the enqueue-cost scenario (4).
    #[arg(long, default_value_t = 2_000)]
    pub db_messages: usize,
    /// Business transactions in flight at once on PostgreSQL (SQLite has one writer: 1).
    #[arg(long, default_value_t = 8)]
    pub db_window: usize,
    /// Messages per run of the inbox scenario (5).
    #[arg(long, default_value_t = 2_000)]
    pub consume_messages: usize,
    /// Handler concurrency of the consumer in scenarios 5 and 6.
    #[arg(long, default_value_t = 8)]
    pub consume_concurrency: usize,
    /// Messages per variant of the end-to-end latency scenario (6).
    #[arg(long, default_value_t = 200)]
    pub e2e_messages: usize,
    /// Milliseconds between two business commits in scenario 6 (an unsaturated load).
    #[arg(long, default_value_t = 10)]
    pub e2e_gap_ms: u64,
    /// Adds diagnostic rows that split Surety's cost into parts (RabbitMQ: raw lapin
    /// writing the same AMQP properties as Surety's codec).
    #[arg(long)]
    pub diagnose: bool,
    /// Also write the tables, with date, command and machine, to this file.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

impl Options {
    /// A payload of `size` bytes; not all zeros, so that nothing along the way can
    /// compress it to nothing.
    pub fn payload_of(size: usize) -> Bytes {
        Bytes::from((0..size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>())
    }

    /// The main payload.
    pub fn payload_bytes(&self) -> Bytes {
        Self::payload_of(self.payload)
    }

    /// Messages of the untimed warm-up run.
    pub fn warmup(&self) -> usize {
        self.messages.clamp(1, 500)
    }

    /// The extra payload sizes of scenario 1 (`--extra-payloads`, zeros left out), each
    /// with its payload.
    pub fn extra_payload_bodies(&self) -> Vec<(usize, Bytes)> {
        self.extra_payloads
            .iter()
            .filter(|s| **s > 0)
            .map(|&s| (s, Self::payload_of(s)))
            .collect()
    }

    /// Messages per run at an extra payload size.
    pub fn messages_at(&self, size: usize) -> usize {
        self.messages.min(self.extra_bytes / size.max(1)).max(100)
    }

    /// Messages per run of the one-at-a-time strategies.
    pub fn slow_messages(&self) -> usize {
        self.slow_messages.clamp(1, self.messages.max(1))
    }

    /// Whether scenario `n` runs.
    pub fn runs(&self, n: u8) -> bool {
        self.scenarios.contains(&n)
    }
}

/// One line of a table.
pub struct Row {
    /// The scenario's number in issue 9.
    pub scenario_no: u8,
    /// Which broker or database.
    pub broker: &'static str,
    /// What was measured.
    pub scenario: String,
    /// Messages per run.
    pub messages: usize,
    /// Messages in flight at once.
    pub window: usize,
    /// Payload bytes.
    pub payload: usize,
    /// Rate and latencies.
    pub summary: Summary,
    /// The ratio against this scenario's baseline, with its goal, as text.
    pub ratio: String,
}

/// The rows of scenario 3 for one broker: the raw client's plain and transactional sends,
/// then Surety's transactional send against Surety's plain publish (already shown in
/// scenario 1, so not repeated), with its rate against the raw transactional row appended
/// as "; x ÷ `versus`".
#[allow(clippy::too_many_arguments)] // one row pair each: names and runs side by side
pub fn transactional_rows(
    broker: &'static str,
    raw: (&str, &[Run]),
    raw_tx: (&str, &[Run]),
    surety: (&str, &[Run]),
    surety_tx: (&str, &[Run]),
    messages: usize,
    window: usize,
    payload: usize,
    versus: &str,
) -> Vec<Row> {
    let mut rows = pair(3, broker, raw, raw_tx, messages, window, payload, "no goal");
    rows.extend(
        pair(
            3, broker, surety, surety_tx, messages, window, payload, "no goal",
        )
        .into_iter()
        .skip(1),
    );
    let gap = measure::summarise(surety_tx.1).rate / measure::summarise(raw_tx.1).rate.max(1e-9);
    if let Some(last) = rows.last_mut() {
        last.ratio.push_str(&format!("; {gap:.2} ÷ {versus}"));
    }
    rows
}

/// Scenario 1 at each extra payload size: the raw client's workload against Surety's,
/// alternated, a pair of rows per size. `raw` and `surety` build a workload for a payload.
pub async fn extra_payload_rows<'a>(
    o: &Options,
    broker: &'static str,
    raw_name: &str,
    payloads: &'a [(usize, Bytes)],
    raw: impl Fn(&'a Bytes) -> measure::Workload<'a>,
    surety: impl Fn(&'a Bytes) -> measure::Workload<'a>,
    reset: Option<&measure::Reset<'_>>,
) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for (size, payload) in payloads {
        let n = o.messages_at(*size);
        let runs = measure::alternate(
            o.repetitions,
            o.warmup().min(n),
            &[(n, raw(payload)), (n, surety(payload))],
            reset,
        )
        .await?;
        rows.extend(pair(
            1,
            broker,
            (raw_name, &runs[0]),
            ("surety: Publisher::publish", &runs[1]),
            n,
            o.window,
            *size,
            "goal ≥ 0.95",
        ));
    }
    Ok(rows)
}

/// The raw row and the Surety row of a comparison, with the ratio Surety ÷ raw (and the
/// goal, if any) on the Surety row.
#[allow(clippy::too_many_arguments)]
pub fn pair(
    scenario_no: u8,
    broker: &'static str,
    (raw_name, raw): (&str, &[Run]),
    (surety_name, surety): (&str, &[Run]),
    messages: usize,
    window: usize,
    payload: usize,
    goal: &str,
) -> Vec<Row> {
    let raw = measure::summarise(raw);
    let surety = measure::summarise(surety);
    let ratio = surety.rate / raw.rate.max(1e-9);
    let row = |scenario: String, summary, ratio| Row {
        scenario_no,
        broker,
        scenario,
        messages,
        window,
        payload,
        summary,
        ratio,
    };
    vec![
        row(raw_name.to_owned(), raw, "1.00 (baseline)".into()),
        row(
            surety_name.to_owned(),
            surety,
            format!("{ratio:.2} ÷ baseline ({goal})"),
        ),
    ]
}

/// Turns an error into a message with what was being done.
pub fn fail<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// The scenarios' titles, as the tables' headings.
const TITLES: [(u8, &str); 6] = [
    (1, "1. Confirmed publish: Surety ÷ raw client (goal ≥ 0.95)"),
    (
        2,
        "2. RabbitMQ: confirm strategies against tx per message (articles' claim ~250×)",
    ),
    (
        3,
        "3. Transactional send against plain confirmed send (no goal in the issue)",
    ),
    (
        4,
        "4. Outbox: enqueue cost and relay throughput (goal: relay ×1 on PostgreSQL ≥ 0.5 × raw ceiling; ×2 faster than ×1)",
    ),
    (
        5,
        "5. Inbox: consume + effect + dedup record ÷ consume + effect (goal: cost ≤ 1.3×)",
    ),
    (
        6,
        "6. End-to-end latency, business commit → consumer effect (no goal in the issue)",
    ),
];

fn tables(rows: &[Row]) -> String {
    let mut out = String::new();
    for (no, title) in TITLES {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.scenario_no == no).collect();
        if mine.is_empty() {
            continue;
        }
        let _ = write!(
            out,
            "### {title}\n\n\
             | broker | scenario | payload | messages | window | msgs/s (median) | p50 | p99 | ratio |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---|\n"
        );
        for r in mine {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
                r.broker,
                r.scenario,
                bytes(r.payload),
                r.messages,
                r.window,
                r.summary.rate,
                millis(r.summary.p50),
                millis(r.summary.p99),
                r.ratio
            );
        }
        out.push('\n');
    }
    out
}

fn bytes(n: usize) -> String {
    match n {
        0 => "-".into(),
        n if n >= 1024 && n % 1024 == 0 => format!("{} KiB", n / 1024),
        n => format!("{n} B"),
    }
}

fn millis(d: std::time::Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let o = Options::parse();
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    if o.runs(4) {
        eprintln!("benchmarking the outbox enqueue cost...");
        match outbox::enqueue_cost(&o).await {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("outbox enqueue: FAILED: {e}");
                failed.push(format!("outbox enqueue: {e}"));
            }
        }
    }
    for broker in &o.brokers {
        eprintln!("benchmarking {broker}...");
        let t = Instant::now();
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
        eprintln!("{broker}: {:.0} s", t.elapsed().as_secs_f64());
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut report = tables(&rows);
    let _ = write!(
        report,
        "Machine: {}\n\nMain payload {}, window {}, {} repetitions (median rate shown), \
         {} messages per publish run; run time {:.0} s.\n",
        machine::describe().await,
        bytes(o.payload),
        o.window,
        o.repetitions,
        o.messages,
        started.elapsed().as_secs_f64()
    );
    for f in &failed {
        let _ = writeln!(report, "\nFAILED {f}");
    }
    println!("{report}");
    if let Some(path) = &o.write {
        let existing = std::fs::read_to_string(path).ok();
        let doc = machine::document(existing.as_deref(), &command, &report);
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
    fn sizes_and_counts() {
        assert_eq!(bytes(1024), "1 KiB");
        assert_eq!(bytes(100), "100 B");
        let o = Options::parse_from(["surety-bench"]);
        assert_eq!(o.messages_at(100), o.messages);
        assert_eq!(o.messages_at(65536), 1024);
        assert!(o.runs(6) && !o.runs(7));
    }
}
