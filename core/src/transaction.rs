//! Transactional (half) messages with a check-back listener, and broker-native
//! transactions.
//!
//! The half-message contract: the message is first *prepared* (stored but invisible to
//! consumers), then the caller's local transaction runs, and its answer commits or rolls
//! back the message. If the answer is lost (crash, timeout, `Unknown`), the adapter later
//! asks the producer group's [`CheckBack`] listener whether the local transaction
//! committed, until it answers `Commit` or `Rollback` or the check limit is reached.
//! A rolled-back message is never delivered; a committed one is delivered at least once.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;

use crate::error::Result;
use crate::message::Message;
use crate::publish::{Publisher, Receipt};

/// The state of a local transaction, as the local transaction or the check-back reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxState {
    /// The local transaction committed: deliver the message.
    Commit,
    /// The local transaction rolled back: never deliver the message.
    Rollback,
    /// Not known yet: keep the message prepared and ask again later.
    Unknown,
}

impl TxState {
    /// A stable name for metrics and reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            TxState::Commit => "commit",
            TxState::Rollback => "rollback",
            TxState::Unknown => "unknown",
        }
    }
}

/// What `send_in_transaction` achieved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// The local transaction committed and the message is committed for delivery.
    Committed(Receipt),
    /// The local transaction rolled back and the message was discarded.
    RolledBack,
    /// The outcome is not settled: the message stays prepared and the check-back will
    /// decide.
    Pending,
}

/// The caller's local transaction: a future that runs after the message is prepared and
/// before it is committed or rolled back. Futures are lazy, so nothing in it runs before
/// the prepare succeeded.
pub type LocalTransaction<'a> = Pin<Box<dyn Future<Output = TxState> + Send + 'a>>;

/// Answers "did the local transaction of this message commit?" for messages whose outcome
/// was lost. Registered per producer group: any live producer of the group may be asked,
/// including a new process after the original one died.
///
/// It must answer from durable state (the application's database), never from memory of
/// the process that sent the message.
#[async_trait]
pub trait CheckBack: Send + Sync {
    /// The state of the local transaction that sent `message`.
    async fn check(&self, message: &Message) -> TxState;
}

/// A [`CheckBack`] from an async closure taking the message by value.
pub struct CheckBackFn<F>(F);

/// Wraps an async closure as a [`CheckBack`].
///
/// ```
/// use surety_core::{check_back_fn, Message, TxState};
/// let check = check_back_fn(|message: Message| async move {
///     if message.header("order").is_some() { TxState::Commit } else { TxState::Rollback }
/// });
/// # let _ = check;
/// ```
pub fn check_back_fn<F, Fut>(f: F) -> CheckBackFn<F>
where
    F: Fn(Message) -> Fut + Send + Sync,
    Fut: Future<Output = TxState> + Send,
{
    CheckBackFn(f)
}

#[async_trait]
impl<F, Fut> CheckBack for CheckBackFn<F>
where
    F: Fn(Message) -> Fut + Send + Sync,
    Fut: Future<Output = TxState> + Send,
{
    async fn check(&self, message: &Message) -> TxState {
        (self.0)(message.clone()).await
    }
}

/// A publisher that also offers the half-message contract.
#[async_trait]
pub trait TransactionalPublisher: Publisher {
    /// Prepares `message`, runs `local`, then commits or rolls back the message as `local`
    /// answers. `Unknown`, or a panic in `local`, leaves it prepared for the check-back.
    ///
    /// An error before `local` ran (unroutable destination, broker down) means `local` did
    /// not run and nothing was prepared.
    async fn send_in_transaction(
        &self,
        message: &Message,
        local: LocalTransaction<'_>,
    ) -> Result<TxOutcome>;
}

/// Runs a local transaction inside a [`crate::telemetry::SPAN_LOCAL_TRANSACTION`] span,
/// turning a panic into `Unknown` so that a crash in the caller's code is resolved by the
/// check-back, never silently committed.
pub async fn run_local_transaction(message: &Message, local: LocalTransaction<'_>) -> TxState {
    let span = tracing::info_span!(
        crate::telemetry::SPAN_LOCAL_TRANSACTION,
        message_id = %message.id()
    );
    let run = AssertUnwindSafe(local).catch_unwind();
    match tracing::Instrument::instrument(run, span).await {
        Ok(state) => state,
        Err(panic) => {
            tracing::error!(
                message_id = %message.id(),
                panic = %crate::panic::panic_text(&panic),
                "local transaction panicked; leaving the message to the check-back"
            );
            TxState::Unknown
        }
    }
}

/// How long a check-back may take by default before it counts as `Unknown`.
pub const DEFAULT_CHECK_BACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks a check-back for `adapter`, inside a [`crate::telemetry::SPAN_CHECK_BACK`] span
/// with the message id and destination. A panic, or no answer within `timeout`, is
/// `Unknown` (asked again later) with an error or warning log: one hung check-back never
/// holds up the others behind it for longer than `timeout`.
pub async fn run_check_back(
    adapter: &'static str,
    check_back: &dyn CheckBack,
    message: &Message,
    timeout: Duration,
) -> TxState {
    let span = tracing::info_span!(
        crate::telemetry::SPAN_CHECK_BACK,
        message_id = %message.id(),
        destination = %message.destination(),
    );
    let asked = AssertUnwindSafe(check_back.check(message)).catch_unwind();
    let bounded = tokio::time::timeout(timeout, asked);
    let state = match tracing::Instrument::instrument(bounded, span).await {
        Ok(Ok(state)) => state,
        Ok(Err(panic)) => {
            tracing::error!(
                message_id = %message.id(),
                panic = %crate::panic::panic_text(&panic),
                "check-back panicked; treating as unknown"
            );
            TxState::Unknown
        }
        Err(_) => {
            tracing::warn!(
                adapter,
                message_id = %message.id(),
                timeout_ms = timeout.as_millis() as u64,
                "check-back did not answer in time; treating as unknown"
            );
            TxState::Unknown
        }
    };
    crate::telemetry::record_check_back(adapter, state.as_str());
    state
}

/// A broker-native transaction: messages published in it become visible together on
/// commit, or not at all on abort. Only adapters with
/// [`crate::Capability::BrokerTransactions`] offer it.
#[async_trait]
pub trait BrokerTransaction: Send {
    /// Adds a message to the transaction.
    async fn publish(&mut self, message: &Message) -> Result<()>;
    /// Makes every message of the transaction visible.
    async fn commit(self: Box<Self>) -> Result<()>;
    /// Discards every message of the transaction.
    async fn abort(self: Box<Self>) -> Result<()>;
}
