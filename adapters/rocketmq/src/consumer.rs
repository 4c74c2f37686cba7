//! Push consumers with ack after process.
//!
//! The client's listeners are synchronous and run on its blocking lane. Each delivery is
//! handed to an async task on the application's runtime (core's `ConsumePath`), and
//! the lane thread waits for its verdict: the runtime never blocks, and a task that is
//! aborted or panics closes the channel, which is a `ReconsumeLater`, never a success.
//!
//! Each Surety group gets one RocketMQ consumer group per destination,
//! `<group>|<destination>` ([`codec::consumer_group`]), so its retry topic
//! (`%RETRY%<group>|<destination>`) and dead-letter topic hold only that destination's
//! messages.
//!
//! Dispositions:
//! - `Ack` → `CONSUME_SUCCESS`.
//! - `Redeliver` → a copy goes to the retry topic with a delay level (the smallest level
//!   not shorter than the asked delay; delays under the shortest level, 1 s, are waited
//!   out before requeueing) and the next attempt number in `surety-attempt`,
//!   confirmed, then the original is acked. The client's listener cannot set
//!   `delayLevelWhenNextConsume` (its context is passed by shared reference), and the
//!   broker's default delays (10 s, 30 s, 1 min...) would ignore the policy; see
//!   `docs/rocketmq-interop.md`. If the copy cannot be sent, `RECONSUME_LATER` (the
//!   broker's own send-back) keeps the message.
//! - `DeadLetter` → Surety publishes the message to the dead-letter destination
//!   (`%DLQ%<group>|<destination>` by default) with reason, attempts, origin and group headers, then
//!   acks. If that fails the message is kept and redelivered after the longest backoff.
//! - Orderly subscriptions (`ordered`) use the client's orderly consumer (queue locks on
//!   the broker, one message of a queue at a time); a retry suspends the queue for the
//!   delay, which holds back later messages of the key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rocketmq_client_rust::{
    ClientResult, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, ConsumeOrderlyContext,
    ConsumeOrderlyStatus, DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently,
    MessageListenerOrderly,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use surety_core::raw::{ConsumePath, Settle};
use surety_core::{
    Delivery, Handler, Message, Result, Subscriber, Subscription, SubscriptionHandle, headers,
};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::ADAPTER;
use crate::codec::{self, DELAY_PROPERTY, DLQ_PREFIX, RETRY_PREFIX, RETRY_TOPIC_PROPERTY};
use crate::error::admin_error;
use crate::publisher::RocketMqPublisher;
use crate::shared::Shared;

/// How many broker-side reconsumes beyond the policy are allowed before the broker moves
/// a message to its own `%DLQ%` topic of the consumer group. Surety dead-letters itself at `max_attempts`;
/// this backstop only applies when Surety could neither dead-letter nor requeue.
const BROKER_BACKSTOP: u32 = 16;

/// How long a stopping subscription lets in-flight handlers settle before the client is
/// shut down (what is unsettled then is delivered again).
const STOP_DRAIN: Duration = Duration::from_secs(30);

/// Starts push consumers on the broker.
pub(crate) struct RocketMqSubscriber {
    shared: Arc<Shared>,
    publisher: Arc<RocketMqPublisher>,
}

impl RocketMqSubscriber {
    pub(crate) fn new(shared: Arc<Shared>, publisher: Arc<RocketMqPublisher>) -> Self {
        RocketMqSubscriber { shared, publisher }
    }
}

/// What the listener tells the client.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    Success,
    Later(Duration),
}

struct Runner {
    publisher: Arc<RocketMqPublisher>,
    /// The RocketMQ consumer group, `<group>|<destination>`.
    consumer_group: String,
    handler: Arc<dyn Handler>,
    sub: Subscription,
    path: ConsumePath,
    app: tokio::runtime::Handle,
    /// Set when the subscription stops: new deliveries are given back, not handled.
    stopped: AtomicBool,
    inflight: Mutex<HashMap<u64, AbortHandle>>,
    seq: AtomicU64,
}

impl Runner {
    /// Called on the client's blocking lane: hand the delivery to the runtime and wait.
    fn consume_blocking(self: &Arc<Self>, msg: &MessageExt, ordered: bool) -> Verdict {
        let fallback = Verdict::Later(self.sub.retry.max_backoff);
        if self.stopped.load(Ordering::SeqCst) {
            return fallback;
        }
        let (tx, rx) = oneshot::channel();
        let id = self.seq.fetch_add(1, Ordering::Relaxed);
        let runner = self.clone();
        let msg = msg.clone();
        let task = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.app.spawn(async move {
                let verdict = runner.process(&msg, ordered).await;
                let _ = tx.send(verdict);
            })
        }));
        let Ok(task) = task else {
            // The application's runtime is gone.
            return fallback;
        };
        self.inflight
            .lock()
            .unwrap()
            .insert(id, task.abort_handle());
        let verdict = rx.blocking_recv().unwrap_or(fallback);
        self.inflight.lock().unwrap().remove(&id);
        verdict
    }

    async fn process(&self, msg: &MessageExt, ordered: bool) -> Verdict {
        let lane = codec::Lane::of(msg, &self.sub.destination, self.sub.retry.max_attempts);
        match codec::decode(msg, lane) {
            Ok((message, attempt)) => {
                let mut settle = RocketSettle::new(self, &message, ordered);
                let delivery = Delivery {
                    message: message.clone(),
                    attempt,
                    group: self.sub.group.clone(),
                };
                self.path
                    .deliver(delivery, self.handler.as_ref(), &mut settle)
                    .await;
                settle.verdict
            }
            Err(e) => {
                // Not a message Surety can hand to a handler: dead-letter it as it is.
                let raw = Message::new(msg.topic().to_string(), msg.body().unwrap_or_default());
                let mut settle = RocketSettle::new(self, &raw, ordered);
                let reason = format!("undecodable message: {}", e.message());
                self.path.give_up(&raw, 1, reason, &mut settle).await;
                settle.verdict
            }
        }
    }

    /// Sends a copy to the group's retry topic, delayed, carrying the next attempt number.
    async fn requeue(&self, message: &Message, after: Duration, next_attempt: u32) -> Result<()> {
        let retry_topic = format!("{RETRY_PREFIX}{}", self.consumer_group);
        let mut extra = vec![
            (RETRY_TOPIC_PROPERTY, message.destination().to_owned()),
            (headers::ATTEMPT, next_attempt.to_string()),
        ];
        if after < codec::SHORTEST_DELAY_LEVEL {
            // Shorter than the broker's shortest delay level (1 s): wait here, holding the
            // unacked original, then requeue for immediate delivery.
            tokio::time::sleep(after).await;
        } else {
            extra.push((DELAY_PROPERTY, codec::delay_level(after).to_string()));
        }
        self.publisher
            .publish_to(message, &retry_topic, &extra)
            .await
            .map(|_| ())
    }

    /// Deliveries handed to a handler and not yet answered to the client.
    fn in_flight(&self) -> usize {
        self.inflight.lock().unwrap().len()
    }

    fn abort_inflight(&self) {
        for (_, task) in self.inflight.lock().unwrap().drain() {
            task.abort();
        }
    }
}

/// One message being settled: what the listener will tell the client.
struct RocketSettle<'a> {
    runner: &'a Runner,
    message: &'a Message,
    ordered: bool,
    verdict: Verdict,
}

impl<'a> RocketSettle<'a> {
    fn new(runner: &'a Runner, message: &'a Message, ordered: bool) -> Self {
        RocketSettle {
            runner,
            message,
            ordered,
            // Until settled, the message is the broker's to deliver again.
            verdict: Verdict::Later(runner.sub.retry.max_backoff),
        }
    }
}

#[async_trait]
impl Settle for RocketSettle<'_> {
    async fn ack(&mut self) -> Result<()> {
        self.verdict = Verdict::Success;
        Ok(())
    }

    /// Unordered: a delayed copy in `%RETRY%<group>`, then the ack. Ordered: the queue is
    /// suspended for the delay and the message delivered again in place.
    async fn redeliver(&mut self, after: Duration, next_attempt: u32) -> Result<()> {
        if self.ordered {
            self.verdict = Verdict::Later(after);
            return Ok(());
        }
        self.runner
            .requeue(self.message, after, next_attempt)
            .await?;
        self.verdict = Verdict::Success;
        Ok(())
    }

    async fn dead_letter(&mut self, dead_letter: &Message) -> Result<()> {
        self.runner
            .publisher
            .publish_to(dead_letter, dead_letter.destination(), &[])
            .await
            .map(|_| ())
    }

    /// The broker's own send-back (`RECONSUME_LATER`), or a suspended queue when ordered.
    async fn hold(&mut self, after: Duration, _next_attempt: u32) {
        self.verdict = Verdict::Later(after);
    }
}

struct Concurrent(Arc<Runner>);

impl MessageListenerConcurrently for Concurrent {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        // Batch size is 1; with more, any failure gives the whole batch back.
        let mut status = ConsumeConcurrentlyStatus::ConsumeSuccess;
        for msg in msgs {
            if let Verdict::Later(_) = self.0.consume_blocking(msg, false) {
                status = ConsumeConcurrentlyStatus::ReconsumeLater;
            }
        }
        Ok(status)
    }
}

struct Orderly(Arc<Runner>);

impl MessageListenerOrderly for Orderly {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        context: &mut ConsumeOrderlyContext,
    ) -> ClientResult<ConsumeOrderlyStatus> {
        for msg in msgs {
            if let Verdict::Later(after) = self.0.consume_blocking(msg, true) {
                context.set_suspend_current_queue_time_millis(after.as_millis().max(10) as i64);
                return Ok(ConsumeOrderlyStatus::SuspendCurrentQueueAMoment);
            }
        }
        Ok(ConsumeOrderlyStatus::Success)
    }
}

/// Owns the client consumer for the subscription's lifetime. Dropped without a graceful
/// stop (the task was aborted: a crash), it gives in-flight messages back to the broker
/// and shuts the consumer down so that the group rebalances to live consumers.
struct Guard {
    consumer: Option<DefaultMQPushConsumer>,
    runner: Arc<Runner>,
    host: tokio::runtime::Handle,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut consumer) = self.consumer.take() {
            self.runner.stopped.store(true, Ordering::SeqCst);
            self.runner.abort_inflight();
            self.host.spawn(async move {
                // Let the client send the given-back messages to the broker first.
                tokio::time::sleep(Duration::from_millis(500)).await;
                consumer.shutdown().await;
            });
        }
    }
}

#[async_trait]
impl Subscriber for RocketMqSubscriber {
    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn Handler>,
    ) -> Result<SubscriptionHandle> {
        codec::validate_topic(&subscription.destination)?;
        let consumer_group = codec::consumer_group(&subscription.group, &subscription.destination)?;
        let shared = &self.shared;
        let ordered = subscription.ordered;
        let concurrency = subscription.concurrency.max(1) as u32;
        let max_reconsume = subscription
            .retry
            .max_attempts
            .saturating_add(BROKER_BACKSTOP);
        let dead_letter = subscription
            .dead_letter
            .clone()
            .unwrap_or_else(|| format!("{DLQ_PREFIX}{consumer_group}"));
        let runner = Arc::new(Runner {
            publisher: self.publisher.clone(),
            consumer_group: consumer_group.clone(),
            handler,
            path: ConsumePath::new(ADAPTER, &subscription, dead_letter),
            sub: subscription.clone(),
            app: tokio::runtime::Handle::current(),
            stopped: AtomicBool::new(false),
            inflight: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
        });
        let mut builder = DefaultMQPushConsumer::builder(shared.host.runtime.clone())
            .client_config(shared.client_config("consumer"))
            .name_server_addr(shared.config.namesrv.as_str())
            .consumer_group(consumer_group.as_str())
            // A group declared before publishing sees every message since its topic
            // was created, even when its first consumer starts later.
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            .consume_thread_min(concurrency)
            .consume_thread_max(concurrency)
            .consume_message_batch_max_size(1)
            .max_reconsume_times(max_reconsume.min(i32::MAX as u32) as i32)
            .consume_timeout(shared.config.handler_timeout.as_secs().div_ceil(60).max(1))
            .await_termination_millis_when_shutdown(30_000);
        if let Some(hook) = shared.rpc_hook() {
            builder = builder.rpc_hook(Some(hook));
        }
        let mut consumer = builder.build();
        consumer
            .subscribe(subscription.destination.as_str(), "*")
            .await
            .map_err(|e| admin_error(&e, "subscribe"))?;
        if ordered {
            consumer.register_message_listener_orderly(Orderly(runner.clone()));
        } else {
            consumer.register_message_listener_concurrently(Concurrent(runner.clone()));
        }
        consumer.start().await.map_err(|e| {
            admin_error(&e, "consumer start").with_context("group", consumer_group.clone())
        })?;
        let mut guard = Guard {
            consumer: Some(consumer),
            runner,
            host: shared.host.handle.clone(),
        };
        let (stop, mut stopped) = SubscriptionHandle::stop_signal();
        let task = tokio::spawn(async move {
            while !*stopped.borrow() {
                if stopped.changed().await.is_err() {
                    break;
                }
            }
            guard.runner.stopped.store(true, Ordering::SeqCst);
            // Handlers already running settle while the client still owns its queues: a
            // result that arrives after the client dropped a queue at shutdown is not
            // recorded, and the message comes back with the attempt count it had (seen
            // once under load: a retried message redelivered as the same attempt).
            let deadline = tokio::time::Instant::now() + STOP_DRAIN;
            while guard.runner.in_flight() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The client records a result right after the listener returns it.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(mut consumer) = guard.consumer.take() {
                let _ = tokio::time::timeout(Duration::from_secs(40), consumer.shutdown()).await;
            }
        });
        Ok(SubscriptionHandle::new(stop, vec![task]))
    }
}
