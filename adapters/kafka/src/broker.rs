//! The broker object: topics, the idempotent producer of confirmed sends, naming.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::util::Timeout;
use surety_core::{
    Broker, BrokerTransaction, Capabilities, Capability, DeadLetters, Error, ErrorKind, Message,
    Publisher, Receipt, Result, Subscriber, Topology, telemetry,
};
use tracing::Instrument;

use crate::ADAPTER;
use crate::codec::record_headers;
use crate::config::{KafkaConfig, create};
use crate::consumer::KafkaSubscriber;
use crate::error::{broker_error, delivery_error};
use crate::transaction::{KafkaTransaction, TxPool};

/// The Kafka adapter. Cheap to clone: clones share the producer and the topic cache.
///
/// See the crate documentation for what maps to what.
#[derive(Clone)]
pub struct KafkaBroker {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    admin: AdminClient<DefaultClientContext>,
    producer: RwLock<Arc<FutureProducer>>,
    /// Topics known to exist. Only positive answers are cached: a topic declared later
    /// must become routable at once.
    topics: Mutex<HashSet<String>>,
    pub(crate) tx_pool: TxPool,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl KafkaBroker {
    /// Connects to the cluster in `config` and checks that it answers.
    ///
    /// Fails with [`ErrorKind::Unavailable`] when no broker answers within the request
    /// timeout, and [`ErrorKind::Configuration`] for an invalid setting.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let admin = create("admin client", || config.admin().create())?;
        let producer: Arc<FutureProducer> =
            Arc::new(create("producer", || config.producer().create())?);
        let inner = Arc::new(Inner {
            tx_pool: TxPool::default(),
            config,
            admin,
            producer: RwLock::new(producer.clone()),
            topics: Mutex::default(),
        });
        let timeout = inner.config.request_timeout.min(Duration::from_secs(15));
        let servers = inner.config.bootstrap_servers.clone();
        blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Unavailable,
                        format!("no Kafka broker answered at {servers} within {timeout:?}"),
                    )
                    .with_context("adapter", ADAPTER)
                    .with_source(e)
                })
        })
        .await?;
        Ok(KafkaBroker { inner })
    }

    /// Connects with [`KafkaConfig::from_env`].
    pub async fn from_env() -> Result<Self> {
        KafkaBroker::connect(KafkaConfig::from_env()).await
    }

    /// The settings in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The retry topic of `group` on `topic`: `<topic>.<group>.retry`.
    pub fn retry_topic(topic: &str, group: &str) -> String {
        format!("{topic}.{group}.retry")
    }

    /// The dead-letter topic of `group` on `topic`: `<topic>.<group>.dlq`.
    pub fn dead_letter_topic(topic: &str, group: &str) -> String {
        format!("{topic}.{group}.dlq")
    }

    /// Creates `topics` (idempotent) and waits until the cluster's metadata shows them.
    pub async fn create_topics(&self, topics: &[String]) -> Result<()> {
        self.inner.create_topics(topics).await
    }
}

impl Inner {
    pub(crate) fn producer(&self) -> Arc<FutureProducer> {
        self.producer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rebuilds the producer if librdkafka reports a fatal error on `used` (an
    /// idempotence guarantee could not be kept): a fatal producer never recovers.
    pub(crate) fn check_fatal(&self, used: &Arc<FutureProducer>) {
        let Some((code, reason)) = used.client().fatal_error() else {
            return;
        };
        let mut slot = self.producer.write().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&slot, used) {
            return; // someone rebuilt it already
        }
        match create("producer", || self.config.producer().create()) {
            Ok(fresh) => {
                tracing::error!(%code, %reason, "Kafka producer hit a fatal error; rebuilt it");
                metrics::counter!(telemetry::RECONNECTS, "adapter" => ADAPTER).increment(1);
                *slot = Arc::new(fresh);
            }
            Err(e) => tracing::error!(error = %e, "cannot rebuild the fatal Kafka producer"),
        }
    }

    /// `Ok` if `topic` exists. Asks the cluster on a cache miss, with a metadata request
    /// that never auto-creates the topic.
    pub(crate) async fn check_topic(&self, topic: &str) -> Result<()> {
        if self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(topic)
        {
            return Ok(());
        }
        validate_topic(topic)?;
        match self.topic_state(topic).await? {
            TopicState::Exists => {
                self.remember(topic);
                Ok(())
            }
            TopicState::Missing => Err(unroutable(topic)),
        }
    }

    fn remember(&self, topic: &str) {
        self.topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned());
    }

    async fn topic_state(&self, topic: &str) -> Result<TopicState> {
        let producer = self.producer();
        let timeout = self.config.request_timeout.min(Duration::from_secs(10));
        let name = topic.to_owned();
        blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&name), timeout)
                .map_err(|e| broker_error("topic metadata", &e))?;
            let Some(t) = md.topics().iter().find(|t| t.name() == name) else {
                return Ok(TopicState::Missing);
            };
            Ok(match t.error() {
                Some(
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART
                    | RDKafkaRespErr::RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC,
                ) => TopicState::Missing,
                // Leader elections and the like: the topic is there.
                _ if t.partitions().is_empty() && t.error().is_some() => TopicState::Missing,
                _ => TopicState::Exists,
            })
        })
        .await
    }

    pub(crate) async fn create_topics(&self, topics: &[String]) -> Result<()> {
        for t in topics {
            validate_topic(t)?;
        }
        let partitions = self.config.partitions.unwrap_or(-1);
        let replication = TopicReplication::Fixed(self.config.replication_factor.unwrap_or(-1));
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| NewTopic::new(t, partitions, replication_copy(&replication)))
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(self.config.request_timeout));
        let results = self
            .admin
            .create_topics(new.iter(), &opts)
            .await
            .map_err(|e| broker_error("create topics", &e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(broker_error(
                        &format!("create topic {name:?}"),
                        &KafkaError::AdminOp(code),
                    )
                    .with_context("destination", name));
                }
            }
        }
        // Creation is asynchronous in the cluster: wait until metadata shows each topic,
        // so that a publish or subscribe right after `declare` sees it.
        let deadline = Instant::now() + self.config.request_timeout;
        for t in topics {
            loop {
                if matches!(self.topic_state(t).await, Ok(TopicState::Exists)) {
                    self.remember(t);
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("topic {t:?} was created but does not show in metadata"),
                    )
                    .with_context("adapter", ADAPTER));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Sends `message` through `producer` and waits for its delivery report.
    pub(crate) async fn send_with(
        &self,
        producer: &FutureProducer,
        message: &Message,
    ) -> std::result::Result<Receipt, KafkaError> {
        match producer
            .send(
                record_of(message),
                Timeout::After(self.config.delivery_timeout),
            )
            .await
        {
            Ok(d) => Ok(Receipt::for_message(message)
                .with_position(format!("partition {} offset {}", d.partition, d.offset))),
            Err((e, _)) => Err(e),
        }
    }

    /// A confirmed publish: validate, check the topic, send, wait for the report.
    pub(crate) async fn publish(&self, message: &Message) -> Result<Receipt> {
        let started = Instant::now();
        let result = self.publish_inner(message).await;
        telemetry::record_publish_since(
            ADAPTER,
            message.destination(),
            result.as_ref().map(|_| ()).map_err(Error::kind),
            started,
        );
        result
    }

    async fn publish_inner(&self, message: &Message) -> Result<Receipt> {
        message.validate(Some(self.config.max_message_size))?;
        self.check_topic(message.destination()).await?;
        let mut producer = self.producer();
        if producer.client().fatal_error().is_some() {
            // Found broken before use (its fatal error came through another send).
            self.check_fatal(&producer);
            producer = self.producer();
        }
        let span = tracing::debug_span!(
            "surety.publish",
            message_id = %message.id(),
            destination = %message.destination()
        );
        let result = self.send_with(&producer, message).instrument(span).await;
        result.map_err(|e| {
            self.check_fatal(&producer);
            delivery_error(&e, message.destination())
                .with_context("message_id", message.id().as_str())
        })
    }
}

/// The Kafka record of `message`: payload, id and created-at headers, timestamp, key.
pub(crate) fn record_of(message: &Message) -> FutureRecord<'_, str, [u8]> {
    let payload: &[u8] = message.payload();
    let record = FutureRecord::<str, [u8]>::to(message.destination())
        .payload(payload)
        .timestamp(message.created_at_millis() as i64)
        .headers(record_headers(message));
    match message.key() {
        Some(key) => record.key(key),
        None => record,
    }
}

enum TopicState {
    Exists,
    Missing,
}

fn replication_copy<'a>(r: &TopicReplication<'a>) -> TopicReplication<'a> {
    match r {
        TopicReplication::Fixed(n) => TopicReplication::Fixed(*n),
        TopicReplication::Variable(v) => TopicReplication::Variable(v),
    }
}

pub(crate) fn unroutable(topic: &str) -> Error {
    Error::new(
        ErrorKind::Unroutable,
        format!("topic {topic:?} does not exist (declare it first)"),
    )
    .with_context("adapter", ADAPTER)
    .with_context("destination", topic)
}

/// Kafka topic names: 1 to 249 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
pub(crate) fn validate_topic(topic: &str) -> Result<()> {
    surety_core::validate_destination(topic)?;
    if topic == "." || topic == ".." || topic.contains('%') {
        return Err(Error::invalid(format!(
            "{topic:?} is not a valid Kafka topic name ([A-Za-z0-9._-], not . or ..)"
        ))
        .with_context("adapter", ADAPTER)
        .with_context("destination", topic));
    }
    Ok(())
}

/// Runs a blocking librdkafka call off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::new(
            ErrorKind::Fatal,
            "a blocking Kafka call panicked or was cancelled",
        )
        .with_context("adapter", ADAPTER)
        .with_source(e)
    })?
}

struct KafkaPublisher {
    inner: Arc<Inner>,
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.inner.publish(message).await
    }

    // The default `publish_batch` joins every `publish` future: each one enqueues its
    // record before any waits, so the whole batch is in flight at once (librdkafka
    // batches them, up to 5 requests in flight per partition with idempotence).

    async fn publish_oneway(&self, message: &Message) -> Result<()> {
        message.validate(Some(self.inner.config.max_message_size))?;
        self.inner.check_topic(message.destination()).await?;
        let producer = self.inner.producer();
        // Enqueued, report ignored: at-most-once as documented.
        match producer.send_result(record_of(message)) {
            Ok(_report) => Ok(()),
            Err((e, _)) => Err(delivery_error(&e, message.destination())),
        }
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn name(&self) -> &'static str {
        ADAPTER
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with(Capability::OnewayPublish)
            .with(Capability::BrokerTransactions)
            .with(Capability::OrderingPerKey)
            .with(Capability::DelayedRetry)
            .with(Capability::DeadLetter)
            .with(Capability::ConsumerExactlyOnce)
            .with_max_message_size(self.inner.config.max_message_size)
    }

    /// Creates the topic, each group's retry topic and (when asked) each group's
    /// dead-letter topic with the admin client. Existing topics are fine.
    async fn declare(&self, topology: &Topology) -> Result<()> {
        let mut names = vec![topology.destination.clone()];
        for group in &topology.groups {
            names.push(KafkaBroker::retry_topic(&topology.destination, group));
            if topology.dead_letter {
                names.push(KafkaBroker::dead_letter_topic(&topology.destination, group));
            }
        }
        self.inner.create_topics(&names).await
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(KafkaPublisher {
            inner: self.inner.clone(),
        }))
    }

    async fn begin_transaction(&self) -> Result<Box<dyn BrokerTransaction>> {
        Ok(Box::new(KafkaTransaction::begin(self.inner.clone()).await?))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(KafkaSubscriber::new(self.inner.clone())))
    }

    fn dead_letter_destination(&self, destination: &str, group: &str) -> String {
        KafkaBroker::dead_letter_topic(destination, group)
    }

    /// The group's dead-letter topic, with a re-drive cursor kept as the committed
    /// offsets of the group `<group>.surety-redrive` (a log cannot delete): see
    /// [`KafkaBroker::redrive_cursor_group`].
    async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
        Ok(Arc::new(crate::dead_letters::KafkaDeadLetters {
            inner: self.inner.clone(),
        }))
    }
}
