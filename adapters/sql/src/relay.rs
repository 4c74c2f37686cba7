//! The relay: leases due outbox rows (`lease.rs`), publishes them with confirm and
//! records the outcome (`transitions.rs`). A running relay also runs the receipt sweep
//! (`receipts.rs`) as a loop of its own beside the publishing loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use surety_core::{ErrorKind, Message, MessageId, Publisher, Result, RetryPolicy, telemetry};
use tracing::Instrument;

use crate::backend::Backend;
use crate::entry::OutboxEntry;
use crate::lease;
use crate::store::SqlStore;
use crate::transitions::{self, FailedAttempt, Next};
use crate::worker::{StopSignal, Worker};

/// Longest last error kept on a row, in characters.
const MAX_ERROR_LEN: usize = 2000;

/// Settings of a [`Relay`].
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Rows leased and published per batch (their confirms are in flight together).
    pub batch_size: usize,
    /// How long a leased row belongs to this relay. It must cover two batches' publishes
    /// (a running relay leases the next batch while one publishes): past it another relay
    /// may take the row and publish it a second time. A relay that crashed holds its rows
    /// this long.
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
pub struct Relay<DB: Backend> {
    store: SqlStore<DB>,
    publisher: Arc<dyn Publisher>,
    config: Arc<RelayConfig>,
    owner: Arc<str>,
}

impl<DB: Backend> Clone for Relay<DB> {
    fn clone(&self) -> Self {
        Relay {
            store: self.store.clone(),
            publisher: self.publisher.clone(),
            config: self.config.clone(),
            owner: self.owner.clone(),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for Relay<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("owner", &self.owner)
            .field("config", &self.config)
            .finish()
    }
}

/// How often a running relay refreshes the outbox depth and lag gauges.
const GAUGE_INTERVAL: Duration = Duration::from_secs(10);

impl<DB: Backend> Relay<DB> {
    /// A relay for `store`'s outbox publishing through `publisher`.
    pub fn new(store: SqlStore<DB>, publisher: Arc<dyn Publisher>, config: RelayConfig) -> Self {
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

    /// One pass: the receipt sweep (receipts on: sent rows without a receipt in time are
    /// due again), then one batch of due rows leased, published and recorded.
    pub async fn run_once(&self) -> Result<RelayStats> {
        self.sweep_receipts().await?;
        let entries = self.claim().await?;
        self.publish_batch(entries).await
    }

    /// Leases the next batch of due rows.
    async fn claim(&self) -> Result<Vec<OutboxEntry>> {
        lease::claim_due(
            &self.store,
            &self.owner,
            self.config.lease,
            self.config.batch_size,
        )
        .await
    }

    /// The receipt sweep's step, up to one batch; nothing when receipts are off. Returns
    /// how many rows it made due again.
    async fn sweep_receipts(&self) -> Result<u64> {
        self.store
            .receipts()
            .redeliver_overdue(self.config.batch_size)
            .await
    }

    async fn publish_batch(&self, entries: Vec<OutboxEntry>) -> Result<RelayStats> {
        self.publish_entries(entries)
            .instrument(tracing::debug_span!(telemetry::SPAN_RELAY_BATCH, owner = %self.owner))
            .await
    }

    /// Runs the receipt sweep once, then batches until none is due, leasing each next
    /// batch while one publishes (see [`Relay::spawn`]). Returns the sum.
    pub async fn drain(&self) -> Result<RelayStats> {
        self.drain_with(|_| {}).await
    }

    /// [`Relay::drain`], calling `on_batch` with each batch's outcome as it is recorded
    /// (progress for an operator, or timing).
    pub async fn drain_with(&self, mut on_batch: impl FnMut(RelayStats)) -> Result<RelayStats> {
        let mut total = RelayStats::default();
        self.sweep_receipts().await?;
        let mut batch = self.claim().await?;
        while !batch.is_empty() {
            let (published, next) = self.publish_leasing_next(batch).await;
            let next = match next {
                Some(next) => next,
                None => self.claim().await,
            };
            match published {
                Ok(stats) => {
                    total.add(stats);
                    on_batch(stats);
                }
                Err(e) => {
                    if let Ok(next) = &next {
                        self.hand_back(next).await;
                    }
                    return Err(e);
                }
            }
            batch = next?;
        }
        Ok(total)
    }

    /// The fast path: publishes these messages now (after the application committed),
    /// if they are still due and not leased. Rows it cannot take are left to the loop.
    pub async fn publish_now(&self, ids: &[MessageId]) -> Result<RelayStats> {
        let entries = lease::claim_ids(&self.store, &self.owner, self.config.lease, ids).await?;
        self.publish_entries(entries).await
    }

    /// The fast path of a committed prepared message: PREPARED → PENDING and leased to
    /// this relay in one statement, then published. `Ok(None)` when the row was no longer
    /// prepared (a check-back resolved it first). An error before the commit means it did
    /// not happen; a failed publish leaves the committed row to the loop, as
    /// [`Relay::publish_now`] does.
    pub(crate) async fn commit_prepared(&self, id: i64) -> Result<Option<Result<RelayStats>>> {
        let Some(entry) =
            transitions::commit_prepared_leased(&self.store, id, &self.owner, self.config.lease)
                .await?
        else {
            return Ok(None);
        };
        Ok(Some(self.publish_entries(vec![entry]).await))
    }

    /// Runs the relay in the background until the worker is stopped. Errors (database
    /// down) are logged and the loops keep polling.
    ///
    /// Two loops run under the one worker. The publishing loop leases a batch, and while a
    /// full batch publishes it leases the next one: the database round trips of the lease
    /// overlap the broker's confirms instead of following them. Batches still publish one
    /// after another, in order. A batch leased ahead is handed back (its lease and attempt
    /// undone) when the worker is shut down; after an abort it waits for its lease to
    /// expire, as after a crash. With receipts on, the receipt sweep runs beside it every
    /// poll interval (at once again while it finds a full batch), so overdue rows become
    /// due without costing the lease of every batch a second statement.
    pub fn spawn(&self) -> Worker {
        let relay = self.clone();
        Worker::spawn_loop(move |stop| async move {
            let sweeping = relay.clone().sweep_loop(stop.clone());
            tokio::join!(relay.publish_loop(stop), sweeping);
        })
    }

    /// The publishing loop of [`Relay::spawn`].
    async fn publish_loop(self, mut stop: StopSignal) {
        let idle = self.config.poll_interval;
        let mut gauges_due = Instant::now();
        let mut ahead: Option<Vec<OutboxEntry>> = None;
        while !stop.requested() {
            if Instant::now() >= gauges_due {
                // Counting rows per state scans the table: a slower clock than the
                // polls. Failures are the database being down: the pass says so.
                gauges_due = Instant::now() + GAUGE_INTERVAL;
                let _ = self.store.counts().await;
                let _ = self.store.lag().await;
            }
            let batch = match ahead.take() {
                Some(batch) => batch,
                None => match self.claim().await {
                    Ok(batch) if !batch.is_empty() => batch,
                    Ok(_) => {
                        stop.sleep(idle).await;
                        continue;
                    }
                    Err(e) => {
                        self.pass_failed(&e);
                        stop.sleep(idle).await;
                        continue;
                    }
                },
            };
            let (published, next) = self.publish_leasing_next(batch).await;
            if let Err(e) = published {
                self.pass_failed(&e);
            }
            match next {
                Some(Ok(next)) if !next.is_empty() => ahead = Some(next),
                Some(Err(e)) => {
                    self.pass_failed(&e);
                    stop.sleep(idle).await;
                }
                _ => stop.sleep(idle).await,
            }
        }
        if let Some(batch) = ahead {
            self.hand_back(&batch).await;
        }
    }

    /// The receipt sweep's loop of [`Relay::spawn`]; ends at once when receipts are off.
    async fn sweep_loop(self, mut stop: StopSignal) {
        if self.store.config().receipt_timeout.is_none() {
            return;
        }
        let full = self.config.batch_size.max(1) as u64;
        while !stop.requested() {
            match self.sweep_receipts().await {
                Ok(n) if n >= full => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(owner = %self.owner, error = %e, "receipt sweep failed"),
            }
            stop.sleep(self.config.poll_interval).await;
        }
    }

    /// Publishes `batch` and, if it was full (more may be due), leases the next batch
    /// meanwhile; `None` when nothing was leased.
    async fn publish_leasing_next(
        &self,
        batch: Vec<OutboxEntry>,
    ) -> (Result<RelayStats>, Option<Result<Vec<OutboxEntry>>>) {
        if batch.len() >= self.config.batch_size.max(1) {
            let (published, next) = tokio::join!(self.publish_batch(batch), self.claim());
            (published, Some(next))
        } else {
            (self.publish_batch(batch).await, None)
        }
    }

    /// Hands rows leased ahead back unpublished, so another relay need not wait for the
    /// lease to expire.
    async fn hand_back(&self, batch: &[OutboxEntry]) {
        let ids: Vec<i64> = batch.iter().map(|e| e.id).collect();
        if let Err(e) = lease::release(&self.store, &self.owner, &ids).await {
            tracing::warn!(owner = %self.owner, error = %e, rows = ids.len(),
                "could not hand back rows leased ahead; they wait for their lease to expire");
        }
    }

    fn pass_failed(&self, e: &surety_core::Error) {
        tracing::warn!(owner = %self.owner, error = %e, "relay pass failed");
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
            failed.push(FailedAttempt {
                id: entry.id,
                next: Next::Dead,
                error,
            });
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
                    let next = if last {
                        Next::Dead
                    } else {
                        Next::Retry(policy.delay(entry.attempts))
                    };
                    failed.push(FailedAttempt {
                        id: entry.id,
                        next,
                        error,
                    });
                }
            }
        }
        let marked_sent = transitions::mark_sent(&self.store, &self.owner, &sent).await?;
        stats.sent = marked_sent;
        stats.lease_lost += sent.len() as u64 - marked_sent;
        let dead = failed.iter().filter(|f| f.next == Next::Dead).count() as u64;
        let marked_failed = transitions::mark_failed(&self.store, &self.owner, &failed).await?;
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
