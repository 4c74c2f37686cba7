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
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientContext, Message as _, TopicPartitionList};
use surety_core::raw::{ConsumePath, PublishPath};
use surety_core::{
    Delivery, Error, ErrorKind, Handler, HandlerError, Outcome, Result, Subscriber, Subscription,
    SubscriptionHandle,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::AbortHandle;

use self::lane::Lane;
use crate::ADAPTER;
use crate::config::create;
use crate::shared::{Inner, dead_letter_topic, retry_topic, validate_topic};

mod lane;

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
