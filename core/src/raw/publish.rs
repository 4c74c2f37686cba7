//! The publish path every adapter shares.
//!
//! An adapter implements [`Sender`]: one send to its broker, confirmed, nothing else.
//! [`Publish`] turns it into a [`Publisher`]: it validates the message (the size limit
//! comes from the adapter's [`Capabilities`]), opens the `surety.publish` span, records
//! the publish metrics, retries retryable failures under an optional [`RetryPolicy`]
//! (same message, same id) and names adapter, destination and message in every error.
//!
//! Surety's own writes to a broker (a consumer's retry copy or dead letter, a re-drive)
//! go through [`PublishPath::run`], so they are spanned, counted and retried the same way;
//! they skip the validation, since a message taken off the wire must be movable even
//! when it breaks Surety's own header rules.
//!
//! Metrics, per attempt: `surety_published_total` once, then `surety_confirmed_total`
//! with `surety_publish_seconds`, or `surety_publish_failed_total{kind}`. So
//! published = confirmed + failed at all times, and a publish retried twice before its
//! confirm counts three publishes, two failures and one confirm.

use std::future::Future;
use std::time::Instant;

use async_trait::async_trait;
use tracing::Instrument;

use crate::capability::{Capabilities, Capability};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::publish::{Publisher, Receipt};
use crate::retry::RetryPolicy;
use crate::telemetry;

/// One send to the broker, the part of publishing that differs per adapter.
///
/// Only valid messages reach it; it does not record metrics or open spans.
#[async_trait]
pub trait Sender: Send + Sync + 'static {
    /// Sends `message` and waits for the broker's confirm.
    async fn send(&self, message: &Message) -> Result<Receipt>;

    /// Hands `message` to the client without waiting for a confirm. Called only when the
    /// adapter declares [`Capability::OnewayPublish`].
    async fn send_oneway(&self, message: &Message) -> Result<()> {
        let _ = message;
        Err(Capability::OnewayPublish.unsupported("this adapter"))
    }
}

/// What the publish path of one adapter needs to know: its name, its capabilities (the
/// size limit, oneway) and its publish retries.
#[derive(Clone, Debug)]
pub struct PublishPath {
    adapter: &'static str,
    capabilities: Capabilities,
    retry: Option<RetryPolicy>,
}

impl PublishPath {
    /// The path of `adapter`, without publish retries.
    pub fn new(adapter: &'static str, capabilities: Capabilities) -> Self {
        PublishPath {
            adapter,
            capabilities,
            retry: None,
        }
    }

    /// Retries retryable failures under `policy` (`None`: every failure is returned at
    /// once). A retry publishes the same message with the same id: a duplicate it may
    /// cause is absorbed by the consumer's inbox.
    pub fn with_retry(mut self, policy: Option<RetryPolicy>) -> Self {
        self.retry = policy;
        self
    }

    /// The adapter's name.
    pub fn adapter(&self) -> &'static str {
        self.adapter
    }

    /// Validates `message` against Surety's rules and the adapter's size limit.
    pub fn check(&self, message: &Message) -> Result<()> {
        message.validate(self.capabilities.max_message_size)
    }

    /// Runs `send` (one attempt per call) for `message` bound for `destination`: inside
    /// the publish span, recording each attempt, retrying as the policy allows, with
    /// context on the error. No validation: see the module docs.
    pub async fn run<T, F, Fut>(&self, message: &Message, destination: &str, send: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let span = tracing::debug_span!(
            telemetry::SPAN_PUBLISH,
            message_id = %message.id(),
            destination = %destination
        );
        self.attempts(message, destination, send)
            .instrument(span)
            .await
    }

    /// [`PublishPath::check`], then [`PublishPath::run`]; an invalid message counts as a
    /// failed publish of kind `invalid_message`.
    pub async fn run_checked<T, F, Fut>(&self, message: &Message, send: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let destination = message.destination();
        if let Err(e) = self.check(message) {
            self.record(destination, Err(e.kind()), Instant::now());
            return Err(self.with_context(e, message, destination, 1));
        }
        self.run(message, destination, send).await
    }

    /// Records one attempt whose confirm arrived (or failed) out of band, as a broker
    /// transaction's delivery reports do.
    pub fn record(&self, destination: &str, outcome: Result<(), ErrorKind>, started: Instant) {
        telemetry::record_publish_since(self.adapter, destination, outcome, started);
    }

    async fn attempts<T, F, Fut>(
        &self,
        message: &Message,
        destination: &str,
        mut send: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            let result = send().await;
            self.record(
                destination,
                result.as_ref().map(|_| ()).map_err(Error::kind),
                started,
            );
            match result {
                Ok(value) => return Ok(value),
                Err(e) => {
                    let again = self
                        .retry
                        .as_ref()
                        .filter(|p| e.is_retryable() && p.allows_another(attempt));
                    let Some(policy) = again else {
                        return Err(self.with_context(e, message, destination, attempt));
                    };
                    let delay = policy.delay(attempt);
                    tracing::warn!(
                        adapter = self.adapter,
                        message_id = %message.id(),
                        %destination,
                        attempt,
                        retry_in = ?delay,
                        error = %e,
                        "publish failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Names adapter, destination and message on `e`, unless the adapter did already.
    fn with_context(&self, e: Error, message: &Message, destination: &str, attempts: u32) -> Error {
        let mut e = e;
        if e.context_value("adapter").is_none() {
            e = e.with_context("adapter", self.adapter);
        }
        if e.context_value("destination").is_none() {
            e = e.with_context("destination", destination);
        }
        if e.context_value("message_id").is_none() {
            e = e.with_context("message_id", message.id().as_str());
        }
        if attempts > 1 {
            e = e.with_context("attempts", attempts.to_string());
        }
        e
    }
}

/// A [`Publisher`] made of an adapter's [`Sender`] and the shared [`PublishPath`].
pub struct Publish<S> {
    path: PublishPath,
    sender: S,
}

impl<S: Sender> Publish<S> {
    /// `sender` behind `path`.
    pub fn new(path: PublishPath, sender: S) -> Self {
        Publish { path, sender }
    }

    /// The adapter's sender.
    pub fn sender(&self) -> &S {
        &self.sender
    }

    /// The shared path, for the adapter's own writes.
    pub fn path(&self) -> &PublishPath {
        &self.path
    }
}

#[async_trait]
impl<S: Sender> Publisher for Publish<S> {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.path
            .run_checked(message, || self.sender.send(message))
            .await
    }

    // The default `publish_batch` joins every `publish` future: each sends before any
    // waits, so adapters whose send enqueues first (Kafka) pipeline the whole batch.

    async fn publish_oneway(&self, message: &Message) -> Result<()> {
        self.path
            .capabilities
            .require(self.path.adapter, Capability::OnewayPublish)?;
        self.path.check(message)?;
        self.sender.send_oneway(message).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    /// Fails the first `failures` sends with `kind`, then confirms.
    struct Flaky {
        failures: u32,
        kind: ErrorKind,
        sent: AtomicU32,
        ids: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Sender for Flaky {
        async fn send(&self, message: &Message) -> Result<Receipt> {
            self.ids.lock().unwrap().push(message.id().to_string());
            if self.sent.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(Error::new(self.kind, "broker hiccup"));
            }
            Ok(Receipt::for_message(message))
        }
    }

    fn flaky(failures: u32, kind: ErrorKind) -> Flaky {
        Flaky {
            failures,
            kind,
            sent: AtomicU32::new(0),
            ids: Mutex::new(Vec::new()),
        }
    }

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy::with_max_attempts(attempts)
            .backoff(Duration::from_millis(1), Duration::from_millis(2))
            .jitter(0.0)
    }

    fn path() -> PublishPath {
        PublishPath::new("test", Capabilities::none().with_max_message_size(64))
    }

    #[tokio::test]
    async fn retryable_failures_are_retried_with_the_same_id() {
        let publisher = Publish::new(
            path().with_retry(Some(quick(3))),
            flaky(2, ErrorKind::OutcomeUnknown),
        );
        let message = Message::new("d", "x");
        publisher.publish(&message).await.unwrap();
        let ids = publisher.sender().ids.lock().unwrap().clone();
        assert_eq!(ids, vec![message.id().to_string(); 3]);
    }

    #[tokio::test]
    async fn retries_are_off_by_default_and_bounded_when_on() {
        let off = Publish::new(path(), flaky(1, ErrorKind::Unavailable));
        let e = off.publish(&Message::new("d", "x")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(e.context_value("adapter"), Some("test"));
        assert_eq!(e.context_value("destination"), Some("d"));
        assert_eq!(e.context_value("attempts"), None);

        let bounded = Publish::new(
            path().with_retry(Some(quick(2))),
            flaky(5, ErrorKind::Unavailable),
        );
        let e = bounded.publish(&Message::new("d", "x")).await.unwrap_err();
        assert_eq!(e.context_value("attempts"), Some("2"));
        assert_eq!(bounded.sender().sent.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried() {
        let publisher = Publish::new(
            path().with_retry(Some(quick(5))),
            flaky(5, ErrorKind::Unroutable),
        );
        let e = publisher
            .publish(&Message::new("d", "x"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unroutable);
        assert_eq!(publisher.sender().sent.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn invalid_and_oversized_messages_never_reach_the_sender() {
        let publisher = Publish::new(path(), flaky(0, ErrorKind::Unavailable));
        let big = Message::new("d", vec![0u8; 65]);
        let e = publisher.publish(&big).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidMessage);
        let e = publisher
            .publish(&Message::new("no spaces", "x"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidMessage);
        assert_eq!(publisher.sender().sent.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn oneway_needs_the_capability() {
        let publisher = Publish::new(path(), flaky(0, ErrorKind::Unavailable));
        let e = publisher
            .publish_oneway(&Message::new("d", "x"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }
}
