//! Consumers: manual acks after the handler's outcome, retries through delay queues,
//! dead letters published with confirm before the ack, and a supervisor that
//! re-establishes the channel after the broker or the connection went away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use lapin::Channel;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use surety_core::raw::{ConsumePath, PublishPath, Settle};
use surety_core::{
    Capability, Delivery, Error, ErrorKind, Handler, Message, Result, Subscriber, Subscription,
    SubscriptionHandle, headers,
};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::ADAPTER;
use crate::codec;
use crate::error;
use crate::publisher::publish_confirmed;
use crate::shared::{ConfirmChannel, Connector, record_reconnect};
use crate::topology::{self, Declarer};

pub(crate) struct RabbitSubscriber {
    connector: Arc<Connector>,
}

impl RabbitSubscriber {
    pub(crate) fn new(connector: Arc<Connector>) -> Self {
        RabbitSubscriber { connector }
    }
}

#[async_trait]
impl Subscriber for RabbitSubscriber {
    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn Handler>,
    ) -> Result<SubscriptionHandle> {
        if subscription.ordered {
            // A retry goes through a delay queue and comes back behind later messages;
            // keeping per-key order would need single-active-consumer queues per key
            // hash and in-place retries. Not offered rather than silently unordered (the
            // capability layer refuses it first; this guards direct use of the adapter).
            self.connector
                .capabilities()
                .require(ADAPTER, Capability::OrderingPerKey)?;
        }
        topology::check_destination(&subscription.destination)?;
        topology::validate_group(&subscription.group)?;
        if let Some(dl) = &subscription.dead_letter {
            topology::check_destination(dl)?;
        }
        let queue = topology::group_queue(&subscription.destination, &subscription.group);
        // Declared now, so that an undeclared destination fails here and not in a task.
        let channel = self.connector.channel().await?;
        Declarer {
            channel: &channel,
            config: self.connector.config(),
        }
        .bound_queue(&subscription.destination, &queue)
        .await?;
        let _ = channel.close(200, "OK".into()).await;

        let (stop, stop_rx) = SubscriptionHandle::stop_signal();
        let dead_letter = subscription.dead_letter.clone().unwrap_or_else(|| {
            topology::dead_letter_name(&subscription.destination, &subscription.group)
        });
        let consumer = Arc::new(Consumer {
            path: ConsumePath::new(ADAPTER, &subscription, dead_letter),
            publish: self.connector.publish_path(),
            connector: self.connector.clone(),
            republisher: ConfirmChannel::new(self.connector.clone(), "consumer publish channel"),
            delay_queues: Mutex::new(HashMap::new()),
            subscription,
            queue,
            handler,
        });
        let task = tokio::spawn(consumer.run(stop_rx));
        Ok(SubscriptionHandle::new(stop, vec![task]))
    }
}

struct Consumer {
    path: ConsumePath,
    /// The publish path of the retry copies and dead letters.
    publish: PublishPath,
    connector: Arc<Connector>,
    /// Confirmed publishes of retries and dead letters.
    republisher: ConfirmChannel,
    /// Delay queues declared, and when (a re-declaration renews their expiry lease).
    delay_queues: Mutex<HashMap<Duration, Instant>>,
    subscription: Subscription,
    queue: String,
    handler: Arc<dyn Handler>,
}

/// How long one step of stopping (cancel, close) may take before it is given up.
const STOP_STEP: Duration = Duration::from_secs(5);
/// How long a stopping consumer lets in-flight handlers finish before aborting them (their
/// messages are unacked, so the broker delivers them again).
const STOP_DRAIN: Duration = Duration::from_secs(20);

/// Waits for in-flight handlers up to [`STOP_DRAIN`], then aborts the rest.
async fn drain(inflight: &mut JoinSet<()>) {
    let finished = tokio::time::timeout(STOP_DRAIN, async {
        while inflight.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            adapter = ADAPTER,
            handlers = inflight.len(),
            "in-flight handlers did not finish while stopping; aborted (their messages will be redelivered)"
        );
        inflight.abort_all();
        while inflight.join_next().await.is_some() {}
    }
}

impl Consumer {
    /// The supervisor: runs consuming sessions until stopped, reconnecting with backoff.
    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        // Handlers run as tasks of this set: dropping it (an aborted subscription) aborts
        // them, and the channel they hold closes, so the broker redelivers their messages.
        let mut inflight = JoinSet::new();
        let config = self.connector.config();
        let mut backoff = config.reconnect_min;
        let mut failed = false;
        loop {
            if *stop.borrow() {
                break;
            }
            match self.session(&mut stop, &mut inflight, &mut failed).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(
                        adapter = ADAPTER,
                        queue = %self.queue,
                        error = %e,
                        retry_in = ?backoff,
                        "consumer lost its channel; reconnecting"
                    );
                    if failed {
                        backoff = (backoff * 2).min(config.reconnect_max);
                    } else {
                        // The session had been running: start over from the shortest wait.
                        failed = true;
                        backoff = config.reconnect_min;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
        drain(&mut inflight).await;
    }

    /// A channel with the prefetch set, the queue declared and a consumer on it.
    async fn start_consuming(&self) -> Result<(Channel, lapin::Consumer)> {
        let config = self.connector.config();
        let channel = self.connector.channel().await?;
        let prefetch = self.subscription.concurrency.clamp(1, u16::MAX as usize) as u16;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| error::unavailable("set the prefetch", e))?;
        // Idempotent; after a broker restart the durable queue is there already.
        Declarer {
            channel: &channel,
            config,
        }
        .bound_queue(&self.subscription.destination, &self.queue)
        .await?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| error::topology("start consuming", e))?;
        Ok((channel, consumer))
    }

    /// One channel's life: consume until stopped (`Ok`) or the channel fails (`Err`).
    async fn session(
        self: &Arc<Self>,
        stop: &mut watch::Receiver<bool>,
        inflight: &mut JoinSet<()>,
        failed: &mut bool,
    ) -> Result<()> {
        // Setting up can hang on a connection that is being recovered: a stop must still
        // end it.
        let setup = self.start_consuming();
        let (channel, mut consumer) = tokio::select! {
            started = setup => started?,
            _ = stop.changed() => return Ok(()),
        };
        if std::mem::take(failed) {
            record_reconnect("consumer");
        }
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => {
                    // Stop taking messages, finish what was delivered, then close. Every
                    // step is bounded: on a cut connection the broker never answers, and a
                    // handler's ack may wait on a dead channel. What is not acked by then is
                    // redelivered by the broker once the channel is gone.
                    let _ = tokio::time::timeout(
                        STOP_STEP,
                        channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
                    )
                    .await;
                    while let Ok(Some(Ok(delivery))) =
                        tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
                    {
                        self.spawn(inflight, delivery);
                    }
                    drain(inflight).await;
                    let _ = tokio::time::timeout(STOP_STEP, channel.close(200, "OK".into())).await;
                    return Ok(());
                }
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => self.spawn(inflight, delivery),
                    Some(Err(e)) => return Err(error::unavailable("consume", e)),
                    None => {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            "the broker cancelled the consumer (queue deleted or channel closed)",
                        )
                        .with_context("adapter", ADAPTER)
                        .with_context("queue", self.queue.clone()));
                    }
                },
            }
        }
    }

    fn spawn(self: &Arc<Self>, inflight: &mut JoinSet<()>, delivery: AmqpDelivery) {
        let me = self.clone();
        inflight.spawn(async move { me.process(delivery).await });
    }

    async fn process(&self, amqp: AmqpDelivery) {
        let sub = &self.subscription;
        let lane = codec::Lane::of(amqp.exchange.as_str(), sub.retry.max_attempts);
        let attempt = codec::attempt(&amqp.properties, amqp.redelivered, lane);
        let delivery = Delivery {
            message: codec::decode(&sub.destination, &amqp.properties, &amqp.data, lane),
            attempt,
            group: sub.group.clone(),
        };
        let mut settle = RabbitSettle {
            consumer: self,
            amqp: &amqp,
            message: delivery.message.clone(),
        };
        if amqp.redelivered && attempt > sub.retry.max_attempts {
            // Delivered again and again without ever being settled: the consumer died on
            // it each time. Do not let it crash the next one too.
            let reason = format!(
                "delivered {} times without being settled (the consumer crashed or lost its connection each time)",
                attempt - 1
            );
            self.path
                .give_up(&delivery.message, attempt - 1, reason, &mut settle)
                .await;
        } else {
            self.path
                .deliver(delivery, self.handler.as_ref(), &mut settle)
                .await;
        }
    }

    /// Publishes a copy of `message` that comes back to the group's queue after `after`,
    /// carrying `delivered` (deliveries so far) in the attempt header and the message's id
    /// (which a foreign message without one was given at its first delivery).
    async fn requeue_later(
        &self,
        amqp: &AmqpDelivery,
        message: &Message,
        after: Duration,
        delivered: u32,
    ) -> Result<()> {
        let properties = codec::republish_properties(&amqp.properties, |t| {
            codec::set(t, headers::ATTEMPT, &delivered.to_string())
        })
        .with_message_id(message.id().as_str().into());
        let bucket = topology::delay_bucket(after);
        let queue = if bucket.is_zero() {
            self.queue.clone()
        } else {
            self.delay_queue(bucket).await?
        };
        let result = self
            .publish
            .run(message, &queue, || {
                publish_confirmed(
                    &self.republisher,
                    "",
                    &queue,
                    properties.clone(),
                    &amqp.data,
                )
            })
            .await;
        if !bucket.is_zero()
            && result
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::Unroutable)
        {
            // The delay queue is gone (deleted by hand, or expired): declare it again next time.
            self.lock_delay_queues().remove(&bucket);
        }
        result
    }

    fn lock_delay_queues(&self) -> std::sync::MutexGuard<'_, HashMap<Duration, Instant>> {
        self.delay_queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The delay queue for `bucket`, declared (again) when its expiry lease may be old.
    async fn delay_queue(&self, bucket: Duration) -> Result<String> {
        let config = self.connector.config();
        let fresh = self
            .lock_delay_queues()
            .get(&bucket)
            .is_some_and(|at| at.elapsed() < config.delay_queue_idle / 2);
        if fresh {
            return Ok(topology::delay_queue(&self.queue, bucket));
        }
        let channel = self.connector.channel().await?;
        let name = Declarer {
            channel: &channel,
            config,
        }
        .delay_queue(&self.queue, bucket)
        .await?;
        let _ = channel.close(200, "OK".into()).await;
        self.lock_delay_queues().insert(bucket, Instant::now());
        Ok(name)
    }

    /// Publishes `dead` (built by the consume path), confirmed, through the router. The
    /// original AMQP properties are kept (a foreign producer's content type, reply-to...);
    /// the headers, id and key are the dead letter's own, so what it left out (a header
    /// too big to carry on) stays out and its id is the one the handler saw.
    async fn dead_letter(&self, amqp: &AmqpDelivery, dead: &Message) -> Result<()> {
        let own = codec::encode(dead);
        let properties = codec::republish_properties(&amqp.properties, |t| {
            *t = own.headers().clone().unwrap_or_default();
        })
        .with_message_id(dead.id().as_str().into());
        let router = &self.connector.config().router_exchange;
        self.publish
            .run(dead, dead.destination(), || {
                publish_confirmed(
                    &self.republisher,
                    router,
                    dead.destination(),
                    properties.clone(),
                    &amqp.data,
                )
            })
            .await
    }

    /// Last resort when nothing could be published: keep the message unacked for a while
    /// (no hot loop), then hand it back to the queue.
    async fn hold_then_requeue(&self, amqp: &AmqpDelivery, after: Duration) {
        let wait = after
            .min(self.subscription.retry.max_backoff)
            .max(Duration::from_millis(200));
        tokio::time::sleep(wait).await;
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        if !matches!(amqp.acker.nack(requeue).await, Ok(true)) {
            tracing::debug!("nack failed; the broker redelivers when the channel closes");
        }
    }
}

async fn ack(amqp: &AmqpDelivery) -> Result<()> {
    match amqp.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::new(ErrorKind::Unavailable, "the channel is gone")
            .with_context("adapter", ADAPTER)),
        Err(e) => Err(error::unavailable("ack", e)),
    }
}

/// One delivery being settled on its channel.
struct RabbitSettle<'a> {
    consumer: &'a Consumer,
    amqp: &'a AmqpDelivery,
    message: Message,
}

#[async_trait]
impl Settle for RabbitSettle<'_> {
    async fn ack(&mut self) -> Result<()> {
        ack(self.amqp).await
    }

    /// A copy in the group's delay queue, confirmed, then the ack: a crash in between
    /// duplicates, never loses.
    async fn redeliver(&mut self, after: Duration, next_attempt: u32) -> Result<()> {
        self.consumer
            .requeue_later(self.amqp, &self.message, after, next_attempt - 1)
            .await?;
        if let Err(e) = ack(self.amqp).await {
            tracing::warn!(adapter = ADAPTER, error = %e, "ack after scheduling a retry failed; the broker delivers the original again");
        }
        Ok(())
    }

    async fn dead_letter(&mut self, dead_letter: &Message) -> Result<()> {
        self.consumer.dead_letter(self.amqp, dead_letter).await
    }

    async fn hold(&mut self, after: Duration, _next_attempt: u32) {
        self.consumer.hold_then_requeue(self.amqp, after).await;
    }
}
