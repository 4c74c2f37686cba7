//! State shared by the broker object, its publishers, consumers and transactions: the
//! settings, the admin client, the idempotent producer of confirmed sends (rebuilt on a
//! fatal error) and the cache of topics known to exist.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::util::Timeout;
use surety_core::raw::PublishPath;
use surety_core::{
    Capabilities, Capability, Error, ErrorKind, Message, Receipt, Result, telemetry,
};

use crate::ADAPTER;
use crate::codec::record_of;
use crate::config::{KafkaConfig, create};
use crate::error::{broker_error, delivery_error};

pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    admin: AdminClient<DefaultClientContext>,
    producer: RwLock<Arc<FutureProducer>>,
    /// Topics known to exist. Only positive answers are cached: a topic declared later
    /// must become routable at once.
    topics: Mutex<HashSet<String>>,
    pub(crate) tx_pool: TxPool,
}

impl Inner {
    /// Creates the clients of `config` (without contacting the cluster).
    pub(crate) fn new(config: KafkaConfig) -> Result<(Arc<Inner>, Arc<FutureProducer>)> {
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
        Ok((inner, producer))
    }

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

    /// One confirmed send: check the topic, send through the idempotent producer, wait for
    /// the delivery report; a producer found fatal is rebuilt. No validation, span or
    /// metrics: the publish path adds those.
    pub(crate) async fn send(&self, message: &Message) -> Result<Receipt> {
        self.check_topic(message.destination()).await?;
        let mut producer = self.producer();
        if producer.client().fatal_error().is_some() {
            // Found broken before use (its fatal error came through another send).
            self.check_fatal(&producer);
            producer = self.producer();
        }
        self.send_with(&producer, message).await.map_err(|e| {
            self.check_fatal(&producer);
            delivery_error(&e, message.destination())
                .with_context("message_id", message.id().as_str())
        })
    }

    /// What the adapter offers with these settings.
    pub(crate) fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with(Capability::OnewayPublish)
            .with(Capability::BrokerTransactions)
            .with(Capability::OrderingPerKey)
            .with(Capability::DelayedRetry)
            .with(Capability::DeadLetter)
            .with(Capability::ConsumerExactlyOnce)
            .with_max_message_size(self.config.max_message_size)
    }

    /// The publish path of this adapter: validation, span, metrics, retries.
    pub(crate) fn publish_path(&self) -> PublishPath {
        PublishPath::new(ADAPTER, self.capabilities()).with_retry(self.config.publish_retry.clone())
    }
}

/// The retry topic of `group` on `topic`: `<topic>.<group>.retry`.
pub(crate) fn retry_topic(topic: &str, group: &str) -> String {
    format!("{topic}.{group}.retry")
}

/// The dead-letter topic of `group` on `topic`: `<topic>.<group>.dlq`.
pub(crate) fn dead_letter_topic(topic: &str, group: &str) -> String {
    format!("{topic}.{group}.dlq")
}

/// The consumer group whose committed offsets on a dead-letter topic mark what was
/// re-driven: `<group>.surety-redrive`.
pub(crate) fn redrive_cursor_group(group: &str) -> String {
    format!("{group}.surety-redrive")
}

/// Idle transactional producers, each with its own `transactional.id` and
/// `init_transactions` already done (that call costs a broker round trip or more).
#[derive(Default)]
pub(crate) struct TxPool {
    idle: Mutex<Vec<Arc<FutureProducer>>>,
}

impl TxPool {
    pub(crate) fn take(&self) -> Option<Arc<FutureProducer>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    pub(crate) fn put(&self, p: Arc<FutureProducer>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < 8 {
            idle.push(p);
        }
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
    surety_core::raw::validate_destination(topic)?;
    if topic == "." || topic == ".." || topic.contains(['%', '|']) {
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
