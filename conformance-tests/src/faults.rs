//! Fault scenarios: what happens to every message id when things break.
//!
//! Each scenario publishes a fixed number of messages, breaks something on purpose and
//! keeps a per-id ledger (published with confirm, delivered, applied, dead-lettered).
//! It returns a [`FaultRow`] for the guarantee matrix. A row fails when a confirmed
//! message was lost, when an effect guarded by an inbox was applied twice, or when the
//! scenario saw a contract broken on the way (a false success, a non-retryable error
//! where a retry must help, a poison message that never reached its dead letters).
//!
//! Scenarios that need a database (the inbox) take an [`EffectStore`], so this crate
//! does not depend on `surety-sql`; the runner in `tests/faults.rs` supplies it, and
//! builds the scenarios that need `surety-sql` itself (the relay killed mid-batch, the
//! producer killed between half message and commit) from the pieces here
//! ([`DyingConsumer::inbox`], [`subscribe_inbox`], [`setup`]).
//!
//! Every await on a client that a fault may leave hanging is bounded ([`setup`],
//! [`PUBLISH_HANG_LIMIT`], the consumer's shutdown limit), so a hang becomes a failing
//! row naming what hung instead of a run ended by the watchdog.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_core::{
    Delivery, Error, ErrorKind, Handler, HandlerError, Message, MessageId, Outcome, Publisher,
    RetryPolicy, Subscription, SubscriptionHandle, Topology,
};

use crate::Fixture;
use crate::fault_proxy::FaultProxy;
use crate::support::{Collector, unique_name, wait_until};

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

/// Subscribes `handler` to `destination` in `group` with fast retries: for runners that
/// build their own scenarios (relay and producer kills).
pub async fn subscribe_inbox(
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

/// Declares a fresh destination with one group; returns `(destination, group)`.
pub async fn declare_fresh(f: &Fixture, what: &str) -> Result<(String, String), String> {
    declare(f, what).await
}

/// Shuts a subscription down within `SHUTDOWN_LIMIT` (30 s), or says that it hung.
pub async fn stop_consumer(handle: SubscriptionHandle) -> Result<(), String> {
    stop(handle).await
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

// ---------------------------------------------------------------------------------------
// Scenarios 2 and 7: connection cut, or stall, during confirmed sends.

/// How long one publish may take before the scenario calls it hung: well above the
/// confirm and connect timeouts the runner configures.
pub const PUBLISH_HANG_LIMIT: Duration = Duration::from_secs(30);

/// What the proxy does to the connections while messages are published.
#[derive(Clone, Copy, Debug)]
pub enum NetworkFault {
    /// Close every connection, `times` times, evenly spread over the publishes.
    Cut {
        /// How many cuts.
        times: usize,
    },
    /// Hold every byte for `pause` (longer than the client's timeouts), once, half-way.
    Stall {
        /// How long no byte flows.
        pause: Duration,
    },
}

impl NetworkFault {
    /// The scenario name of the fault.
    pub fn scenario(self) -> &'static str {
        match self {
            NetworkFault::Cut { .. } => "connection-cut-during-confirmed-sends",
            NetworkFault::Stall { .. } => "stall-beyond-client-timeouts",
        }
    }

    fn times(self) -> usize {
        match self {
            NetworkFault::Cut { times } => times,
            NetworkFault::Stall { .. } => 1,
        }
    }
}

/// Publishes `n` messages with confirm through `proxy` (the `proxied` fixture's broker
/// connects through it) while the proxy breaks the connections (`fault`); consumes on
/// `consumer` (the proxied fixture too, to cut consumers as well, or one that bypasses
/// the proxy). Every publish that returned `Ok` must be consumed;
/// every failure must be a retryable "outcome unknown" / "unavailable" / "rejected"
/// (then the same id is published again); the publisher must work again after each
/// fault. Recovery is measured from the cut, or from the end of the stall.
pub async fn network_fault_during_confirmed_sends(
    broker: &str,
    proxied: &Fixture,
    consumer: &Fixture,
    proxies: &[&FaultProxy],
    n: usize,
    fault: NetworkFault,
) -> Result<FaultRow, String> {
    let accepted = || -> usize { proxies.iter().map(|p| p.accepted_connections()).sum() };
    let mut row = FaultRow::new(fault.scenario(), broker);
    let cuts = fault.times();
    row.messages = n;
    let (dest, group) = declare(consumer, "fault-cut").await?;
    let consumed = Collector::acking();
    let consuming = subscribe(
        consumer,
        Subscription::new(&dest, &group).concurrency(16),
        Arc::new(consumed.clone()),
    )
    .await?;
    let publisher = setup("publisher through the proxy", proxied.broker.publisher()).await?;
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(&dest, format!("cut {i}")).with_header("seq", i.to_string()))
        .collect();

    // (attempt started, attempt finished) of every successful publish.
    let oks: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let confirmed: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let transient = Arc::new(AtomicUsize::new(0));
    let ok_count = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(90);

    let cutter = {
        let ok_count = ok_count.clone();
        // (fault began, fault ended) of every fault.
        let cut_times: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
        let times = cut_times.clone();
        let task = async move {
            for k in 1..=cuts {
                let at = k * n / (cuts + 1);
                if !wait_until(Duration::from_secs(60), || {
                    ok_count.load(Ordering::SeqCst) >= at
                })
                .await
                {
                    break;
                }
                let began = Instant::now();
                match fault {
                    NetworkFault::Cut { .. } => proxies.iter().for_each(|p| p.cut_all()),
                    NetworkFault::Stall { pause } => {
                        proxies.iter().for_each(|p| p.stall(true));
                        tokio::time::sleep(pause).await;
                        proxies.iter().for_each(|p| p.stall(false));
                    }
                }
                times.lock().unwrap().push((began, Instant::now()));
            }
        };
        (task, cut_times)
    };
    let (cut_task, cut_times) = cutter;
    let accepted_before = accepted();

    let publishing = async {
        // Windows of 64 publishes in flight, each retried on its own with the same id.
        for window in messages.chunks(64) {
            let tasks = window.iter().map(|m| {
                let publisher = publisher.clone();
                let (oks, confirmed, problems, transient, ok_count) = (
                    oks.clone(),
                    confirmed.clone(),
                    problems.clone(),
                    transient.clone(),
                    ok_count.clone(),
                );
                async move {
                    loop {
                        let started = Instant::now();
                        // A publish must answer (at worst "outcome unknown") within its
                        // confirm timeout; one that hangs is a broken contract, recorded,
                        // and its message published again so the ledger still counts.
                        let result =
                            match tokio::time::timeout(PUBLISH_HANG_LIMIT, publisher.publish(m))
                                .await
                            {
                                Ok(result) => result,
                                Err(_) => {
                                    problems.lock().unwrap().push(format!(
                                        "a publish of {} did not return within {} s",
                                        m.id(),
                                        PUBLISH_HANG_LIMIT.as_secs()
                                    ));
                                    if Instant::now() >= deadline {
                                        return;
                                    }
                                    continue;
                                }
                            };
                        match result {
                            Ok(receipt) => {
                                if receipt.message_id != *m.id() {
                                    problems.lock().unwrap().push(format!(
                                        "the receipt for {} names {}",
                                        m.id(),
                                        receipt.message_id
                                    ));
                                }
                                oks.lock().unwrap().push((started, Instant::now()));
                                confirmed.lock().unwrap().push(m.id().clone());
                                ok_count.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Err(e) if acceptable_transient(&e) => {
                                transient.fetch_add(1, Ordering::SeqCst);
                                if Instant::now() >= deadline {
                                    problems.lock().unwrap().push(format!(
                                        "{} still failing at the deadline: {e}",
                                        m.id()
                                    ));
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(e) => {
                                problems.lock().unwrap().push(format!(
                                    "a publish failed with an error that does not say retry: {e}"
                                ));
                                return;
                            }
                        }
                    }
                }
            });
            futures::future::join_all(tasks).await;
        }
    };
    tokio::join!(publishing, cut_task);

    let confirmed = confirmed.lock().unwrap().clone();
    let expected = confirmed.clone();
    wait_until(consumer.delivery_timeout, || {
        consumed.ledger().lost(&expected) == 0
    })
    .await;
    tokio::time::sleep(consumer.quiet_period).await;
    let stopped = stop(consuming).await;

    let ledger = consumed.ledger();
    row.lost = ledger.lost(&confirmed);
    row.delivered_twice = ledger.duplicated_among(&confirmed);
    row.failures = problems.lock().unwrap().clone();
    if let Err(why) = stopped {
        row.failures.push(why);
    }
    let cut_times = cut_times.lock().unwrap().clone();
    if cut_times.len() < cuts {
        row.failures.push(format!(
            "only {} of {cuts} faults happened (publishing stopped)",
            cut_times.len()
        ));
    }
    let oks = oks.lock().unwrap().clone();
    let mut worst = Duration::ZERO;
    // Publishes in flight across a fault: begun before it ended, confirmed after it began.
    let straddled = oks
        .iter()
        .filter(|(started, done)| {
            cut_times
                .iter()
                .any(|(began, ended)| started <= ended && done >= began)
        })
        .count();
    let reconnected = accepted().saturating_sub(accepted_before);
    for (_, cut) in &cut_times {
        match oks
            .iter()
            .filter(|(started, _)| started >= cut)
            .map(|(_, done)| done.duration_since(*cut))
            .min()
        {
            Some(d) => worst = worst.max(d),
            None => row
                .failures
                .push("no publish succeeded after a fault: the publisher did not recover".into()),
        }
    }
    row.recovery = (!cut_times.is_empty()).then_some(worst);
    let transient = transient.load(Ordering::SeqCst);
    // Clients that retry inside (Kafka's idempotent producer) may hide a fault from the
    // caller; the fault still counts when confirms were in flight across it.
    if transient == 0 && straddled == 0 {
        row.failures.push(
            "no publish saw an error or was in flight across a fault: the scenario proved nothing"
                .into(),
        );
    }
    let unconfirmed = n - confirmed.len();
    row.note = format!(
        "{}, {transient} retryable errors, {straddled} confirms in flight across a fault, {reconnected} new connections after the first fault{}",
        match fault {
            NetworkFault::Cut { .. } => format!("{} cuts", cut_times.len()),
            NetworkFault::Stall { pause } =>
                format!("{} stall of {} s", cut_times.len(), pause.as_secs_f64()),
        },
        if unconfirmed > 0 {
            format!(", {unconfirmed} never confirmed")
        } else {
            String::new()
        }
    );
    Ok(row)
}

// ---------------------------------------------------------------------------------------
// Scenario 1: broker restart during confirmed sends and consumption.

/// The scenario name of a broker restart.
pub const RESTART: &str = "broker-restart-during-sends-and-consumption";

/// How long one publish may take during a restart: a client may hold a send until the
/// broker is back (Kafka buffers it up to its delivery timeout).
pub const RESTART_PUBLISH_LIMIT: Duration = Duration::from_secs(150);

/// Publishes `n` messages with confirm, paced (windows of 10, 100 a second), while an
/// inbox consumer applies them; after 30 % of them are confirmed, runs `restart` (the
/// broker restart). Retryable errors during the outage are retried with the same id.
/// The consumer is left to the adapter's own recovery. Every confirmed id must be
/// applied exactly once. Recovery: from the start of the restart until the first confirm
/// after the restart command returned (the broker was back).
pub async fn broker_restart<R>(
    broker: &str,
    f: &Fixture,
    effects: Arc<dyn EffectStore>,
    n: usize,
    restart: R,
) -> Result<FaultRow, String>
where
    R: std::future::Future<Output = Result<(), String>>,
{
    let mut row = FaultRow::new(RESTART, broker);
    row.messages = n;
    let (dest, group) = declare(f, "fault-restart").await?;
    let consumer = Arc::new(DyingConsumer::inbox(effects.clone(), &group));
    let handle = subscribe_inbox(f, &dest, &group, consumer.clone()).await?;
    let publisher = setup("publisher", f.broker.publisher()).await?;
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(&dest, format!("restart {i}")))
        .collect();

    let oks: Mutex<Vec<(Instant, Instant)>> = Mutex::default();
    let confirmed: Mutex<Vec<MessageId>> = Mutex::default();
    let problems: Mutex<Vec<String>> = Mutex::default();
    let transient = AtomicUsize::new(0);
    let ok_count = AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs(240);
    let restart_window: Mutex<Option<(Instant, Instant)>> = Mutex::default();
    let applied_at_restart = AtomicUsize::new(0);

    let restarting = async {
        let at = n * 3 / 10;
        if !wait_until(Duration::from_secs(60), || {
            ok_count.load(Ordering::SeqCst) >= at
        })
        .await
        {
            return Err(format!(
                "only {} of {at} sends confirmed before the restart",
                ok_count.load(Ordering::SeqCst)
            ));
        }
        applied_at_restart.store(consumer.seen_count(), Ordering::SeqCst);
        let began = Instant::now();
        let result = restart.await;
        *restart_window.lock().unwrap() = Some((began, Instant::now()));
        result
    };
    let publishing = async {
        for window in messages.chunks(10) {
            let tasks = window.iter().map(|m| async {
                loop {
                    let started = Instant::now();
                    let result =
                        match tokio::time::timeout(RESTART_PUBLISH_LIMIT, publisher.publish(m))
                            .await
                        {
                            Ok(result) => result,
                            Err(_) => {
                                problems.lock().unwrap().push(format!(
                                    "a publish of {} did not return within {} s",
                                    m.id(),
                                    RESTART_PUBLISH_LIMIT.as_secs()
                                ));
                                return;
                            }
                        };
                    match result {
                        Ok(_) => {
                            oks.lock().unwrap().push((started, Instant::now()));
                            confirmed.lock().unwrap().push(m.id().clone());
                            ok_count.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        Err(e) if acceptable_transient(&e) && Instant::now() < deadline => {
                            transient.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => {
                            problems.lock().unwrap().push(format!(
                                "a publish failed with an error that does not say retry: {e}"
                            ));
                            return;
                        }
                    }
                }
            });
            futures::future::join_all(tasks).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (_, restarted) = tokio::join!(publishing, restarting);
    let confirmed = confirmed.into_inner().unwrap();
    let mut failures = problems.into_inner().unwrap();
    if let Err(why) = restarted {
        failures.push(format!("restart: {why}"));
    }
    // After a restart a consumer group may take a while to rejoin.
    let all = wait_until(Duration::from_secs(120), || {
        confirmed.iter().all(|id| consumer.has_seen(id))
    })
    .await;
    tokio::time::sleep(f.quiet_period).await;
    if let Err(why) = stop(handle).await {
        failures.push(why);
    }

    let counts = effects.applied().await?;
    row.lost = confirmed
        .iter()
        .filter(|id| counts.get(*id).copied().unwrap_or(0) == 0)
        .count();
    row.applied_twice = Some(
        confirmed
            .iter()
            .map(|id| counts.get(id).copied().unwrap_or(0).saturating_sub(1))
            .sum(),
    );
    row.delivered_twice = consumer.duplicates();
    let window = *restart_window.lock().unwrap();
    let oks = oks.into_inner().unwrap();
    let mut gap = Duration::ZERO;
    let mut done: Vec<Instant> = oks.iter().map(|(_, d)| *d).collect();
    done.sort();
    for pair in done.windows(2) {
        gap = gap.max(pair[1] - pair[0]);
    }
    if let Some((began, ended)) = window {
        match oks.iter().map(|(_, d)| *d).filter(|d| *d >= ended).min() {
            Some(first) => row.recovery = Some(first - began),
            None => failures.push("no send was confirmed after the restart".into()),
        }
    }
    let at_restart = applied_at_restart.load(Ordering::SeqCst);
    if !all {
        failures.push(format!(
            "the consumer did not resume by the adapter's own recovery: {} of {} confirmed applied ({at_restart} before the restart)",
            confirmed.iter().filter(|id| consumer.has_seen(id)).count(),
            confirmed.len()
        ));
    }
    row.failures = failures;
    row.note = format!(
        "restart command {}, {} retryable errors, longest gap between confirms {:.1} s, {at_restart} applied before the restart, {} never confirmed",
        window.map_or("-".to_string(), |(b, e)| format!(
            "{:.1} s",
            (e - b).as_secs_f64()
        )),
        transient.load(Ordering::SeqCst),
        gap.as_secs_f64(),
        n - confirmed.len(),
    );
    Ok(row)
}

// ---------------------------------------------------------------------------------------
// Scenario 6: poison messages mixed into a stream.

/// Publishes `n` messages of which every `every`-th is poison (alternately rejected by
/// the handler and failing until its attempts are used up). Poison messages must reach
/// the dead-letter destination; every other one must be applied; none lost.
pub async fn poison_stream(
    broker: &str,
    f: &Fixture,
    n: usize,
    every: usize,
) -> Result<FaultRow, String> {
    let mut row = FaultRow::new("poison-messages-in-a-stream", broker);
    row.messages = n;
    let (dest, group) = declare(f, "fault-poison").await?;
    let messages: Vec<Message> = (0..n)
        .map(|i| {
            let kind = if i % every == every - 1 {
                if (i / every).is_multiple_of(2) {
                    "reject"
                } else {
                    "fail"
                }
            } else {
                "good"
            };
            Message::new(&dest, format!("poison stream {i}")).with_header("kind", kind)
        })
        .collect();
    let kind = |m: &Message| m.header("kind").unwrap_or_default().to_owned();
    let good: Vec<MessageId> = messages
        .iter()
        .filter(|m| kind(m) == "good")
        .map(|m| m.id().clone())
        .collect();
    let poison: Vec<MessageId> = messages
        .iter()
        .filter(|m| kind(m) != "good")
        .map(|m| m.id().clone())
        .collect();

    let applied = Collector::with(|d: &Delivery| match d.message.header("kind") {
        Some("reject") => Ok(Outcome::reject("poison: the order is invalid")),
        Some("fail") => Err("poison: cannot parse the order".into()),
        _ => Ok(Outcome::Ack),
    });
    let dead = Collector::acking();
    let handles = vec![
        subscribe(
            f,
            Subscription::new(&dest, &group)
                .retry(fast_retry(3))
                .concurrency(8),
            Arc::new(applied.clone()),
        )
        .await?,
        subscribe(
            f,
            Subscription::new(
                f.broker.dead_letter_destination(&dest, &group),
                unique_name("dlq-reader"),
            ),
            Arc::new(dead.clone()),
        )
        .await?,
    ];
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let (confirmed, problems) = publish_confirmed(
        publisher.as_ref(),
        &messages,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    row.failures = problems;
    let confirmed: HashSet<MessageId> = confirmed.into_iter().collect();
    let good: Vec<MessageId> = good
        .into_iter()
        .filter(|id| confirmed.contains(id))
        .collect();
    let poison: Vec<MessageId> = poison
        .into_iter()
        .filter(|id| confirmed.contains(id))
        .collect();

    wait_until(f.delivery_timeout, || {
        applied.ledger().lost(&good) == 0 && dead.ledger().lost(&poison) == 0
    })
    .await;
    tokio::time::sleep(f.quiet_period).await;
    for h in handles {
        if let Err(why) = stop(h).await {
            row.failures.push(why);
        }
    }
    let applied = applied.ledger();
    let dead = dead.ledger();
    row.lost = applied.lost(&good) + dead.lost(&poison);
    row.dead_lettered = poison.len() - dead.lost(&poison);
    row.delivered_twice = applied.duplicated_among(&good) + dead.duplicated_among(&poison);
    let good_dead = good.iter().filter(|id| dead.count(id) > 0).count();
    if good_dead > 0 {
        row.failures
            .push(format!("{good_dead} good messages were dead-lettered"));
    }
    row.note = format!("{} poison of {n}", poison.len());
    Ok(row)
}

// ---------------------------------------------------------------------------------------
// Scenario 4: consumer killed after the effect, before the ack.

/// A handler that applies the effect through the store, and once `trigger` effects are
/// applied stops acking: every later delivery applies its effect and then hangs, like a
/// process killed right after its database commit. With `trigger = usize::MAX` it is a
/// plain inbox consumer ([`DyingConsumer::inbox`]).
pub struct DyingConsumer {
    effects: Arc<dyn EffectStore>,
    consumer: String,
    /// `usize::MAX`: never dies.
    trigger: usize,
    applied: AtomicUsize,
    duplicates: AtomicUsize,
    hung: AtomicUsize,
    dying: AtomicBool,
    seen: Mutex<HashSet<MessageId>>,
}

impl DyingConsumer {
    /// A consumer that never dies: applies each effect once through the inbox, acks.
    pub fn inbox(effects: Arc<dyn EffectStore>, consumer: &str) -> Self {
        DyingConsumer::new(effects, consumer, usize::MAX)
    }

    /// Effects applied for the first time.
    pub fn applied(&self) -> usize {
        self.applied.load(Ordering::SeqCst)
    }

    /// Deliveries the inbox absorbed as duplicates.
    pub fn duplicates(&self) -> usize {
        self.duplicates.load(Ordering::SeqCst)
    }

    /// Whether `id` was seen (applied now or before).
    pub fn has_seen(&self, id: &MessageId) -> bool {
        self.seen.lock().unwrap().contains(id)
    }

    /// Ids seen so far.
    pub fn seen_count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn new(effects: Arc<dyn EffectStore>, consumer: &str, trigger: usize) -> Self {
        DyingConsumer {
            effects,
            consumer: consumer.into(),
            trigger,
            applied: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            hung: AtomicUsize::new(0),
            dying: AtomicBool::new(false),
            seen: Mutex::default(),
        }
    }
}

#[async_trait::async_trait]
impl Handler for DyingConsumer {
    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandlerError> {
        let first = self
            .effects
            .apply(&self.consumer, &delivery.message)
            .await?;
        self.seen
            .lock()
            .unwrap()
            .insert(delivery.message.id().clone());
        if first {
            let applied = self.applied.fetch_add(1, Ordering::SeqCst) + 1;
            if applied >= self.trigger {
                self.dying.store(true, Ordering::SeqCst);
            }
        } else {
            self.duplicates.fetch_add(1, Ordering::SeqCst);
        }
        if self.dying.load(Ordering::SeqCst) {
            self.hung.fetch_add(1, Ordering::SeqCst);
            futures::future::pending::<()>().await;
        }
        Ok(Outcome::Ack)
    }
}

/// Publishes `n` messages; a first consumer applies effects through `effects` and, after
/// `n / 3` of them, hangs right after each effect (no ack) and is aborted like a killed
/// process. A second consumer in the same group takes the redeliveries. Every effect must
/// be applied exactly once (the inbox absorbs the redeliveries of applied ones).
pub async fn kill_before_ack(
    broker: &str,
    f: &Fixture,
    effects: Arc<dyn EffectStore>,
    n: usize,
) -> Result<FaultRow, String> {
    let mut row = FaultRow::new("consumer-killed-after-effect-before-ack", broker);
    row.messages = n;
    let (dest, group) = declare(f, "fault-kill").await?;
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(&dest, format!("effect {i}")))
        .collect();
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let (confirmed, problems) = publish_confirmed(
        publisher.as_ref(),
        &messages,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    row.failures = problems;

    let subscription = Subscription::new(&dest, &group)
        .retry(fast_retry(10))
        .concurrency(8);
    let first = Arc::new(DyingConsumer::new(effects.clone(), &group, n / 3));
    let handle = subscribe(f, subscription.clone(), first.clone()).await?;
    let died = wait_until(f.delivery_timeout, || first.dying.load(Ordering::SeqCst)).await;
    if !died {
        handle.abort();
        return Err(format!(
            "the first consumer applied only {} of {n} effects before the timeout",
            first.applied.load(Ordering::SeqCst)
        ));
    }
    // Let the other in-flight deliveries reach their effect and hang too.
    wait_until(Duration::from_secs(2), || {
        first.hung.load(Ordering::SeqCst) >= 4
    })
    .await;
    handle.abort();
    let killed_at = Instant::now();
    let hung = first.hung.load(Ordering::SeqCst);

    let second = Arc::new(DyingConsumer::new(effects.clone(), &group, usize::MAX));
    let handle = subscribe(f, subscription, second.clone()).await?;
    let all_applied = || {
        let a = first.seen.lock().unwrap();
        let b = second.seen.lock().unwrap();
        confirmed.iter().all(|id| a.contains(id) || b.contains(id))
    };
    let done = wait_until(f.delivery_timeout, all_applied).await;
    let recovered = killed_at.elapsed();
    // Redeliveries of the hung messages may come after the rest: wait for them too.
    wait_until(f.delivery_timeout, || {
        second.duplicates.load(Ordering::SeqCst) >= hung
    })
    .await;
    tokio::time::sleep(f.quiet_period).await;
    if let Err(why) = stop(handle).await {
        row.failures.push(why);
    }

    let counts = effects.applied().await?;
    row.lost = confirmed
        .iter()
        .filter(|id| counts.get(*id).copied().unwrap_or(0) == 0)
        .count();
    row.applied_twice = Some(
        confirmed
            .iter()
            .map(|id| counts.get(id).copied().unwrap_or(0).saturating_sub(1))
            .sum(),
    );
    let absorbed = second.duplicates.load(Ordering::SeqCst);
    row.delivered_twice = absorbed;
    row.recovery = done.then_some(recovered);
    if absorbed < hung {
        row.failures.push(format!(
            "{hung} deliveries hung after their effect, but only {absorbed} came back: \
             unacked messages were not redelivered"
        ));
    }
    row.note = format!("killed with {hung} unacked after their effect; inbox absorbed {absorbed}");
    Ok(row)
}

// ---------------------------------------------------------------------------------------
// Bad input.

/// Oversized payloads, invalid header names and values, empty and malformed destinations:
/// each must be a non-retryable `InvalidMessage` error from `publish`; declaring or
/// subscribing to an empty destination must be a typed error; nothing reaches a consumer.
pub async fn bad_input(broker: &str, f: &Fixture) -> Result<FaultRow, String> {
    let mut row = FaultRow::new("bad-input", broker);
    let (dest, group) = declare(f, "fault-bad").await?;
    let limit = f
        .broker
        .capabilities()
        .max_message_size
        .ok_or("the adapter declares no message size limit")?;
    let bad = [
        (
            "oversized payload",
            Message::new(&dest, vec![0u8; limit + 1]),
        ),
        (
            "empty header name",
            Message::new(&dest, "x").with_header("", "v"),
        ),
        (
            "header name with a space",
            Message::new(&dest, "x").with_header("bad name", "v"),
        ),
        (
            "non-ASCII header name",
            Message::new(&dest, "x").with_header("naïve", "v"),
        ),
        (
            "header value with a newline",
            Message::new(&dest, "x").with_header("h", "a\nb"),
        ),
        (
            "key with a control character",
            Message::new(&dest, "x").with_key("k\u{0}"),
        ),
        ("empty destination", Message::new("", "x")),
        ("destination with a space", Message::new("bad dest", "x")),
    ];
    row.messages = bad.len();
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    for (what, m) in &bad {
        match publisher.publish(m).await {
            Ok(_) => row.failures.push(format!("{what}: confirmed")),
            Err(e) if e.kind() == ErrorKind::InvalidMessage && !e.is_retryable() => {}
            Err(e) => row.failures.push(format!(
                "{what}: expected a permanent invalid_message, got {e}"
            )),
        }
    }
    match f.broker.declare(&Topology::new("")).await {
        Ok(()) => row
            .failures
            .push("declaring an empty destination succeeded".into()),
        Err(e) if e.is_retryable() => row.failures.push(format!(
            "declaring an empty destination: a retryable error {e}"
        )),
        Err(_) => {}
    }
    match f.broker.subscriber().await {
        Ok(s) => match s
            .subscribe(Subscription::new("", &group), Arc::new(Collector::acking()))
            .await
        {
            Ok(h) => {
                let _ = stop(h).await;
                row.failures
                    .push("subscribing to an empty destination succeeded".into());
            }
            Err(e) if e.is_retryable() => row.failures.push(format!(
                "subscribing to an empty destination: a retryable error {e}"
            )),
            Err(_) => {}
        },
        Err(e) => return Err(format!("subscriber: {e}")),
    }
    let consumed = Collector::acking();
    let handle = subscribe(
        f,
        Subscription::new(&dest, &group),
        Arc::new(consumed.clone()),
    )
    .await?;
    tokio::time::sleep(f.quiet_period).await;
    if let Err(why) = stop(handle).await {
        row.failures.push(why);
    }
    if !consumed.is_empty() {
        row.failures.push(format!(
            "{} invalid messages reached a consumer",
            consumed.len()
        ));
    }
    Ok(row)
}
