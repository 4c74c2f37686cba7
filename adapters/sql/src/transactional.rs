//! The half-message contract over any publisher and this store: prepare a row, run the
//! local transaction, then commit (and publish at once through the relay's fast path) or
//! roll back; rows left prepared go to the checker.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use surety_core::raw::run_local_transaction;
use surety_core::{
    CheckBack, LocalTransaction, Message, Publisher, Receipt, Result, TransactionalPublisher,
    TxOutcome, TxState,
};

use crate::backend::Backend;
use crate::checker::{Checker, CheckerConfig};
use crate::entry::EntryState;
use crate::prepared::PreparedMessages;
use crate::relay::{Relay, RelayConfig};
use crate::store::SqlStore;
use crate::worker::Worker;

/// The half-message contract over any [`Publisher`] and this store: RabbitMQ and Kafka
/// (and anything else) get `send_in_transaction` with check-back.
///
/// `send_in_transaction` prepares the message in the store, runs the local transaction,
/// then commits (and publishes at once through the relay's fast path) or deletes the row.
/// `Unknown`, a panic or a crash leaves the row prepared; the [`Checker`]
/// ([`SqlTransactionalPublisher::checker`]) resolves it. A committed message whose fast
/// publish failed stays `PENDING` for the relay: run [`SqlTransactionalPublisher::relay`]
/// (or any relay on the store) in the background.
pub struct SqlTransactionalPublisher<DB: Backend> {
    publisher: Arc<dyn Publisher>,
    prepared: PreparedMessages<DB>,
    group: Arc<str>,
    relay: Relay<DB>,
    checker: Checker<DB>,
    /// Background loops started by [`SqlTransactionalPublisher::start`]; stopped on drop.
    workers: Mutex<Vec<Worker>>,
}

impl<DB: Backend> std::fmt::Debug for SqlTransactionalPublisher<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlTransactionalPublisher")
            .field("group", &self.group)
            .finish()
    }
}

impl<DB: Backend> SqlTransactionalPublisher<DB> {
    /// A transactional publisher of producer group `group`.
    pub fn new(
        store: SqlStore<DB>,
        publisher: Arc<dyn Publisher>,
        group: &str,
        check_back: Arc<dyn CheckBack>,
        checker: CheckerConfig,
        relay: RelayConfig,
    ) -> Result<Self> {
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
    pub fn checker(&self) -> &Checker<DB> {
        &self.checker
    }

    /// The relay that publishes committed rows. Spawn it with [`Relay::spawn`].
    pub fn relay(&self) -> &Relay<DB> {
        &self.relay
    }
}

impl<DB: Backend> Drop for SqlTransactionalPublisher<DB> {
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
impl<DB: Backend> Publisher for SqlTransactionalPublisher<DB> {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.publisher.publish(message).await
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<Result<Receipt>> {
        self.publisher.publish_batch(messages).await
    }
}

#[async_trait]
impl<DB: Backend> TransactionalPublisher for SqlTransactionalPublisher<DB> {
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
                    return Ok(
                        match self.prepared.store.outbox().get(message.id()).await? {
                            Some(entry) if entry.state != EntryState::Prepared => {
                                TxOutcome::Committed(Receipt::for_message(message))
                            }
                            Some(_) => TxOutcome::Pending,
                            None => TxOutcome::RolledBack,
                        },
                    );
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
