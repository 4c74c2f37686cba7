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
use surety_core::{
    Delivery, Disposition, Error, ErrorKind, Handler, Result, Subscriber, Subscription,
    SubscriptionHandle, decide, headers, run_handler, telemetry,
};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::ADAPTER;
use crate::codec;
use crate::connection::{ConfirmChannel, Connector, record_reconnect};
use crate::error;
use crate::publisher::publish_confirmed;
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
            // hash and in-place retries. Not offered rather than silently unordered.
            return Err(Error::unsupported(ADAPTER, "ordering per key"));
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
        let consumer = Arc::new(Consumer {
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
        let attempt = codec::attempt(&amqp.properties, amqp.redelivered);
        let delivery = Delivery {
            message: codec::decode(&sub.destination, &amqp.properties, &amqp.data),
            attempt,
            group: sub.group.clone(),
        };
        metrics::counter!(telemetry::DELIVERED, "adapter" => ADAPTER, "group" => sub.group.clone())
            .increment(1);
        let disposition = if amqp.redelivered && attempt > sub.retry.max_attempts {
            // Delivered again and again without ever being settled: the consumer died on
            // it each time. Do not let it crash the next one too.
            Disposition::DeadLetter {
                reason: format!(
                    "delivered {} times without being settled (the consumer crashed or lost its connection each time)",
                    attempt - 1
                ),
                attempts: attempt - 1,
            }
        } else {
            let span = tracing::info_span!(
                "surety.consume",
                message_id = %delivery.message.id(),
                destination = %sub.destination,
                group = %sub.group,
                attempt,
            );
            let result = run_handler(self.handler.as_ref(), &delivery)
                .instrument(span)
                .await;
            decide(&result, attempt, &sub.retry)
        };
        let settled = self.settle(&amqp, &delivery, disposition).await;
        telemetry::record_settled(ADAPTER, &sub.group, &settled);
    }

    /// Carries out a disposition; returns what was actually done.
    async fn settle(
        &self,
        amqp: &AmqpDelivery,
        delivery: &Delivery,
        disposition: Disposition,
    ) -> Disposition {
        let sub = &self.subscription;
        let id = delivery.message.id();
        match disposition {
            Disposition::Ack => {
                ack(amqp).await;
                Disposition::Ack
            }
            Disposition::Redeliver {
                after,
                next_attempt,
            } => {
                match self.requeue_later(amqp, after, next_attempt - 1).await {
                    Ok(()) => ack(amqp).await,
                    Err(e) => {
                        tracing::warn!(message_id = %id, error = %e, "cannot schedule the retry; the message stays unacked");
                        self.hold_then_requeue(amqp, after).await;
                    }
                }
                Disposition::Redeliver {
                    after,
                    next_attempt,
                }
            }
            Disposition::DeadLetter { reason, attempts } => {
                match self.dead_letter(amqp, &reason, attempts).await {
                    Ok(()) => {
                        ack(amqp).await;
                        Disposition::DeadLetter { reason, attempts }
                    }
                    Err(e) => {
                        // Neither lost nor hot-looped: kept in the group's delay queue and
                        // back after the longest backoff, attempts still counting; the
                        // original is acked only once that copy is confirmed.
                        tracing::error!(
                            message_id = %id,
                            error = %e,
                            "dead-letter destination unavailable; message kept for a later attempt"
                        );
                        metrics::counter!(telemetry::DEAD_LETTER_FAILED, "adapter" => ADAPTER)
                            .increment(1);
                        let after = sub.retry.max_backoff;
                        match self.requeue_later(amqp, after, attempts).await {
                            Ok(()) => ack(amqp).await,
                            Err(e) => {
                                tracing::warn!(message_id = %id, error = %e, "cannot keep the message in a delay queue either; it stays unacked");
                                self.hold_then_requeue(amqp, after).await;
                            }
                        }
                        Disposition::Redeliver {
                            after,
                            next_attempt: attempts + 1,
                        }
                    }
                }
            }
        }
    }

    /// Publishes a copy that comes back to the group's queue after `after`, carrying
    /// `delivered` (deliveries so far) in the attempt header.
    async fn requeue_later(
        &self,
        amqp: &AmqpDelivery,
        after: Duration,
        delivered: u32,
    ) -> Result<()> {
        let properties = codec::republish_properties(&amqp.properties, |t| {
            codec::set(t, headers::ATTEMPT, &delivered.to_string())
        });
        let bucket = topology::delay_bucket(after);
        if bucket.is_zero() {
            return publish_confirmed(&self.republisher, "", &self.queue, properties, &amqp.data)
                .await;
        }
        let queue = self.delay_queue(bucket).await?;
        let result = publish_confirmed(&self.republisher, "", &queue, properties, &amqp.data).await;
        if result
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

    /// Publishes the dead letter, confirmed, through the router.
    async fn dead_letter(&self, amqp: &AmqpDelivery, reason: &str, attempts: u32) -> Result<()> {
        let sub = &self.subscription;
        let target = sub
            .dead_letter
            .clone()
            .unwrap_or_else(|| topology::dead_letter_name(&sub.destination, &sub.group));
        let properties = codec::republish_properties(&amqp.properties, |t| {
            *t = codec::reset_counts(t);
            codec::set(t, headers::DEAD_LETTER_REASON, &sanitize(reason));
            codec::set(t, headers::DEAD_LETTER_ATTEMPTS, &attempts.to_string());
            codec::set(t, headers::ORIGINAL_DESTINATION, &sub.destination);
            codec::set(t, headers::CONSUMER_GROUP, &sub.group);
        });
        let router = &self.connector.config().router_exchange;
        publish_confirmed(&self.republisher, router, &target, properties, &amqp.data).await
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

async fn ack(amqp: &AmqpDelivery) {
    match amqp.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) | Err(_) => tracing::warn!(
            adapter = ADAPTER,
            "ack failed (channel gone); the broker will deliver the message again"
        ),
    }
}

/// Header values carry no control characters; handler errors may.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect()
}
