//! Prepared (half) messages for brokers without native ones: prepare, run the local
//! transaction, commit or roll back; a checker resolves stale prepared rows through the
//! producer's [`CheckBack`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use surety_core::raw::{run_check_back, run_local_transaction};
use surety_core::{
    CheckBack, Error, ErrorKind, LocalTransaction, Message, Publisher, Receipt, Result,
    TransactionalPublisher, TxOutcome, TxState, telemetry,
};

use crate::error::ADAPTER;
use crate::relay::{Relay, RelayConfig};
use crate::store::{EntryState, SqlStore};
use crate::worker::Worker;

/// The row of a prepared message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PreparedId(pub(crate) i64);

/// Prepared messages of a [`SqlStore`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PreparedMessages {
    store: SqlStore,
}

impl PreparedMessages {
    pub(crate) fn new(store: SqlStore) -> Self {
        PreparedMessages { store }
    }

    /// Stores `message` as `PREPARED` for producer group `group`, committed on the store's
    /// own pool before the caller's local transaction starts, invisible to the relay. Its
    /// first check-back is due after `check_after`.
    pub async fn prepare(
        &self,
        group: &str,
        message: &Message,
        check_after: Duration,
    ) -> Result<PreparedId> {
        check_group(group)?;
        message
            .validate(Some(self.store.config().max_message_size))
            .map_err(|e| e.with_context("adapter", ADAPTER))?;
        self.store
            .insert_prepared(message, group, check_after)
            .await
            .map(PreparedId)
    }

    /// PREPARED → PENDING: the relay publishes it. `false` when the row was no longer
    /// prepared (already resolved by a check-back).
    pub async fn commit(&self, id: PreparedId) -> Result<bool> {
        self.store.commit_prepared(id.0).await
    }

    /// Deletes the prepared row: it is never published. `false` when it was no longer
    /// prepared.
    pub async fn rollback(&self, id: PreparedId) -> Result<bool> {
        self.store.rollback_prepared(id.0).await
    }
}

fn check_group(group: &str) -> Result<()> {
    if group.is_empty() || group.len() > 255 || group.chars().any(char::is_control) {
        return Err(Error::new(
            ErrorKind::Configuration,
            "producer group must be 1 to 255 bytes without control characters",
        )
        .with_context("adapter", ADAPTER));
    }
    Ok(())
}

/// What a prepared row becomes when its check-backs are used up without an answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckExhausted {
    /// Delete it: never published (RocketMQ's behaviour).
    #[default]
    Rollback,
    /// Keep it as `DEAD` for an operator ([`crate::Outbox::dead`]); re-driving publishes it.
    Dead,
}

/// Settings of a [`Checker`].
#[derive(Clone, Debug)]
pub struct CheckerConfig {
    /// Age of a prepared row before its first check-back.
    pub check_timeout: Duration,
    /// Delay between check-backs of one row.
    pub check_interval: Duration,
    /// Check-backs asked per row before `on_exhausted` applies.
    pub max_checks: u32,
    /// What happens after `max_checks` unanswered check-backs.
    pub on_exhausted: CheckExhausted,
    /// Rows checked per pass.
    pub batch_size: usize,
    /// Sleep between passes when nothing was due.
    pub poll_interval: Duration,
}

impl Default for CheckerConfig {
    /// First check after 6 s, then every 30 s, 15 checks, then roll back (RocketMQ's
    /// broker defaults); passes of 100 rows every second.
    fn default() -> Self {
        CheckerConfig {
            check_timeout: Duration::from_secs(6),
            check_interval: Duration::from_secs(30),
            max_checks: 15,
            on_exhausted: CheckExhausted::Rollback,
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// What one checker pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Check-backs asked.
    pub checked: u64,
    /// Rows committed (now pending for the relay).
    pub committed: u64,
    /// Rows rolled back (deleted).
    pub rolled_back: u64,
    /// `Unknown` answers (asked again after the interval).
    pub unknown: u64,
    /// Rows whose checks ran out (rolled back or dead as configured).
    pub exhausted: u64,
}

/// Resolves stale prepared rows of one producer group through its [`CheckBack`].
/// Several checkers on one PostgreSQL database share the rows (`SKIP LOCKED`).
#[derive(Clone)]
pub struct Checker {
    store: SqlStore,
    group: Arc<str>,
    check_back: Arc<dyn CheckBack>,
    config: Arc<CheckerConfig>,
    /// Rows whose local transaction is still running in this process: never checked.
    running: Arc<Mutex<HashSet<i64>>>,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("group", &self.group)
            .field("config", &self.config)
            .finish()
    }
}

impl Checker {
    /// A checker for `group`'s prepared rows in `store`.
    pub fn new(
        store: SqlStore,
        group: &str,
        check_back: Arc<dyn CheckBack>,
        config: CheckerConfig,
    ) -> Result<Checker> {
        check_group(group)?;
        Ok(Checker {
            store,
            group: group.into(),
            check_back,
            config: Arc::new(config),
            running: Arc::default(),
        })
    }

    /// One pass: asks the check-back of every due prepared row (up to the batch size) and
    /// applies the answers.
    pub async fn run_once(&self) -> Result<CheckStats> {
        let skip = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let entries = self
            .store
            .claim_checks(
                &self.group,
                self.config.check_interval,
                self.config.batch_size,
                &skip,
            )
            .await?;
        let mut stats = CheckStats::default();
        for entry in entries {
            // The claim counted this check already.
            if entry.checks > self.config.max_checks {
                stats.exhausted += 1;
                metrics::counter!(telemetry::CHECK_BACK_EXHAUSTED, "adapter" => ADAPTER)
                    .increment(1);
                tracing::warn!(
                    message_id = %entry.message.id(),
                    checks = self.config.max_checks,
                    outcome = ?self.config.on_exhausted,
                    "check-backs exhausted"
                );
                match self.config.on_exhausted {
                    CheckExhausted::Rollback => {
                        self.store.rollback_prepared(entry.id).await?;
                    }
                    CheckExhausted::Dead => {
                        let error = format!(
                            "no check-back answer after {} checks",
                            self.config.max_checks
                        );
                        self.store.dead_prepared(entry.id, &error).await?;
                    }
                }
                continue;
            }
            stats.checked += 1;
            match run_check_back(ADAPTER, self.check_back.as_ref(), &entry.message).await {
                TxState::Commit => {
                    if self.store.commit_prepared(entry.id).await? {
                        stats.committed += 1;
                    }
                }
                TxState::Rollback => {
                    if self.store.rollback_prepared(entry.id).await? {
                        stats.rolled_back += 1;
                    }
                }
                TxState::Unknown => stats.unknown += 1,
            }
        }
        Ok(stats)
    }

    /// Runs the checker in the background.
    pub fn spawn(&self) -> Worker {
        let checker = self.clone();
        Worker::spawn(self.config.poll_interval, move || {
            let checker = checker.clone();
            async move {
                match checker.run_once().await {
                    Ok(stats) => {
                        stats.checked + stats.exhausted >= checker.config.batch_size as u64
                    }
                    Err(e) => {
                        tracing::warn!(group = %checker.group, error = %e, "check-back pass failed");
                        false
                    }
                }
            }
        })
    }
}

/// The half-message contract over any [`Publisher`] and this store: RabbitMQ and Kafka
/// (and anything else) get `send_in_transaction` with check-back.
///
/// `send_in_transaction` prepares the message in the store, runs the local transaction,
/// then commits (and publishes at once through the relay's fast path) or deletes the row.
/// `Unknown`, a panic or a crash leaves the row prepared; the [`Checker`]
/// ([`SqlTransactionalPublisher::checker`]) resolves it. A committed message whose fast
/// publish failed stays `PENDING` for the relay: run [`SqlTransactionalPublisher::relay`]
/// (or any relay on the store) in the background.
pub struct SqlTransactionalPublisher {
    publisher: Arc<dyn Publisher>,
    prepared: PreparedMessages,
    group: Arc<str>,
    relay: Relay,
    checker: Checker,
    /// Background loops started by [`SqlTransactionalPublisher::start`]; stopped on drop.
    workers: Mutex<Vec<Worker>>,
}

impl std::fmt::Debug for SqlTransactionalPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlTransactionalPublisher")
            .field("group", &self.group)
            .finish()
    }
}

impl SqlTransactionalPublisher {
    /// A transactional publisher of producer group `group`.
    pub fn new(
        store: SqlStore,
        publisher: Arc<dyn Publisher>,
        group: &str,
        check_back: Arc<dyn CheckBack>,
        checker: CheckerConfig,
        relay: RelayConfig,
    ) -> Result<SqlTransactionalPublisher> {
        let checker = Checker::new(store.clone(), group, check_back, checker)?;
        Ok(SqlTransactionalPublisher {
            relay: Relay::new(store.clone(), publisher.clone(), relay),
            prepared: store.prepared(),
            publisher,
            group: group.into(),
            checker,
            workers: Mutex::default(),
        })
    }

    /// Runs this publisher's checker and relay in the background until it is dropped.
    pub fn start(&self) {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if workers.is_empty() {
            workers.push(self.checker.spawn());
            workers.push(self.relay.spawn());
        }
    }

    /// The checker of this group; it skips rows whose local transaction is still running
    /// in this publisher. Spawn it with [`Checker::spawn`].
    pub fn checker(&self) -> &Checker {
        &self.checker
    }

    /// The relay that publishes committed rows. Spawn it with [`Relay::spawn`].
    pub fn relay(&self) -> &Relay {
        &self.relay
    }
}

impl Drop for SqlTransactionalPublisher {
    fn drop(&mut self) {
        // Like a process exit: rows in flight stay leased or prepared and are resumed by
        // another relay or checker.
        let workers = std::mem::take(self.workers.get_mut().unwrap_or_else(|e| e.into_inner()));
        for worker in workers {
            worker.abort();
        }
    }
}

/// Removes a row from the running set however the local transaction ends.
struct Running<'a>(&'a Mutex<HashSet<i64>>, i64);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

#[async_trait]
impl Publisher for SqlTransactionalPublisher {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.publisher.publish(message).await
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<Result<Receipt>> {
        self.publisher.publish_batch(messages).await
    }
}

#[async_trait]
impl TransactionalPublisher for SqlTransactionalPublisher {
    async fn send_in_transaction(
        &self,
        message: &Message,
        local: LocalTransaction<'_>,
    ) -> Result<TxOutcome> {
        let id = self
            .prepared
            .prepare(&self.group, message, self.checker.config.check_timeout)
            .await?;
        let state = {
            let running = &self.checker.running;
            running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.0);
            let _guard = Running(running, id.0);
            run_local_transaction(message, local).await
        };
        match state {
            TxState::Commit => {
                // Committed and leased to this publisher's relay in one statement, then
                // published at once (the fast path); on a failed publish the row stays
                // pending with its backoff and the relay publishes it. The message is
                // committed for delivery either way.
                let Some(published) = self.relay.commit_prepared(id.0).await? else {
                    // A check-back resolved it first: report what it decided.
                    return Ok(match self.prepared.store.get(message.id()).await? {
                        Some(entry) if entry.state != EntryState::Prepared => {
                            TxOutcome::Committed(Receipt::for_message(message))
                        }
                        Some(_) => TxOutcome::Pending,
                        None => TxOutcome::RolledBack,
                    });
                };
                match published {
                    Ok(stats) if stats.sent == 1 => {}
                    Ok(_) => {
                        tracing::debug!(message_id = %message.id(), "fast publish deferred to the relay")
                    }
                    Err(e) => {
                        tracing::warn!(message_id = %message.id(), error = %e, "fast publish failed; the relay will retry")
                    }
                }
                Ok(TxOutcome::Committed(Receipt::for_message(message)))
            }
            TxState::Rollback => {
                self.prepared.rollback(id).await?;
                Ok(TxOutcome::RolledBack)
            }
            TxState::Unknown => Ok(TxOutcome::Pending),
        }
    }
}
