//! The consume path every adapter shares.
//!
//! An adapter receives a message, builds the [`Delivery`] and hands it to
//! [`ConsumePath::deliver`] with a [`Settle`]: the four things only the adapter can do
//! to the message on its broker. The path runs the handler inside the `surety.consume`
//! span (a panic or an error is a failure, never a crash), turns its outcome into a
//! [`Disposition`] under the subscription's [`RetryPolicy`], and carries it out:
//!
//! - **ack** after success;
//! - **redeliver** after the delay, or **hold** the message (no publish, back after the
//!   longest backoff) when the adapter cannot arrange the redelivery;
//! - **dead-letter**: the dead letter is built here (reason, attempts, origin and group
//!   headers), sent by the adapter with confirm, and only then is the original acked. If
//!   the dead-letter destination is unavailable the message is redelivered after the
//!   longest backoff (or held): neither lost nor hot-looped.
//!
//! Every step is counted (`surety_delivered_total`, `surety_acked_total`,
//! `surety_retried_total`, `surety_dead_lettered_total`,
//! `surety_dead_letter_failed_total`) and every message given up is logged.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use tracing::Instrument;

use crate::consume::{Delivery, Handler, Outcome, Subscription};
use crate::dead_letter::dead_letter_message;
use crate::error::Result;
use crate::message::Message;
use crate::panic::panic_text;
use crate::retry::RetryPolicy;
use crate::telemetry;

/// What an adapter does to a delivered message on its broker.
#[async_trait]
pub trait Settle: Send {
    /// Removes the message from the group's backlog (ack, commit, `CONSUME_SUCCESS`).
    async fn ack(&mut self) -> Result<()>;

    /// Arranges for the message to be delivered again after `after` as attempt
    /// `next_attempt`, and settles this delivery (a delayed copy then an ack, a requeue
    /// with a due time, a retry in place). `Err` when nothing could be arranged: the path
    /// then calls [`Settle::hold`].
    async fn redeliver(&mut self, after: Duration, next_attempt: u32) -> Result<()>;

    /// Sends `dead_letter` (built by the path, addressed to the dead-letter destination)
    /// and waits for the broker's confirm. The path acks the original only after `Ok`.
    async fn dead_letter(&mut self, dead_letter: &Message) -> Result<()>;

    /// The last resort when neither a redelivery nor a dead letter could be sent: keep the
    /// message without writing anything, and let it come back after about `after`.
    async fn hold(&mut self, after: Duration, next_attempt: u32);
}

/// What the adapter must do with a delivery once the handler is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Ack it.
    Ack,
    /// Deliver it again after `after`; the next delivery is attempt `next_attempt`.
    Redeliver {
        /// Delay before the next delivery.
        after: Duration,
        /// The attempt number of the next delivery.
        next_attempt: u32,
    },
    /// Send it to the dead-letter destination, then ack it.
    DeadLetter {
        /// Why.
        reason: String,
        /// How many deliveries it had.
        attempts: u32,
    },
}

/// The consume path of one subscription.
#[derive(Clone, Debug)]
pub struct ConsumePath {
    adapter: &'static str,
    destination: String,
    group: String,
    retry: RetryPolicy,
    dead_letter: String,
}

impl ConsumePath {
    /// The path of `subscription` on `adapter`, whose dead letters go to
    /// `dead_letter_destination` (the subscription's own, or the adapter's convention).
    pub fn new(
        adapter: &'static str,
        subscription: &Subscription,
        dead_letter_destination: impl Into<String>,
    ) -> Self {
        ConsumePath {
            adapter,
            destination: subscription.destination.clone(),
            group: subscription.group.clone(),
            retry: subscription.retry.clone(),
            dead_letter: dead_letter_destination.into(),
        }
    }

    /// The subscription's retry policy.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Where dead letters go.
    pub fn dead_letter_destination(&self) -> &str {
        &self.dead_letter
    }

    /// Runs `handler` on `delivery` and settles the message through `settle`; returns
    /// what was done.
    pub async fn deliver(
        &self,
        delivery: Delivery,
        handler: &dyn Handler,
        settle: &mut (dyn Settle + '_),
    ) -> Disposition {
        telemetry::record_consumed(telemetry::DELIVERED, self.adapter, &self.group);
        let span = self.span(delivery.message.id().as_str(), delivery.attempt);
        let result = run_handler(handler, &delivery)
            .instrument(span.clone())
            .await;
        let disposition = decide(&result, delivery.attempt, &self.retry);
        self.carry_out(&delivery.message, disposition, settle)
            .instrument(span)
            .await
    }

    /// Dead-letters `message` without calling the handler, for a message the adapter
    /// cannot hand to one (it does not decode, or it crashed consumers `attempts` times
    /// without ever being settled). `reason` is recorded on the dead letter.
    pub async fn give_up(
        &self,
        message: &Message,
        attempts: u32,
        reason: String,
        settle: &mut (dyn Settle + '_),
    ) -> Disposition {
        telemetry::record_consumed(telemetry::DELIVERED, self.adapter, &self.group);
        let span = self.span(message.id().as_str(), attempts);
        let disposition = Disposition::DeadLetter { reason, attempts };
        self.carry_out(message, disposition, settle)
            .instrument(span)
            .await
    }

    fn span(&self, message_id: &str, attempt: u32) -> tracing::Span {
        tracing::info_span!(
            telemetry::SPAN_CONSUME,
            message_id = %message_id,
            destination = %self.destination,
            group = %self.group,
            attempt,
        )
    }

    async fn carry_out(
        &self,
        message: &Message,
        disposition: Disposition,
        settle: &mut (dyn Settle + '_),
    ) -> Disposition {
        let done = match disposition {
            Disposition::Ack => {
                self.ack(message, settle).await;
                Disposition::Ack
            }
            Disposition::Redeliver {
                after,
                next_attempt,
            } => self.redeliver(message, after, next_attempt, settle).await,
            Disposition::DeadLetter { reason, attempts } => {
                self.dead_letter(message, reason, attempts, settle).await
            }
        };
        let counter = match &done {
            Disposition::Ack => telemetry::ACKED,
            Disposition::Redeliver { .. } => telemetry::RETRIED,
            Disposition::DeadLetter { .. } => telemetry::DEAD_LETTERED,
        };
        telemetry::record_consumed(counter, self.adapter, &self.group);
        done
    }

    async fn ack(&self, message: &Message, settle: &mut (dyn Settle + '_)) {
        if let Err(e) = settle.ack().await {
            // Not lost: the broker delivers an unacknowledged message again.
            tracing::warn!(
                adapter = self.adapter,
                message_id = %message.id(),
                error = %e,
                "ack failed; the broker will deliver the message again"
            );
        }
    }

    async fn redeliver(
        &self,
        message: &Message,
        after: Duration,
        next_attempt: u32,
        settle: &mut (dyn Settle + '_),
    ) -> Disposition {
        if let Err(e) = settle.redeliver(after, next_attempt).await {
            let after = self.retry.max_backoff;
            tracing::warn!(
                adapter = self.adapter,
                message_id = %message.id(),
                error = %e,
                hold = ?after,
                "cannot schedule the redelivery; the message is held and comes back later"
            );
            settle.hold(after, next_attempt).await;
            return Disposition::Redeliver {
                after,
                next_attempt,
            };
        }
        Disposition::Redeliver {
            after,
            next_attempt,
        }
    }

    async fn dead_letter(
        &self,
        message: &Message,
        reason: String,
        attempts: u32,
        settle: &mut (dyn Settle + '_),
    ) -> Disposition {
        // The origin is the subscription's destination, whatever the message claims: a
        // header must not decide where a message came from.
        let dead = dead_letter_message(message, &self.dead_letter, &self.group, &reason, attempts)
            .with_header(crate::headers::ORIGINAL_DESTINATION, &self.destination);
        match settle.dead_letter(&dead).await {
            Ok(()) => {
                tracing::warn!(
                    adapter = self.adapter,
                    message_id = %message.id(),
                    group = %self.group,
                    dead_letter = %self.dead_letter,
                    attempts,
                    reason = %dead.header(crate::headers::DEAD_LETTER_REASON).unwrap_or_default(),
                    "message dead-lettered"
                );
                self.ack(message, settle).await;
                Disposition::DeadLetter { reason, attempts }
            }
            Err(e) => {
                // Neither lost nor hot-looped: the message comes back after the longest
                // backoff, attempts still counting, and is dead-lettered then.
                tracing::error!(
                    adapter = self.adapter,
                    message_id = %message.id(),
                    group = %self.group,
                    dead_letter = %self.dead_letter,
                    error = %e,
                    "dead-letter destination unavailable; message kept for a later attempt"
                );
                telemetry::record_consumed(
                    telemetry::DEAD_LETTER_FAILED,
                    self.adapter,
                    &self.group,
                );
                let after = self.retry.max_backoff;
                self.redeliver(message, after, attempts.saturating_add(1), settle)
                    .await
            }
        }
    }
}

/// Turns a handler's result on delivery number `attempt` into a [`Disposition`].
pub(crate) fn decide(
    result: &Result<Outcome, HandlerFailure>,
    attempt: u32,
    policy: &RetryPolicy,
) -> Disposition {
    let (after, failure) = match result {
        Ok(Outcome::Ack) => return Disposition::Ack,
        Ok(Outcome::Reject { reason }) => {
            return Disposition::DeadLetter {
                reason: format!("rejected: {reason}"),
                attempts: attempt,
            };
        }
        Ok(Outcome::Retry { after }) => (*after, "handler asked to retry".to_owned()),
        Err(failure) => (None, failure.to_string()),
    };
    if policy.allows_another(attempt) {
        Disposition::Redeliver {
            after: after.unwrap_or_else(|| policy.delay(attempt)),
            next_attempt: attempt + 1,
        }
    } else {
        Disposition::DeadLetter {
            reason: format!("retries exhausted after {attempt} attempts; last: {failure}"),
            attempts: attempt,
        }
    }
}

/// Why a handler did not return an outcome.
#[derive(Debug)]
pub(crate) enum HandlerFailure {
    /// It returned an error.
    Error(String),
    /// It panicked.
    Panic(String),
}

impl std::fmt::Display for HandlerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerFailure::Error(e) => write!(f, "handler error: {e}"),
            HandlerFailure::Panic(p) => write!(f, "handler panicked: {p}"),
        }
    }
}

/// Runs a handler, catching a panic so that it becomes a retry instead of killing the
/// consumer.
pub(crate) async fn run_handler(
    handler: &dyn Handler,
    delivery: &Delivery,
) -> Result<Outcome, HandlerFailure> {
    match AssertUnwindSafe(handler.handle(delivery))
        .catch_unwind()
        .await
    {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(e)) => Err(HandlerFailure::Error(e.to_string())),
        Err(panic) => Err(HandlerFailure::Panic(panic_text(&panic))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::consume::handler_fn;
    use crate::error::{Error, ErrorKind};
    use crate::headers;

    fn policy() -> RetryPolicy {
        RetryPolicy::with_max_attempts(3)
            .backoff(Duration::from_millis(10), Duration::from_millis(100))
            .jitter(0.0)
    }

    #[test]
    fn ack_and_reject() {
        assert_eq!(decide(&Ok(Outcome::Ack), 1, &policy()), Disposition::Ack);
        assert_eq!(
            decide(&Ok(Outcome::reject("bad order")), 1, &policy()),
            Disposition::DeadLetter {
                reason: "rejected: bad order".into(),
                attempts: 1
            }
        );
    }

    #[test]
    fn errors_retry_until_the_limit_then_dead_letter() {
        let err = Err(HandlerFailure::Error("db down".into()));
        assert_eq!(
            decide(&err, 1, &policy()),
            Disposition::Redeliver {
                after: Duration::from_millis(10),
                next_attempt: 2
            }
        );
        match decide(&err, 3, &policy()) {
            Disposition::DeadLetter { reason, attempts } => {
                assert_eq!(attempts, 3);
                assert!(reason.contains("db down"), "{reason}");
            }
            other => panic!("expected dead letter, got {other:?}"),
        }
    }

    #[test]
    fn retry_after_honours_the_delay() {
        assert_eq!(
            decide(
                &Ok(Outcome::retry_after(Duration::from_secs(5))),
                1,
                &policy()
            ),
            Disposition::Redeliver {
                after: Duration::from_secs(5),
                next_attempt: 2
            }
        );
    }

    fn delivery(attempt: u32) -> Delivery {
        Delivery {
            message: Message::new("d", "x"),
            attempt,
            group: "g".into(),
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_failure_not_a_crash() {
        let h = handler_fn(|_d: Delivery| async move {
            if true {
                panic!("boom");
            }
            Ok(Outcome::Ack)
        });
        match run_handler(&h, &delivery(1)).await {
            Err(HandlerFailure::Panic(p)) => assert_eq!(p, "boom"),
            other => panic!("expected panic failure, got {other:?}"),
        }
    }

    /// Records what the path asked for; fails sends as told.
    #[derive(Default)]
    struct Recorder {
        steps: Vec<String>,
        dead_letters: Vec<Message>,
        fail_redeliver: bool,
        fail_dead_letter: bool,
    }

    #[async_trait]
    impl Settle for Recorder {
        async fn ack(&mut self) -> Result<()> {
            self.steps.push("ack".into());
            Ok(())
        }
        async fn redeliver(&mut self, after: Duration, next_attempt: u32) -> Result<()> {
            self.steps
                .push(format!("redeliver {}ms #{next_attempt}", after.as_millis()));
            if self.fail_redeliver {
                return Err(Error::new(ErrorKind::Unavailable, "down"));
            }
            Ok(())
        }
        async fn dead_letter(&mut self, dead_letter: &Message) -> Result<()> {
            self.steps.push("dead_letter".into());
            self.dead_letters.push(dead_letter.clone());
            if self.fail_dead_letter {
                return Err(Error::new(ErrorKind::Unroutable, "no such destination"));
            }
            Ok(())
        }
        async fn hold(&mut self, after: Duration, next_attempt: u32) {
            self.steps
                .push(format!("hold {}ms #{next_attempt}", after.as_millis()));
        }
    }

    fn path() -> ConsumePath {
        ConsumePath::new(
            "test",
            &Subscription::new("orders", "billing").retry(policy()),
            "orders.billing.dlq",
        )
    }

    fn failing() -> Arc<dyn Handler> {
        Arc::new(handler_fn(|_d: Delivery| async move {
            Err::<Outcome, _>("always".into())
        }))
    }

    #[tokio::test]
    async fn a_dead_letter_is_confirmed_before_the_ack() {
        let mut settle = Recorder::default();
        let done = path()
            .deliver(delivery(3), failing().as_ref(), &mut settle)
            .await;
        assert!(matches!(done, Disposition::DeadLetter { attempts: 3, .. }));
        assert_eq!(settle.steps, vec!["dead_letter", "ack"]);
        let dead = &settle.dead_letters[0];
        assert_eq!(dead.destination(), "orders.billing.dlq");
        assert_eq!(dead.header(headers::CONSUMER_GROUP), Some("billing"));
        assert_eq!(dead.header(headers::ORIGINAL_DESTINATION), Some("orders"));
        assert_eq!(dead.header(headers::DEAD_LETTER_ATTEMPTS), Some("3"));
    }

    #[tokio::test]
    async fn a_failed_dead_letter_keeps_the_message_for_the_longest_backoff() {
        let mut settle = Recorder {
            fail_dead_letter: true,
            ..Recorder::default()
        };
        let done = path()
            .deliver(delivery(3), failing().as_ref(), &mut settle)
            .await;
        assert_eq!(
            done,
            Disposition::Redeliver {
                after: Duration::from_millis(100),
                next_attempt: 4
            }
        );
        assert_eq!(settle.steps, vec!["dead_letter", "redeliver 100ms #4"]);
    }

    #[tokio::test]
    async fn when_nothing_can_be_sent_the_message_is_held() {
        let mut settle = Recorder {
            fail_dead_letter: true,
            fail_redeliver: true,
            ..Recorder::default()
        };
        path()
            .deliver(delivery(3), failing().as_ref(), &mut settle)
            .await;
        assert_eq!(
            settle.steps,
            vec!["dead_letter", "redeliver 100ms #4", "hold 100ms #4"]
        );

        let mut settle = Recorder {
            fail_redeliver: true,
            ..Recorder::default()
        };
        path()
            .deliver(delivery(1), failing().as_ref(), &mut settle)
            .await;
        assert_eq!(settle.steps, vec!["redeliver 10ms #2", "hold 100ms #2"]);
    }

    #[tokio::test]
    async fn give_up_dead_letters_without_the_handler() {
        let mut settle = Recorder::default();
        let done = path()
            .give_up(
                &Message::new("d", "x"),
                7,
                "undecodable".into(),
                &mut settle,
            )
            .await;
        assert!(matches!(done, Disposition::DeadLetter { attempts: 7, .. }));
        assert_eq!(settle.steps, vec!["dead_letter", "ack"]);
        assert_eq!(
            settle.dead_letters[0].header(headers::DEAD_LETTER_REASON),
            Some("undecodable")
        );
    }
}
