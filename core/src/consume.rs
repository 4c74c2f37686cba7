//! Ack-after-process consumption with bounded redelivery and dead letters.
//!
//! The adapter calls the [`Handler`], waits for its [`Outcome`], and only then acks,
//! schedules a redelivery or dead-letters the message, the same way on every adapter
//! (`raw::ConsumePath` decides).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::Result;
use crate::message::Message;
use crate::retry::RetryPolicy;

/// One delivery of a message to a consumer.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Which delivery this is for the consumer group, starting at 1. It survives consumer
    /// restarts: the count is kept by the broker or carried in a header.
    pub attempt: u32,
    /// The consumer group receiving it.
    pub group: String,
}

impl Delivery {
    /// Whether the message was delivered before.
    pub fn is_redelivery(&self) -> bool {
        self.attempt > 1
    }
}

/// What the handler decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: ack the message.
    Ack,
    /// Not now: deliver it again after `after` (or the policy's backoff when `None`),
    /// unless the attempts are used up, in which case it is dead-lettered.
    Retry {
        /// Delay before the next delivery.
        after: Option<Duration>,
    },
    /// Never: dead-letter it now with `reason` (a business error retrying cannot fix).
    Reject {
        /// Why, recorded on the dead letter.
        reason: String,
    },
}

impl Outcome {
    /// Retry after the policy's backoff.
    pub fn retry() -> Self {
        Outcome::Retry { after: None }
    }

    /// Retry after `after`.
    pub fn retry_after(after: Duration) -> Self {
        Outcome::Retry { after: Some(after) }
    }

    /// Reject with a reason.
    pub fn reject(reason: impl Into<String>) -> Self {
        Outcome::Reject {
            reason: reason.into(),
        }
    }
}

/// An error a handler returns; it counts as a retry.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Processes deliveries. Returning `Err` or panicking is a retry.
#[async_trait]
pub trait Handler: Send + Sync {
    /// Processes one delivery. The message is acked only after this returns `Ok(Ack)`.
    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandlerError>;
}

/// A [`Handler`] from an async closure taking the delivery by value.
pub struct HandlerFn<F>(F);

/// Wraps an async closure as a [`Handler`].
///
/// ```
/// use surety_core::{handler_fn, Delivery, Outcome};
/// let handler = handler_fn(|delivery: Delivery| async move {
///     println!("got {}", delivery.message.id());
///     Ok(Outcome::Ack)
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Outcome, HandlerError>> + Send,
{
    HandlerFn(f)
}

#[async_trait]
impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Outcome, HandlerError>> + Send,
{
    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandlerError> {
        (self.0)(delivery.clone()).await
    }
}

/// A subscription: which destination, which consumer group, and how to retry.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// The destination to consume.
    pub destination: String,
    /// The consumer group: each group receives every message once; consumers of one group
    /// share the work.
    pub group: String,
    /// Attempts and backoff for this subscription.
    pub retry: RetryPolicy,
    /// How many messages are processed at once (the prefetch).
    pub concurrency: usize,
    /// Keep per-key order: a message waits until earlier messages with its key are
    /// settled, and a retried message holds back later ones with its key.
    pub ordered: bool,
    /// Where exhausted or rejected messages go; `None` uses the adapter's convention
    /// ([`crate::Broker::dead_letter_destination`]).
    pub dead_letter: Option<String>,
}

impl Subscription {
    /// A subscription with the default retry policy, concurrency 8, unordered.
    pub fn new(destination: impl Into<String>, group: impl Into<String>) -> Self {
        Subscription {
            destination: destination.into(),
            group: group.into(),
            retry: RetryPolicy::default(),
            concurrency: 8,
            ordered: false,
            dead_letter: None,
        }
    }

    /// Sets the retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets the concurrency (at least 1).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Asks for per-key ordering.
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Sets the dead-letter destination.
    pub fn dead_letter_to(mut self, destination: impl Into<String>) -> Self {
        self.dead_letter = Some(destination.into());
        self
    }
}

/// Starts consumers.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Starts consuming in the background. Dropping or shutting down the handle stops it.
    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn Handler>,
    ) -> Result<SubscriptionHandle>;
}

/// A running subscription.
pub struct SubscriptionHandle {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl SubscriptionHandle {
    /// A handle over consumer tasks that watch `stop` and end when it turns `true`.
    pub fn new(stop: watch::Sender<bool>, tasks: Vec<JoinHandle<()>>) -> Self {
        SubscriptionHandle { stop, tasks }
    }

    /// A stop signal and its receiver for an adapter's consumer tasks.
    pub fn stop_signal() -> (watch::Sender<bool>, watch::Receiver<bool>) {
        watch::channel(false)
    }

    /// Stops taking new messages and waits until in-flight handlers finished and were
    /// settled.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }

    /// Stops at once, like a crash: in-flight messages are not settled and the broker
    /// delivers them again.
    pub fn abort(mut self) {
        for task in std::mem::take(&mut self.tasks) {
            task.abort();
        }
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
