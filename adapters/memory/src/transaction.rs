//! Half messages with check-back, and atomic broker transactions.

use std::sync::{Arc, Weak};
use std::time::Instant;

use async_trait::async_trait;
use surety_core::raw::{run_check_back, run_local_transaction};
use surety_core::{
    BrokerTransaction, CheckBack, Error, ErrorKind, LocalTransaction, Message, Publisher, Receipt,
    Result, TransactionalPublisher, TxOutcome, TxState, telemetry,
};

use crate::ADAPTER;
use crate::shared::{HalfMessage, Shared};

pub(crate) struct MemoryTransactionalPublisher {
    shared: Arc<Shared>,
    /// The broker's confirmed publisher, for plain publishes.
    publisher: Arc<dyn Publisher>,
    group: String,
    registration: u64,
}

impl MemoryTransactionalPublisher {
    /// Registers `check_back` for `group` and makes sure the checker runs.
    pub(crate) fn register(
        shared: Arc<Shared>,
        publisher: Arc<dyn Publisher>,
        group: &str,
        check_back: Arc<dyn CheckBack>,
    ) -> Self {
        let mut state = shared.lock();
        let registration = state.next_id();
        state
            .check_backs
            .entry(group.to_owned())
            .or_default()
            .push((registration, check_back));
        if !state.checker_running {
            state.checker_running = true;
            tokio::spawn(checker(Arc::downgrade(&shared)));
        }
        drop(state);
        MemoryTransactionalPublisher {
            shared,
            publisher,
            group: group.to_owned(),
            registration,
        }
    }
}

impl Drop for MemoryTransactionalPublisher {
    /// A producer that goes away no longer answers check-backs; another producer of the
    /// group (or a later one) will.
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some(list) = state.check_backs.get_mut(&self.group) {
            list.retain(|(id, _)| *id != self.registration);
        }
    }
}

/// Marks a half message as "local transaction running here", so the checker leaves it
/// alone; cleared when the local transaction ends or its future is dropped (a crash).
struct LocalRunning<'a> {
    shared: &'a Shared,
    id: String,
}

impl Drop for LocalRunning<'_> {
    fn drop(&mut self) {
        if let Some(half) = self.shared.lock().half.get_mut(&self.id) {
            half.local_running = false;
        }
    }
}

#[async_trait]
impl Publisher for MemoryTransactionalPublisher {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.publisher.publish(message).await
    }
}

#[async_trait]
impl TransactionalPublisher for MemoryTransactionalPublisher {
    async fn send_in_transaction(
        &self,
        message: &Message,
        local: LocalTransaction<'_>,
    ) -> Result<TxOutcome> {
        self.shared.check(message)?;
        self.shared.ensure_destination(message.destination())?;
        let id = message.id().as_str().to_owned();
        {
            let mut state = self.shared.lock();
            if state.half.contains_key(&id) {
                return Err(Error::invalid(format!(
                    "a half message with id {id} is already prepared"
                )));
            }
            state.half.insert(
                id.clone(),
                HalfMessage {
                    message: message.clone(),
                    group: self.group.clone(),
                    prepared_at: Instant::now(),
                    checks: 0,
                    local_running: true,
                },
            );
        }
        let running = LocalRunning {
            shared: &self.shared,
            id: id.clone(),
        };
        let state = run_local_transaction(message, local).await;
        drop(running);
        let mut guard = self.shared.lock();
        let outcome = match state {
            TxState::Commit => match guard.half.remove(&id) {
                Some(half) => {
                    TxOutcome::Committed(Shared::publish_locked(&mut guard, &half.message)?)
                }
                None => return Err(resolved_elsewhere(&id)),
            },
            TxState::Rollback => match guard.half.remove(&id) {
                Some(_) => TxOutcome::RolledBack,
                None => return Err(resolved_elsewhere(&id)),
            },
            TxState::Unknown => TxOutcome::Pending,
        };
        drop(guard);
        self.shared.wake();
        Ok(outcome)
    }
}

fn resolved_elsewhere(id: &str) -> Error {
    Error::new(
        ErrorKind::OutcomeUnknown,
        format!("half message {id} was resolved while its local transaction ran"),
    )
    .with_context("adapter", ADAPTER)
}

/// Periodically asks a live producer of each half message's group for its state.
async fn checker(weak: Weak<Shared>) {
    loop {
        let Some(interval) = weak.upgrade().map(|s| s.config.check_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        check_once(&shared).await;
    }
}

async fn check_once(shared: &Shared) {
    let timeout = shared.config.transaction_timeout;
    let due: Vec<(String, Message, Arc<dyn CheckBack>)> = {
        let mut state = shared.lock();
        let now = Instant::now();
        let ids: Vec<String> = state
            .half
            .iter()
            .filter(|(_, h)| !h.local_running && now.duration_since(h.prepared_at) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let mut due = Vec::new();
        for id in ids {
            let group = state.half[&id].group.clone();
            // No live producer of the group: wait for one, without spending a check.
            let Some(check_back) = state
                .check_backs
                .get(&group)
                .and_then(|l| l.first())
                .map(|(_, c)| c.clone())
            else {
                continue;
            };
            let half = state.half.get_mut(&id).expect("id collected above");
            half.checks += 1;
            due.push((id, half.message.clone(), check_back));
        }
        due
    };
    for (id, message, check_back) in due {
        let answer = run_check_back(
            ADAPTER,
            check_back.as_ref(),
            &message,
            shared.config.check_back_timeout,
        )
        .await;
        let mut state = shared.lock();
        match answer {
            TxState::Commit => {
                if let Some(half) = state.half.remove(&id)
                    && let Err(e) = Shared::publish_locked(&mut state, &half.message)
                {
                    tracing::error!(message_id = %id, error = %e, "committing half message failed");
                }
            }
            TxState::Rollback => {
                state.half.remove(&id);
            }
            TxState::Unknown => {
                let exhausted = state
                    .half
                    .get(&id)
                    .is_some_and(|h| h.checks >= shared.config.check_max);
                if exhausted {
                    let half = state.half.remove(&id).expect("checked above");
                    tracing::warn!(
                        message_id = %id,
                        checks = half.checks,
                        "half message discarded after the check-back limit"
                    );
                    metrics::counter!(telemetry::CHECK_BACK_EXHAUSTED, "adapter" => ADAPTER)
                        .increment(1);
                    state.discarded_half.push(half.message);
                }
            }
        }
        drop(state);
        shared.wake();
    }
}

pub(crate) struct MemoryBrokerTransaction {
    shared: Arc<Shared>,
    messages: Vec<Message>,
}

impl MemoryBrokerTransaction {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemoryBrokerTransaction {
            shared,
            messages: Vec::new(),
        }
    }
}

#[async_trait]
impl BrokerTransaction for MemoryBrokerTransaction {
    async fn publish(&mut self, message: &Message) -> Result<()> {
        self.shared.check(message)?;
        self.shared.ensure_destination(message.destination())?;
        self.messages.push(message.clone());
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        {
            let mut state = self.shared.lock();
            // All or nothing: every destination is checked before anything is appended.
            for m in &self.messages {
                Shared::check_destination_locked(&state, m.destination())?;
            }
            for m in &self.messages {
                Shared::publish_locked(&mut state, m)?;
            }
        }
        self.shared.wake();
        Ok(())
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
