//! The relay: publishes due outbox rows with confirm and records the outcome.

use std::sync::Arc;
use std::time::Duration;

use surety_core::{ErrorKind, Message, MessageId, Publisher, Result, RetryPolicy, telemetry};
use tracing::Instrument;

use crate::store::{EntryState, OutboxEntry, SqlStore};
use crate::worker::Worker;

/// Longest last error kept on a row, in characters.
const MAX_ERROR_LEN: usize = 2000;

/// Settings of a [`Relay`].
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Rows leased and published per batch (their confirms are in flight together).
    pub batch_size: usize,
    /// How long a leased row belongs to this relay. It must cover one batch's publish:
    /// past it another relay may take the row and publish it a second time. A relay that
    /// crashed holds its rows this long.
    pub lease: Duration,
    /// Sleep between polls when nothing was due.
    pub poll_interval: Duration,
    /// Attempts and backoff. An attempt counts when a row is leased, so a crash counts.
    pub retry: RetryPolicy,
    /// This relay's name in `lease_owner` (a fresh UUID when `None`). Two live relays must
    /// not share one.
    pub owner: Option<String>,
}

impl Default for RelayConfig {
    /// Batches of 100, 30 s leases, 250 ms polls, the default retry policy.
    fn default() -> Self {
        RelayConfig {
            batch_size: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
            retry: RetryPolicy::default(),
            owner: None,
        }
    }
}

/// What one relay pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Rows leased.
    pub claimed: u64,
    /// Rows confirmed by the broker and marked `SENT`.
    pub sent: u64,
    /// Rows that failed and were scheduled again.
    pub retried: u64,
    /// Rows that failed for the last time and are now `DEAD`.
    pub dead: u64,
    /// Rows confirmed or failed after this relay's lease had been taken over (the other
    /// relay records their outcome; a confirmed one may be published twice).
    pub lease_lost: u64,
}

impl RelayStats {
    fn add(&mut self, other: RelayStats) {
        self.claimed += other.claimed;
        self.sent += other.sent;
        self.retried += other.retried;
        self.dead += other.dead;
        self.lease_lost += other.lease_lost;
    }
}

/// Publishes committed outbox rows through any [`Publisher`]. Cheap to clone; clones are
/// one relay (one lease owner).
///
/// PostgreSQL: run as many relays as you like on one database. SQLite: run one.
#[derive(Clone)]
pub struct Relay {
    store: SqlStore,
    publisher: Arc<dyn Publisher>,
    config: Arc<RelayConfig>,
    owner: Arc<str>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("owner", &self.owner)
            .field("config", &self.config)
            .finish()
    }
}

/// How often a running relay refreshes the outbox depth and lag gauges.
const GAUGE_INTERVAL: Duration = Duration::from_secs(10);

impl Relay {
    /// A relay for `store`'s outbox publishing through `publisher`.
    pub fn new(store: SqlStore, publisher: Arc<dyn Publisher>, config: RelayConfig) -> Relay {
        let owner: Arc<str> = match &config.owner {
            Some(owner) => owner.as_str().into(),
            None => format!("relay-{}", uuid::Uuid::now_v7()).into(),
        };
        Relay {
            store,
            publisher,
            config: Arc::new(config),
            owner,
        }
    }

    /// This relay's lease owner name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Leases one batch of due rows, publishes it and records the outcomes.
    pub async fn run_once(&self) -> Result<RelayStats> {
        if let Some(timeout) = self.store.config().receipt_timeout {
            // Receipts on: a sent row the consumer never confirmed is due again.
            self.store
                .redeliver_overdue(timeout, self.config.batch_size)
                .await?;
        }
        let entries = self
            .store
            .claim_due(&self.owner, self.config.lease, self.config.batch_size)
            .await?;
        self.publish_entries(entries)
            .instrument(tracing::debug_span!(telemetry::SPAN_RELAY_BATCH, owner = %self.owner))
            .await
    }

    /// Runs batches until none is due. Returns the sum.
    pub async fn drain(&self) -> Result<RelayStats> {
        let mut total = RelayStats::default();
        loop {
            let stats = self.run_once().await?;
            total.add(stats);
            if stats.claimed == 0 {
                return Ok(total);
            }
        }
    }

    /// The fast path: publishes these messages now (after the application committed),
    /// if they are still due and not leased. Rows it cannot take are left to the loop.
    pub async fn publish_now(&self, ids: &[MessageId]) -> Result<RelayStats> {
        let entries = self
            .store
            .claim_ids(&self.owner, self.config.lease, ids)
            .await?;
        self.publish_entries(entries).await
    }

    /// Runs the relay in the background until the worker is stopped. Errors (database
    /// down) are logged and the loop keeps polling.
    pub fn spawn(&self) -> Worker {
        let relay = self.clone();
        let idle = self.config.poll_interval;
        // The outbox gauges (depth per state, lag) are refreshed on a slower clock than
        // the polls: counting rows per state scans the table.
        let gauges_due = Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
        Worker::spawn(idle, move || {
            let relay = relay.clone();
            let gauges_due = gauges_due.clone();
            async move {
                let refresh = {
                    let mut due = gauges_due.lock().unwrap_or_else(|e| e.into_inner());
                    let now = std::time::Instant::now();
                    let refresh = now >= *due;
                    if refresh {
                        *due = now + GAUGE_INTERVAL;
                    }
                    refresh
                };
                if refresh {
                    // Failures here are the database being down: the pass below says so.
                    let _ = relay.store.counts().await;
                    let _ = relay.store.lag().await;
                }
                match relay.run_once().await {
                    // A full batch: more may be due at once.
                    Ok(stats) => stats.claimed >= relay.config.batch_size.max(1) as u64,
                    Err(e) => {
                        tracing::warn!(owner = %relay.owner, error = %e, "relay pass failed");
                        false
                    }
                }
            }
        })
    }

    async fn publish_entries(&self, entries: Vec<OutboxEntry>) -> Result<RelayStats> {
        let mut stats = RelayStats {
            claimed: entries.len() as u64,
            ..RelayStats::default()
        };
        if entries.is_empty() {
            return Ok(stats);
        }
        let policy = &self.config.retry;
        let mut failed = Vec::new();
        // A row leased more than `max_attempts` times without an outcome keeps killing or
        // stalling its relays (a crash loop, a publish slower than the lease): stop there.
        let (entries, stalled): (Vec<_>, Vec<_>) = entries
            .into_iter()
            .partition(|e| e.attempts <= policy.max_attempts);
        for entry in &stalled {
            let error = format!(
                "leased {} times without a publish outcome (relay crashed or lease too short)",
                entry.attempts - 1
            );
            failed.push((entry.id, EntryState::Dead, Duration::ZERO, error));
        }
        let messages: Vec<Message> = entries.iter().map(|e| e.message.clone()).collect();
        let results = if messages.is_empty() {
            Vec::new()
        } else {
            self.publisher.publish_batch(&messages).await
        };
        let mut sent = Vec::new();
        for (entry, result) in entries.iter().zip(results) {
            match result {
                Ok(_) => sent.push(entry.id),
                Err(e) => {
                    // An invalid message can never pass; anything else (an unroutable
                    // destination included) may succeed once the broker or topology is fixed.
                    let last = e.kind() == ErrorKind::InvalidMessage
                        || !policy.allows_another(entry.attempts);
                    let error: String = e.to_string().chars().take(MAX_ERROR_LEN).collect();
                    tracing::debug!(
                        message_id = %entry.message.id(),
                        attempts = entry.attempts,
                        dead = last,
                        error = %error,
                        "outbox publish failed"
                    );
                    if last {
                        failed.push((entry.id, EntryState::Dead, Duration::ZERO, error));
                    } else {
                        let delay = policy.delay(entry.attempts);
                        failed.push((entry.id, EntryState::Pending, delay, error));
                    }
                }
            }
        }
        let marked_sent = self.store.mark_sent(&self.owner, &sent).await?;
        stats.sent = marked_sent;
        stats.lease_lost += sent.len() as u64 - marked_sent;
        let dead = failed.iter().filter(|f| f.1 == EntryState::Dead).count() as u64;
        let marked_failed = self.store.mark_failed(&self.owner, &failed).await?;
        if marked_failed == failed.len() as u64 {
            stats.dead = dead;
            stats.retried = marked_failed - dead;
        } else {
            // Some leases were lost: count what we can without another query.
            stats.lease_lost += failed.len() as u64 - marked_failed;
            stats.dead = dead.min(marked_failed);
            stats.retried = marked_failed - stats.dead;
        }
        if stats.dead > 0 {
            tracing::warn!(owner = %self.owner, dead = stats.dead, "outbox rows are dead");
        }
        Ok(stats)
    }
}
