//! Fault scenarios: what happens to every message id when things break.
//!
//! Each scenario publishes a fixed number of messages, breaks something on purpose and
//! keeps a per-id ledger (published with confirm, delivered, applied, dead-lettered).
//! It returns a [`FaultRow`] for the guarantee matrix. A row fails when a confirmed
//! message was lost, when an effect guarded by an inbox was applied twice, or when the
//! scenario saw a contract broken on the way (a false success, a non-retryable error
//! where a retry must help, a poison message that never reached its dead letters).
//!
//! One file per scenario family: `restart.rs` (1), `network.rs` (2 and 7: cut and stall
//! through a [`FaultProxy`](crate::FaultProxy)), `relay_kill.rs` (3), `consumer_kill.rs`
//! (4), `producer_kill.rs` (5), `poison.rs` (6), `bad_input.rs`, `hostile.rs` (the
//! conformance suite's hostile-input cases, sent by the fixture's foreign producer). Scenarios with effects
//! apply them through an [`EffectStore`]; the runner gives them `surety-sql`'s inbox on
//! PostgreSQL (`pg.rs`). `children.rs` runs the relay and producer processes that
//! scenarios 3 and 5 kill; `harness.rs` is the runner ([`run`]) and
//! `guarantees.rs` writes `docs/guarantees.md`. What a runner supplies per adapter is
//! a [`FaultAdapter`]: its fixture, its proxied set-up and its restart.
//!
//! Every await on a client that a fault may leave hanging is bounded ([`setup`],
//! [`PUBLISH_HANG_LIMIT`], the consumer's shutdown limit), so a hang becomes a failing
//! row naming what hung instead of a run ended by the watchdog.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_core::{
    Error, ErrorKind, Handler, Message, MessageId, Publisher, RetryPolicy, Subscription,
    SubscriptionHandle, Topology,
};

use crate::Fixture;
use crate::support::unique_name;

mod bad_input;
mod children;
mod consumer_kill;
mod guarantees;
mod harness;
mod hostile;
mod network;
mod pg;
mod poison;
mod producer_kill;
mod relay_kill;
mod restart;

pub use bad_input::bad_input;
pub use consumer_kill::{DyingConsumer, kill_before_ack};
pub use harness::{FaultAdapter, Proxied, SCENARIOS, run};
pub use hostile::hostile_input;
pub use network::{
    NetworkFault, PUBLISH_HANG_LIMIT, network_fault_during_confirmed_sends, resolve, start_proxy,
};
pub use poison::poison_stream;
pub use restart::{RESTART, RESTART_PUBLISH_LIMIT, broker_restart};

/// What one scenario observed on one broker.
#[derive(Clone, Debug, Default)]
pub struct FaultRow {
    /// Scenario name.
    pub scenario: String,
    /// Adapter name.
    pub broker: String,
    /// Messages the scenario published (or tried to).
    pub messages: usize,
    /// Messages that should have arrived (confirmed, or expected dead letters) and never
    /// did.
    pub lost: usize,
    /// Effects applied more than once, where an inbox guards them; `None` when the
    /// scenario uses no inbox.
    pub applied_twice: Option<usize>,
    /// Deliveries beyond the first for one id (expected after an unknown outcome; the id
    /// absorbs them).
    pub delivered_twice: usize,
    /// Distinct ids that reached the dead-letter destination.
    pub dead_lettered: usize,
    /// Time from the fault until the client worked again.
    pub recovery: Option<Duration>,
    /// Contracts the scenario saw broken, besides loss and double application.
    pub failures: Vec<String>,
    /// What the row means or does not cover.
    pub note: String,
    /// Whether the scenario ran at all (`false`: see `note`).
    pub ran: bool,
}

impl FaultRow {
    fn new(scenario: &str, broker: &str) -> Self {
        FaultRow {
            scenario: scenario.into(),
            broker: broker.into(),
            ran: true,
            ..FaultRow::default()
        }
    }

    /// Records, for the ids that must have taken effect, those whose effect never
    /// happened (`lost`) and the extra applications (`applied_twice`), from the effect
    /// store's counts.
    fn tally_effects(&mut self, expected: &[MessageId], counts: &HashMap<MessageId, usize>) {
        let applied = |id: &MessageId| counts.get(id).copied().unwrap_or(0);
        self.lost = expected.iter().filter(|id| applied(id) == 0).count();
        self.applied_twice = Some(
            expected
                .iter()
                .map(|id| applied(id).saturating_sub(1))
                .sum(),
        );
    }

    /// A row for a scenario that does not apply to a broker, with the reason.
    pub fn not_run(scenario: &str, broker: &str, why: impl Into<String>) -> Self {
        FaultRow {
            scenario: scenario.into(),
            broker: broker.into(),
            note: why.into(),
            ran: false,
            ..FaultRow::default()
        }
    }

    /// Why the row fails, or `None` when it passes (or did not run).
    pub fn verdict(&self) -> Option<String> {
        if !self.ran {
            return None;
        }
        let mut why = self.failures.clone();
        if self.lost > 0 {
            why.insert(0, format!("{} messages lost", self.lost));
        }
        if let Some(n) = self.applied_twice.filter(|n| *n > 0) {
            why.insert(0, format!("{n} effects applied twice"));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// The rows of a run, rendered as the guarantee matrix.
#[derive(Default)]
pub struct FaultReport {
    rows: Mutex<Vec<FaultRow>>,
}

impl FaultReport {
    /// Adds a row.
    pub fn add(&self, row: FaultRow) {
        self.rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(row);
    }

    /// The rows so far.
    pub fn rows(&self) -> Vec<FaultRow> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A markdown table, rows in the order of `scenarios` then broker.
    pub fn markdown(&self, scenarios: &[&str]) -> String {
        let mut rows = self.rows();
        rows.sort_by_key(|r| {
            (
                scenarios
                    .iter()
                    .position(|s| *s == r.scenario)
                    .unwrap_or(usize::MAX),
                r.broker.clone(),
            )
        });
        let mut out = String::from(
            "| scenario | broker | messages | lost | applied twice | delivered twice | dead-lettered | recovery | result |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for r in &rows {
            if !r.ran {
                out.push_str(&format!(
                    "| {} | {} | - | - | - | - | - | - | not run: {} |\n",
                    r.scenario, r.broker, r.note
                ));
                continue;
            }
            let result = match r.verdict() {
                None if r.note.is_empty() => "pass".to_string(),
                None => format!("pass ({})", r.note),
                Some(why) => format!("**FAIL**: {why}"),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.scenario,
                r.broker,
                r.messages,
                r.lost,
                r.applied_twice
                    .map_or("n/a (no inbox)".to_string(), |n| n.to_string()),
                r.delivered_twice,
                r.dead_lettered,
                r.recovery
                    .map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
                result.replace('|', "/"),
            ));
        }
        out
    }
}

/// An effect applied at most once per `(consumer, message id)`, for the scenarios that
/// kill a consumer between its effect and its ack.
#[async_trait::async_trait]
pub trait EffectStore: Send + Sync {
    /// Applies the effect of `message` for `consumer` unless it was applied before;
    /// returns `true` when it was applied now, `false` for a duplicate.
    async fn apply(&self, consumer: &str, message: &Message) -> Result<bool, String>;
    /// How often each id's effect was applied, as stored.
    async fn applied(&self) -> Result<HashMap<MessageId, usize>, String>;
}

fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Retries in milliseconds, so poison messages dead-letter within a second.
fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::with_max_attempts(max_attempts)
        .backoff(Duration::from_millis(50), Duration::from_millis(300))
        .jitter(0.1)
}

async fn declare(f: &Fixture, what: &str) -> Result<(String, String), String> {
    let destination = unique_name(what);
    let group = unique_name("g");
    f.broker
        .declare(&Topology::new(&destination).group(&group))
        .await
        .map_err(fail("declare"))?;
    Ok((destination, group))
}

/// How long a consumer may take to stop after `shutdown`.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(30);

/// Shuts a subscription down, or says that it hung.
async fn stop(handle: SubscriptionHandle) -> Result<(), String> {
    tokio::time::timeout(SHUTDOWN_LIMIT, handle.shutdown())
        .await
        .map_err(|_| {
            format!(
                "the consumer did not shut down within {} s",
                SHUTDOWN_LIMIT.as_secs()
            )
        })
}

/// How long a setup step (publisher, subscriber, subscribe) may take: without a bound, a
/// client that never answers after a fault would hang the whole run until the watchdog.
pub const SETUP_LIMIT: Duration = Duration::from_secs(60);

/// Awaits a setup step, turning an error or a hang into the scenario's error.
pub async fn setup<T>(
    what: &str,
    step: impl std::future::Future<Output = surety_core::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(SETUP_LIMIT, step).await {
        Ok(result) => result.map_err(fail(what)),
        Err(_) => Err(format!(
            "{what}: no answer within {} s",
            SETUP_LIMIT.as_secs()
        )),
    }
}

async fn subscribe(
    f: &Fixture,
    subscription: Subscription,
    handler: Arc<dyn Handler>,
) -> Result<SubscriptionHandle, String> {
    let subscriber = setup("subscriber", f.broker.subscriber()).await?;
    setup("subscribe", subscriber.subscribe(subscription, handler)).await
}

/// Subscribes `handler` to `destination` in `group` with fast retries: the inbox consumer
/// of the scenarios with effects (restart, relay and producer kills).
async fn subscribe_inbox(
    f: &Fixture,
    destination: &str,
    group: &str,
    handler: Arc<dyn Handler>,
) -> Result<SubscriptionHandle, String> {
    subscribe(
        f,
        Subscription::new(destination, group)
            .retry(fast_retry(20))
            .concurrency(8),
        handler,
    )
    .await
}

/// Whether `e` is what a failed publish may say when the broker or the connection is in
/// trouble: a retryable "outcome unknown", "unavailable" or "rejected" (a nack).
fn acceptable_transient(e: &Error) -> bool {
    e.is_retryable()
        && matches!(
            e.kind(),
            ErrorKind::OutcomeUnknown | ErrorKind::Unavailable | ErrorKind::Rejected
        )
}

/// Publishes `messages` with confirm, in pipelined batches, retrying each retryable
/// failure with the same id until `deadline`. Returns the confirmed ids and the
/// contract violations seen (a non-retryable error, a receipt for another id).
async fn publish_confirmed(
    publisher: &dyn Publisher,
    messages: &[Message],
    deadline: Instant,
) -> (Vec<MessageId>, Vec<String>) {
    let mut confirmed = Vec::new();
    let mut problems = Vec::new();
    for chunk in messages.chunks(100) {
        let mut pending: Vec<&Message> = chunk.iter().collect();
        while !pending.is_empty() {
            let batch: Vec<Message> = pending.iter().map(|m| (*m).clone()).collect();
            let results = publisher.publish_batch(&batch).await;
            let mut again = Vec::new();
            for (m, r) in pending.iter().zip(results) {
                match r {
                    Ok(receipt) if receipt.message_id == *m.id() => confirmed.push(m.id().clone()),
                    Ok(receipt) => problems.push(format!(
                        "the receipt for {} names {}",
                        m.id(),
                        receipt.message_id
                    )),
                    Err(e) if acceptable_transient(&e) && Instant::now() < deadline => {
                        again.push(*m)
                    }
                    Err(e) => problems.push(format!("publish of {} failed: {e}", m.id())),
                }
            }
            if !again.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            pending = again;
        }
    }
    (confirmed, problems)
}

/// Waits until `done()` holds or `timeout` passes; asks once more at the end.
async fn faults_wait(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// Shuts a subscription down on a path that already failed.
async fn stop_quietly(handle: SubscriptionHandle) {
    let _ = stop(handle).await;
}
