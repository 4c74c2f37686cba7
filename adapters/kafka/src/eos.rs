//! Exactly-once read-process-write inside Kafka.
//!
//! Records are read from a source topic (read committed), a [`Processor`] turns each
//! into output messages, and the outputs *and the consumer's offsets* are committed in
//! one Kafka transaction (`send_offsets_to_transaction`). Either the outputs become
//! visible and the inputs count as consumed, or neither: a crash anywhere leaves the
//! transaction open, and the next instance with the same `transactional.id` aborts it
//! when it starts (`init_transactions`), then resumes from the committed offsets. A
//! read-committed reader of the outputs sees each input reflected exactly once.
//!
//! This holds for effects *inside Kafka* only. A processor that also writes a database
//! or calls a service is at-least-once for those effects: use an idempotent inbox there.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use surety_core::raw::{ConsumePath, Settle};
use surety_core::{
    Delivery, Error, ErrorKind, Handler, HandlerError, Message, Outcome, Result, RetryPolicy,
    Subscription, SubscriptionHandle,
};
use tokio::sync::watch;

use crate::ADAPTER;
use crate::KafkaBroker;
use crate::codec::{Origin, decode};
use crate::config::create;
use crate::error::{TxnClass, classify, delivery_error, transaction_error};
use crate::shared::{Inner, dead_letter_topic, validate_topic};
use crate::transaction::transactional_producer;

/// Turns one input delivery into the messages to write, inside the transaction.
///
/// Returning `Err` (or panicking) retries the input in place under the retry policy;
/// when the attempts are used up the input is dead-lettered *in the same transaction*.
/// The attempt count lives in memory: it restarts at 1 after a crash.
#[async_trait]
pub trait Processor: Send + Sync {
    /// The outputs for `delivery` (possibly none).
    async fn process(&self, delivery: &Delivery)
    -> std::result::Result<Vec<Message>, HandlerError>;
}

/// A [`Processor`] from an async closure.
pub struct ProcessorFn<F>(F);

/// Wraps an async closure taking the delivery by value as a [`Processor`].
pub fn processor_fn<F, Fut>(f: F) -> ProcessorFn<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync,
    Fut: Future<Output = std::result::Result<Vec<Message>, HandlerError>> + Send,
{
    ProcessorFn(f)
}

#[async_trait]
impl<F, Fut> Processor for ProcessorFn<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync,
    Fut: Future<Output = std::result::Result<Vec<Message>, HandlerError>> + Send,
{
    async fn process(
        &self,
        delivery: &Delivery,
    ) -> std::result::Result<Vec<Message>, HandlerError> {
        (self.0)(delivery.clone()).await
    }
}

/// What an exactly-once processor reads and how it commits.
#[derive(Clone, Debug)]
pub struct ExactlyOnce {
    /// The input topic.
    pub source: String,
    /// The consumer group (the committed offsets live there).
    pub group: String,
    /// The `transactional.id`. It must be stable across restarts of *this* instance (so
    /// the restart fences the dead one and aborts its open transaction) and distinct per
    /// concurrently running instance. Default: `<prefix>-eos-<group>-<source>` (one
    /// instance).
    pub transactional_id: Option<String>,
    /// Retries of a failing input before it is dead-lettered.
    pub retry: RetryPolicy,
    /// Most inputs per transaction.
    pub max_batch: usize,
    /// Where exhausted inputs go; default [`crate::KafkaBroker::dead_letter_topic`].
    pub dead_letter: Option<String>,
}

impl ExactlyOnce {
    /// Reads `source` as `group`, 100 inputs per transaction at most.
    pub fn new(source: impl Into<String>, group: impl Into<String>) -> Self {
        ExactlyOnce {
            source: source.into(),
            group: group.into(),
            transactional_id: None,
            retry: RetryPolicy::default(),
            max_batch: 100,
            dead_letter: None,
        }
    }

    /// Sets the transactional id (one per running instance, stable across its restarts).
    pub fn transactional_id(mut self, id: impl Into<String>) -> Self {
        self.transactional_id = Some(id.into());
        self
    }

    /// Sets the retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets the batch size (at least 1).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }
}

impl KafkaBroker {
    /// Starts an exactly-once read-process-write loop (see the module docs of
    /// [`crate::eos`]): each input's outputs and its consumed offset are committed in one
    /// Kafka transaction.
    ///
    /// `shutdown()` on the handle finishes the current transaction; `abort()` (or a
    /// crash) leaves it open, and the next start with the same transactional id aborts it.
    pub async fn exactly_once(
        &self,
        spec: ExactlyOnce,
        processor: Arc<dyn Processor>,
    ) -> Result<SubscriptionHandle> {
        validate_topic(&spec.source)?;
        self.inner.check_topic(&spec.source).await.map_err(|e| {
            if e.kind() == ErrorKind::Unroutable {
                Error::new(
                    ErrorKind::Configuration,
                    format!("source topic {:?} is not declared", spec.source),
                )
                .with_context("adapter", ADAPTER)
            } else {
                e
            }
        })?;
        let transactional_id = spec.transactional_id.clone().unwrap_or_else(|| {
            format!(
                "{}-eos-{}-{}",
                self.inner.config.transactional_id_prefix, spec.group, spec.source
            )
        });
        let producer = transactional_producer(&self.inner, &transactional_id).await?;
        let rebalanced = Arc::new(AtomicBool::new(false));
        let consumer: BaseConsumer<EosCtx> = create("consumer", || {
            self.inner
                .config
                .consumer(&spec.group)
                .create_with_context(EosCtx {
                    rebalanced: rebalanced.clone(),
                })
        })?;
        consumer.subscribe(&[spec.source.as_str()]).map_err(|e| {
            Error::new(ErrorKind::Configuration, "cannot subscribe")
                .with_context("adapter", ADAPTER)
                .with_source(e)
        })?;
        let (stop, stop_rx) = SubscriptionHandle::stop_signal();
        let crashed = Arc::new(AtomicBool::new(false));
        let dead_letter = spec
            .dead_letter
            .clone()
            .unwrap_or_else(|| dead_letter_topic(&spec.source, &spec.group));
        let path = ConsumePath::new(
            ADAPTER,
            &Subscription::new(&spec.source, &spec.group).retry(spec.retry.clone()),
            dead_letter,
        );
        let worker = Worker {
            inner: self.inner.clone(),
            spec,
            transactional_id,
            path,
            processor,
            consumer,
            producer,
            rebalanced,
            crashed: crashed.clone(),
            stop: stop_rx,
            runtime: tokio::runtime::Handle::current(),
        };
        let thread = tokio::task::spawn_blocking(move || worker.run());
        let supervisor = tokio::spawn(async move {
            let mut guard = Crash(Some(crashed));
            let _ = thread.await;
            guard.0 = None;
        });
        Ok(SubscriptionHandle::new(stop, vec![supervisor]))
    }
}

/// Sets the crash flag if the supervisor is aborted.
struct Crash(Option<Arc<AtomicBool>>);

impl Drop for Crash {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

struct EosCtx {
    rebalanced: Arc<AtomicBool>,
}

impl ClientContext for EosCtx {}

impl ConsumerContext for EosCtx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            // Records polled but not committed belong to whoever gets the partition next.
            self.rebalanced.store(true, Ordering::SeqCst);
        }
    }
}

struct Worker {
    inner: Arc<Inner>,
    spec: ExactlyOnce,
    transactional_id: String,
    path: ConsumePath,
    processor: Arc<dyn Processor>,
    consumer: BaseConsumer<EosCtx>,
    producer: Arc<FutureProducer>,
    rebalanced: Arc<AtomicBool>,
    crashed: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
    runtime: tokio::runtime::Handle,
}

enum BatchError {
    /// Stop now without committing or aborting (crash).
    Crashed,
    /// The transaction failed; the inputs are read again.
    Failed(Error, TxnClass),
}

impl Worker {
    fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    fn run(mut self) {
        let mut last_error: Option<Instant> = None;
        loop {
            if self.crashed() || *self.stop.borrow() {
                break;
            }
            let batch = self.poll_batch();
            if batch.is_empty() {
                continue;
            }
            match self.transact(&batch) {
                Ok(()) => {}
                Err(BatchError::Crashed) => return,
                Err(BatchError::Failed(e, class)) => {
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        tracing::warn!(error = %e, "exactly-once transaction failed; reading its inputs again");
                        last_error = Some(Instant::now());
                    }
                    if class == TxnClass::Fatal && !self.rebuild() {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    self.rewind(&batch);
                }
            }
        }
    }

    fn poll_batch(&mut self) -> Vec<OwnedMessage> {
        self.rebalanced.store(false, Ordering::SeqCst);
        let mut batch = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(100);
        while batch.len() < self.spec.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.consumer.poll(left) {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => tracing::debug!(error = %e, "Kafka consumer error"),
                None => break,
            }
            if left.is_zero() {
                break;
            }
        }
        if self.rebalanced.swap(false, Ordering::SeqCst) {
            // Positions were reset from the committed offsets: start over.
            batch.clear();
        }
        batch
    }

    fn rebuild(&mut self) -> bool {
        let fresh = self
            .runtime
            .block_on(transactional_producer(&self.inner, &self.transactional_id));
        match fresh {
            Ok(p) => {
                self.producer = p;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot rebuild the transactional producer");
                false
            }
        }
    }

    /// Seeks every partition of `batch` back to its first record in the batch.
    fn rewind(&self, batch: &[OwnedMessage]) {
        let mut first: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for r in batch {
            first
                .entry((r.topic().to_owned(), r.partition()))
                .or_insert(r.offset());
        }
        for ((topic, partition), offset) in first {
            if let Err(e) = self.consumer.seek(
                &topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(5),
            ) {
                tracing::debug!(error = %e, %topic, partition, "seek after abort failed (partition moved?)");
            }
        }
    }

    fn transact(&self, batch: &[OwnedMessage]) -> std::result::Result<(), BatchError> {
        let timeout = self.inner.config.request_timeout;
        let fail = |what: &str, e: &rdkafka::error::KafkaError| {
            BatchError::Failed(transaction_error(what, e), classify(e))
        };
        self.producer
            .begin_transaction()
            .map_err(|e| fail("begin_transaction", &e))?;
        let result = self.fill(batch);
        if self.crashed() {
            return Err(BatchError::Crashed);
        }
        if let Err(e) = result {
            let _ = self.producer.abort_transaction(timeout);
            return Err(BatchError::Failed(e, TxnClass::AbortRequired));
        }
        let mut offsets = TopicPartitionList::new();
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for r in batch {
            next.insert((r.topic().to_owned(), r.partition()), r.offset() + 1);
        }
        for ((topic, partition), offset) in &next {
            let _ = offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        let Some(group) = self.consumer.group_metadata() else {
            let _ = self.producer.abort_transaction(timeout);
            return Err(BatchError::Failed(
                Error::new(ErrorKind::Unavailable, "no consumer group metadata yet"),
                TxnClass::AbortRequired,
            ));
        };
        let finish = self
            .producer
            .send_offsets_to_transaction(&offsets, &group, timeout)
            .map_err(|e| fail("send_offsets_to_transaction", &e))
            .and_then(|()| {
                if self.crashed() {
                    return Err(BatchError::Crashed);
                }
                let mut tries = 0;
                loop {
                    match self.producer.commit_transaction(timeout) {
                        Ok(()) => return Ok(()),
                        Err(e) if classify(&e) == TxnClass::Retriable && tries < 3 => tries += 1,
                        Err(e) => return Err(fail("commit_transaction", &e)),
                    }
                }
            });
        match finish {
            Ok(()) => Ok(()),
            Err(BatchError::Crashed) => Err(BatchError::Crashed),
            Err(BatchError::Failed(e, class)) => {
                if class != TxnClass::Fatal {
                    let _ = self.producer.abort_transaction(timeout);
                }
                Err(BatchError::Failed(e, class))
            }
        }
    }

    /// Runs the processor on every input and sends the outputs into the open
    /// transaction.
    fn fill(&self, batch: &[OwnedMessage]) -> Result<()> {
        for record in batch {
            // Inputs come from the source topic, which anyone may write.
            let decoded = decode(record, Origin::Open);
            let Some(outputs) = self.runtime.block_on(self.outputs_of(&decoded.message)) else {
                return Ok(()); // crashed: nothing more is written
            };
            for out in outputs {
                out.validate(Some(self.inner.config.max_message_size))?;
                self.runtime
                    .block_on(self.inner.check_topic(out.destination()))?;
                self.runtime
                    .block_on(self.inner.send_with(&self.producer, &out))
                    .map_err(|e| delivery_error(&e, out.destination()))?;
            }
        }
        Ok(())
    }

    /// The outputs of one input, through the shared consume path: the processor's, or
    /// the input's dead letter once its retries (in place) are used up. `None` if the
    /// worker crashed meanwhile.
    async fn outputs_of(&self, message: &Message) -> Option<Vec<Message>> {
        let handler = Outputs {
            processor: self.processor.as_ref(),
            produced: Mutex::new(Vec::new()),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            if self.crashed() {
                return None;
            }
            let delivery = Delivery {
                message: message.clone(),
                attempt,
                group: self.spec.group.clone(),
            };
            let mut settle = InTransaction {
                handler: &handler,
                outputs: None,
                again: false,
            };
            self.path.deliver(delivery, &handler, &mut settle).await;
            if !settle.again {
                return Some(settle.outputs.unwrap_or_default());
            }
        }
    }
}

/// The processor as a handler: a success keeps its outputs for the transaction.
struct Outputs<'a> {
    processor: &'a dyn Processor,
    produced: Mutex<Vec<Message>>,
}

#[async_trait]
impl Handler for Outputs<'_> {
    async fn handle(&self, delivery: &Delivery) -> std::result::Result<Outcome, HandlerError> {
        let outputs = self.processor.process(delivery).await?;
        *self.produced.lock().unwrap_or_else(|e| e.into_inner()) = outputs;
        Ok(Outcome::Ack)
    }
}

/// Settling an input inside the open transaction: its outputs (or its dead letter) are
/// written with the offsets; a retry runs in place on this thread.
struct InTransaction<'a, 'b> {
    handler: &'a Outputs<'b>,
    outputs: Option<Vec<Message>>,
    again: bool,
}

#[async_trait]
impl Settle for InTransaction<'_, '_> {
    async fn ack(&mut self) -> Result<()> {
        if self.outputs.is_none() {
            let produced = &self.handler.produced;
            self.outputs = Some(std::mem::take(
                &mut *produced.lock().unwrap_or_else(|e| e.into_inner()),
            ));
        }
        Ok(())
    }

    async fn redeliver(&mut self, after: Duration, _next_attempt: u32) -> Result<()> {
        // This runs on the worker's own blocking thread (inside `block_on`), which holds
        // the transaction open: waiting here is the retry in place.
        std::thread::sleep(after);
        self.again = true;
        Ok(())
    }

    async fn dead_letter(&mut self, dead_letter: &Message) -> Result<()> {
        // Written in the same transaction as the input's offset.
        self.outputs = Some(vec![dead_letter.clone()]);
        Ok(())
    }

    async fn hold(&mut self, after: Duration, next_attempt: u32) {
        let _ = self.redeliver(after, next_attempt).await;
    }
}
