//! Read-committed consumers that commit offsets only after the handler settled.
//!
//! One consumer per subscription, polled by its own thread (librdkafka's calls block, and
//! the rebalance callback must be able to wait). The thread hands each partition's
//! records to a *lane*: a task that processes that partition in order, one record at a
//! time, and commits its offsets. Lanes of different partitions run in parallel, up to
//! the subscription's concurrency.
//!
//! Attempts survive crashes: before a record is handed to the handler, its lane commits
//! the record's own offset (which also acks everything before it) with the metadata
//! `"<offset>:<deliveries>"`. A consumer that later resumes at that offset reads the
//! metadata and knows the record was delivered before.
//!
//! Rebalances: when partitions are revoked, the callback stops their lanes, waits for
//! their in-flight handler to settle and commit (bounded by
//! `rebalance_drain_timeout`), then closes each lane's commit gate, so a late lane can
//! never commit a partition another consumer owns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use surety_core::raw::{ConsumePath, PublishPath, Settle};
use surety_core::{
    Delivery, Error, ErrorKind, Handler, HandlerError, Message, Outcome, Result, Subscriber,
    Subscription, SubscriptionHandle,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::AbortHandle;

use crate::ADAPTER;
use crate::codec::{decode, retry_message};
use crate::config::create;
use crate::shared::{Inner, blocking, dead_letter_topic, retry_topic, validate_topic};

/// A lane pauses its partition when this many records wait, and resumes it below
/// `LOW_WATER`, so a slow partition does not fill memory or stall the others.
const HIGH_WATER: usize = 500;
const LOW_WATER: usize = 100;

pub(crate) struct KafkaSubscriber {
    inner: Arc<Inner>,
}

impl KafkaSubscriber {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        KafkaSubscriber { inner }
    }
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn Handler>,
    ) -> Result<SubscriptionHandle> {
        let source = subscription.destination.clone();
        validate_topic(&source)?;
        if let Err(e) = self.inner.check_topic(&source).await {
            return Err(if e.kind() == ErrorKind::Unroutable {
                Error::new(
                    ErrorKind::Configuration,
                    format!("destination {source:?} is not declared"),
                )
                .with_context("adapter", ADAPTER)
            } else {
                e
            });
        }
        // The retry topic belongs to the group: make sure it exists even if the group
        // was never declared (a reader of a dead-letter topic, say).
        let retry_topic = retry_topic(&source, &subscription.group);
        if self.inner.check_topic(&retry_topic).await.is_err() {
            self.inner
                .create_topics(std::slice::from_ref(&retry_topic))
                .await?;
        }
        let dead_letter = subscription
            .dead_letter
            .clone()
            .unwrap_or_else(|| dead_letter_topic(&source, &subscription.group));

        let (stop, stop_rx) = SubscriptionHandle::stop_signal();
        let core = Arc::new(Core {
            inner: self.inner.clone(),
            path: ConsumePath::new(ADAPTER, &subscription, dead_letter),
            publish: self.inner.publish_path(),
            handler: Arc::new(Permitted {
                handler,
                permits: Semaphore::new(subscription.concurrency.max(1)),
            }),
            subscription,
            retry_topic: retry_topic.clone(),
            lanes: Mutex::default(),
            crashed: AtomicBool::new(false),
            stop: stop_rx.clone(),
        });
        let config = self.inner.config.consumer(&core.subscription.group);
        let consumer: BaseConsumer<Ctx> = create("consumer", || {
            config.create_with_context(Ctx { core: core.clone() })
        })?;
        consumer
            .subscribe(&[source.as_str(), retry_topic.as_str()])
            .map_err(|e| {
                Error::new(ErrorKind::Configuration, "cannot subscribe")
                    .with_context("adapter", ADAPTER)
                    .with_source(e)
            })?;
        let consumer = Arc::new(consumer);
        let runtime = tokio::runtime::Handle::current();
        let poller = {
            let core = core.clone();
            tokio::task::spawn_blocking(move || poll_loop(core, consumer, runtime))
        };
        let supervisor = tokio::spawn(async move {
            // Dropped without finishing (the handle was aborted): behave like a crash.
            let guard = CrashGuard(Some(core));
            let _ = poller.await;
            guard.disarm();
        });
        Ok(SubscriptionHandle::new(stop, vec![supervisor]))
    }
}

/// Marks the subscription crashed and kills its lanes when the supervisor task is
/// aborted: nothing is settled or committed after that.
struct CrashGuard(Option<Arc<Core>>);

impl CrashGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CrashGuard {
    fn drop(&mut self) {
        if let Some(core) = self.0.take() {
            core.crashed.store(true, Ordering::SeqCst);
            for lane in core
                .lanes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
            {
                lane.abort.abort();
            }
        }
    }
}

struct Core {
    inner: Arc<Inner>,
    subscription: Subscription,
    path: ConsumePath,
    /// The publish path of retry copies and dead letters.
    publish: PublishPath,
    handler: Arc<Permitted>,
    retry_topic: String,
    lanes: Mutex<HashMap<(String, i32), LaneEntry>>,
    crashed: AtomicBool,
    stop: watch::Receiver<bool>,
}

impl Core {
    fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    fn stopping(&self) -> bool {
        self.crashed() || *self.stop.borrow()
    }

    /// Stops `lanes`, waits for their in-flight record to settle, then closes their
    /// commit gates.
    fn drain(&self, lanes: Vec<LaneEntry>) {
        for lane in &lanes {
            lane.gate.revoked.store(true, Ordering::SeqCst);
        }
        let deadline = Instant::now() + self.inner.config.rebalance_drain_timeout;
        while !self.crashed()
            && Instant::now() < deadline
            && lanes
                .iter()
                .any(|l| !l.gate.finished.load(Ordering::SeqCst))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        for lane in lanes {
            *lane.gate.assigned.lock().unwrap_or_else(|e| e.into_inner()) = false;
            if !lane.gate.finished.load(Ordering::SeqCst) {
                tracing::warn!(
                    topic = %lane.key.0,
                    partition = lane.key.1,
                    "a handler did not settle before its partition was revoked; its record will be delivered again"
                );
                lane.abort.abort();
            }
        }
    }
}

struct LaneEntry {
    key: (String, i32),
    tx: mpsc::UnboundedSender<OwnedMessage>,
    queued: Arc<AtomicUsize>,
    gate: Arc<Gate>,
    paused: bool,
    abort: AbortHandle,
}

/// What a lane and the rebalance callback share.
#[derive(Default)]
struct Gate {
    /// Held while committing; `false` once the partition is revoked.
    assigned: Mutex<bool>,
    revoked: AtomicBool,
    finished: AtomicBool,
}

struct Ctx {
    core: Arc<Core>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked: Vec<LaneEntry> = {
                    let mut lanes = self.core.lanes.lock().unwrap_or_else(|e| e.into_inner());
                    tpl.elements()
                        .iter()
                        .filter_map(|e| lanes.remove(&(e.topic().to_owned(), e.partition())))
                        .collect()
                };
                self.core.drain(revoked);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "Kafka rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // A partition paused by an earlier owner lane must flow again.
            let _ = consumer.resume(tpl);
        }
    }
}

fn poll_loop(core: Arc<Core>, consumer: Arc<BaseConsumer<Ctx>>, runtime: tokio::runtime::Handle) {
    let mut last_error: Option<Instant> = None;
    while !core.stopping() {
        flow_control(&core, &consumer);
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => dispatch(&core, &consumer, &runtime, m.detach()),
            Some(Err(e)) if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) => {
                tracing::warn!(error = %e, group = %core.subscription.group, "Kafka consumer error");
                last_error = Some(Instant::now());
            }
            Some(Err(_)) => {}
        }
    }
    if !core.crashed() {
        // Graceful: let in-flight handlers settle and commit before leaving the group.
        let lanes: Vec<LaneEntry> = core
            .lanes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, l)| l)
            .collect();
        core.drain(lanes);
    }
    // Leaving the group (in Drop) lets the partitions move at once. Lanes may still hold
    // a clone for a moment; wait a little so the close happens on this thread.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Arc::strong_count(&consumer) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(consumer);
}

fn partition_list(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

fn flow_control(core: &Core, consumer: &BaseConsumer<Ctx>) {
    let mut lanes = core.lanes.lock().unwrap_or_else(|e| e.into_inner());
    for lane in lanes.values_mut() {
        if lane.paused
            && lane.queued.load(Ordering::SeqCst) < LOW_WATER
            && consumer
                .resume(&partition_list(&lane.key.0, lane.key.1))
                .is_ok()
        {
            lane.paused = false;
        }
    }
}

fn dispatch(
    core: &Arc<Core>,
    consumer: &Arc<BaseConsumer<Ctx>>,
    runtime: &tokio::runtime::Handle,
    record: OwnedMessage,
) {
    let key = (record.topic().to_owned(), record.partition());
    let mut lanes = core.lanes.lock().unwrap_or_else(|e| e.into_inner());
    let lane = lanes.entry(key.clone()).or_insert_with(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        let gate = Arc::new(Gate {
            assigned: Mutex::new(true),
            ..Gate::default()
        });
        let queued = Arc::new(AtomicUsize::new(0));
        let lane = Lane {
            core: core.clone(),
            consumer: consumer.clone(),
            topic: key.0.clone(),
            partition: key.1,
            gate: gate.clone(),
            queued: queued.clone(),
            rx,
            pending_ack: None,
        };
        let task = runtime.spawn(lane.run());
        LaneEntry {
            key: key.clone(),
            tx,
            queued,
            gate,
            paused: false,
            abort: task.abort_handle(),
        }
    });
    let queued = lane.queued.fetch_add(1, Ordering::SeqCst) + 1;
    if lane.tx.send(record).is_err() {
        lane.queued.fetch_sub(1, Ordering::SeqCst);
    }
    if queued >= HIGH_WATER
        && !lane.paused
        && consumer.pause(&partition_list(&key.0, key.1)).is_ok()
    {
        lane.paused = true;
    }
}

/// One partition's records, processed in order.
struct Lane {
    core: Arc<Core>,
    consumer: Arc<BaseConsumer<Ctx>>,
    topic: String,
    partition: i32,
    gate: Arc<Gate>,
    queued: Arc<AtomicUsize>,
    rx: mpsc::UnboundedReceiver<OwnedMessage>,
    /// The offset to commit once nothing else is going on.
    pending_ack: Option<i64>,
}

enum Step {
    Next,
    Stop,
}

impl Lane {
    fn stopping(&self) -> bool {
        self.core.stopping() || self.gate.revoked.load(Ordering::SeqCst)
    }

    async fn run(mut self) {
        let mut first = true;
        let mut stop = self.core.stop.clone();
        loop {
            if self.stopping() {
                break;
            }
            let record = match self.rx.try_recv() {
                Ok(r) => r,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if let Some(next) = self.pending_ack.take() {
                        self.commit(next, None).await;
                    }
                    tokio::select! {
                        r = self.rx.recv() => match r {
                            Some(r) => r,
                            None => break,
                        },
                        _ = stop.changed() => continue,
                        // The revoke flag has no waker of its own.
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            };
            self.queued.fetch_sub(1, Ordering::SeqCst);
            if let Step::Stop = self.process(record, &mut first).await {
                break;
            }
        }
        if !self.core.crashed()
            && let Some(next) = self.pending_ack.take()
        {
            self.commit(next, None).await;
        }
        self.gate.finished.store(true, Ordering::SeqCst);
    }

    /// Commits `offset` (everything before it is done) with optional delivery metadata.
    /// Returns `false` if the partition is no longer ours.
    async fn commit(&self, offset: i64, metadata: Option<String>) -> bool {
        if self.core.crashed() {
            return false;
        }
        let (gate, consumer) = (self.gate.clone(), self.consumer.clone());
        let (topic, partition) = (self.topic.clone(), self.partition);
        let result = blocking(move || {
            let assigned = gate.assigned.lock().unwrap_or_else(|e| e.into_inner());
            if !*assigned {
                return Ok(false);
            }
            let mut tpl = TopicPartitionList::new();
            let mut elem = tpl.add_partition(&topic, partition);
            let _ = elem.set_offset(Offset::Offset(offset));
            if let Some(m) = metadata {
                elem.set_metadata(m);
            }
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                // The record will be delivered again: at least once, never lost.
                tracing::warn!(error = %e, %topic, partition, offset, "offset commit failed");
            }
            Ok(true)
        })
        .await;
        result.unwrap_or(false)
    }

    /// Deliveries of the record at `offset` already started by this group, from the
    /// metadata of the committed offset (see the module docs).
    async fn earlier_deliveries(&self, offset: i64) -> u32 {
        let consumer = self.consumer.clone();
        let tpl = partition_list(&self.topic, self.partition);
        let timeout = self.core.inner.config.request_timeout;
        blocking(move || {
            let committed = consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| crate::error::broker_error("committed offsets", &e))?;
            let found = committed.elements().first().and_then(|e| {
                if e.offset() != Offset::Offset(offset) {
                    return None;
                }
                let (at, n) = e.metadata().split_once(':')?;
                (at.parse::<i64>().ok()? == offset).then(|| n.parse::<u32>().ok())?
            });
            Ok(found.unwrap_or(0))
        })
        .await
        .unwrap_or(0)
    }

    /// Sleeps `duration` unless the lane must stop; `false` if it must.
    async fn pause(&self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            if self.stopping() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(50))).await;
        }
        !self.stopping()
    }

    async fn process(&mut self, record: OwnedMessage, first: &mut bool) -> Step {
        let core = self.core.clone();
        let offset = record.offset();
        let decoded = decode(&record);
        drop(record);
        if let Some(due) = decoded.due
            && let Ok(wait) = due.duration_since(SystemTime::now())
            && !self.pause(wait).await
        {
            return Step::Stop;
        }
        let mut deliveries = if std::mem::take(first) {
            self.earlier_deliveries(offset).await
        } else {
            0
        };
        loop {
            deliveries += 1;
            // Records the delivery before the handler runs (and acks what came before).
            if !self
                .commit(offset, Some(format!("{offset}:{deliveries}")))
                .await
            {
                return Step::Stop;
            }
            self.pending_ack = None;
            let delivery = Delivery {
                message: decoded.message.clone(),
                attempt: decoded.prior_attempts + deliveries,
                group: core.subscription.group.clone(),
            };
            let mut settle = LaneSettle {
                lane: self,
                message: &decoded.message,
                offset,
                attempt: delivery.attempt,
                next: Step::Next,
                again: false,
            };
            core.path
                .deliver(delivery, core.handler.as_ref(), &mut settle)
                .await;
            let (next, again) = (settle.next, settle.again);
            if let Step::Stop = next {
                return Step::Stop;
            }
            if !again {
                return Step::Next;
            }
        }
    }
}

/// The subscription's handler, run by at most `concurrency` lanes at once.
struct Permitted {
    handler: Arc<dyn Handler>,
    permits: Semaphore,
}

#[async_trait]
impl Handler for Permitted {
    async fn handle(&self, delivery: &Delivery) -> std::result::Result<Outcome, HandlerError> {
        let _permit = self.permits.acquire().await;
        self.handler.handle(delivery).await
    }
}

/// One record being settled by its lane. Settling moves the lane's offset past the
/// record; a retry in place (ordered subscriptions, or nothing could be written) delivers
/// it again from the lane's loop.
struct LaneSettle<'a> {
    lane: &'a mut Lane,
    message: &'a Message,
    offset: i64,
    attempt: u32,
    next: Step,
    /// Deliver the same record again, in place.
    again: bool,
}

impl LaneSettle<'_> {
    /// Waits `after` in place, then the lane delivers the record again (unless it must
    /// stop).
    async fn in_place(&mut self, after: Duration) {
        if self.lane.pause(after).await {
            self.again = true;
        } else {
            self.next = Step::Stop;
        }
    }
}

#[async_trait]
impl Settle for LaneSettle<'_> {
    async fn ack(&mut self) -> Result<()> {
        self.lane.pending_ack = Some(self.offset + 1);
        Ok(())
    }

    async fn redeliver(&mut self, after: Duration, _next_attempt: u32) -> Result<()> {
        let core = self.lane.core.clone();
        if core.subscription.ordered {
            // Ordered: retry in place, holding back the rest of the partition (and so
            // every later message with this key).
            self.in_place(after).await;
            return Ok(());
        }
        let retry = retry_message(
            self.message,
            &core.retry_topic,
            self.attempt,
            SystemTime::now() + after,
        );
        core.publish
            .run(&retry, &core.retry_topic, || core.inner.send(&retry))
            .await?;
        self.lane.pending_ack = Some(self.offset + 1);
        Ok(())
    }

    async fn dead_letter(&mut self, dead_letter: &Message) -> Result<()> {
        let core = self.lane.core.clone();
        core.publish
            .run(dead_letter, dead_letter.destination(), || {
                core.inner.send(dead_letter)
            })
            .await
            .map(|_| ())
    }

    /// Neither lost nor hot-looped: the offset stays where it is, and the record is
    /// delivered again in place after `after`.
    async fn hold(&mut self, after: Duration, _next_attempt: u32) {
        self.in_place(after).await;
    }
}
