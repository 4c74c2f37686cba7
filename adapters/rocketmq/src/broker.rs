//! The broker object: connection settings, the admin client (topics and routes), the
//! confirmed publisher.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cheetah_string::CheetahString;
use rocketmq_client_rust::{
    AclClientRPCHook, ClientConfig, ConsumerAdmin, DefaultMQAdminExt, DefaultMQProducer,
    RouteAdmin, SessionCredentials, TopicAdmin,
};
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::common::message::message_single::Message as RmqMessage;
use rocketmq_model::topic::TopicConfig;
use rocketmq_transport::api::RPCHook;
use surety_core::{
    Broker, Capabilities, Capability, CheckBack, DeadLetters, Error, ErrorKind, Message, Publisher,
    Receipt, Result, Subscriber, Topology, TransactionalPublisher, telemetry,
};

use crate::ADAPTER;
use crate::codec::{self, DLQ_PREFIX, RETRY_PREFIX};
use crate::config::RocketMqConfig;
use crate::error::{admin_error, send_error, status_error};
use crate::host::ClientHost;

/// The Java broker's default-route topic (`TopicValidator.AUTO_CREATE_TOPIC_KEY_TOPIC`).
const DEFAULT_TOPIC_KEY: &str = "TBW102";

/// Read + write permission of a topic (`PermName.PERM_READ | PermName.PERM_WRITE`).
const PERM_READ_WRITE: u32 = 4 | 2;

/// One broker's queues of a topic, from the name server's route.
pub(crate) struct QueueRoute {
    pub(crate) broker: CheetahString,
    pub(crate) read_queues: u32,
    pub(crate) write_queues: u32,
    /// `PermName` bits: 2 write, 4 read.
    pub(crate) perm: u32,
    pub(crate) sys_flag: u32,
    /// The master's address, if the broker has a master now.
    pub(crate) master: Option<CheetahString>,
}

/// State shared by the broker object, its publishers and subscribers.
pub(crate) struct Shared {
    pub(crate) config: RocketMqConfig,
    pub(crate) host: Arc<ClientHost>,
    admin: DefaultMQAdminExt,
    /// Topics known to have a route; only positive answers are cached, so a topic declared
    /// later becomes routable at once.
    routes: Mutex<HashSet<String>>,
    instance_seq: AtomicU64,
    instance_prefix: String,
}

impl Shared {
    /// A fresh client configuration with a unique instance name: every producer and
    /// consumer gets its own client instance, so that two consumers of one group (or a
    /// second producer of a group) in one process are distinct clients to the broker.
    pub(crate) fn client_config(&self, role: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set_namesrv_addr(CheetahString::from(self.config.namesrv.as_str()));
        let n = self.instance_seq.fetch_add(1, Ordering::Relaxed);
        c.set_instance_name(CheetahString::from(format!(
            "{}-{role}-{n}",
            self.instance_prefix
        )));
        // The VIP channel is the broker port minus 2; plain port only.
        c.set_vip_channel_enabled(false);
        c
    }

    /// The ACL hook, when credentials are configured.
    pub(crate) fn rpc_hook(&self) -> Option<Arc<dyn RPCHook>> {
        rpc_hook(&self.config)
    }

    /// The admin client.
    pub(crate) fn admin(&self) -> &DefaultMQAdminExt {
        &self.admin
    }

    /// The queues of `topic` per broker as the name server routes them, with each
    /// broker's master address; `None` if the topic has no route.
    pub(crate) async fn route_of(&self, topic: &str) -> Result<Option<Vec<QueueRoute>>> {
        match self
            .admin
            .examine_topic_route_info(CheetahString::from(topic))
            .await
        {
            Ok(Some(route)) if !route.queue_datas.is_empty() => Ok(Some(
                route
                    .queue_datas
                    .iter()
                    .map(|q| QueueRoute {
                        broker: q.broker_name.clone(),
                        read_queues: q.read_queue_nums,
                        write_queues: q.write_queue_nums,
                        perm: q.perm,
                        sys_flag: q.topic_sys_flag,
                        master: route
                            .broker_datas
                            .iter()
                            .find(|b| b.broker_name() == &q.broker_name)
                            .and_then(|b| b.broker_addrs().get(&0).cloned()),
                    })
                    .collect(),
            )),
            Ok(_) => Ok(None),
            Err(e) => {
                let err = admin_error(&e, "route look-up");
                if err.kind() == ErrorKind::Unroutable || e.to_string().contains("No topic route") {
                    Ok(None)
                } else {
                    Err(err.with_context("destination", topic))
                }
            }
        }
    }

    /// `Ok` if `topic` has a route in the name server; `Unroutable` if not.
    ///
    /// The Java broker runs with `autoCreateTopicEnable=true` in many set-ups, and the
    /// client then sends to an unknown topic through the default route (`TBW102`), which
    /// silently creates the topic. Asking the name server first keeps "nobody declared
    /// this destination" an error.
    pub(crate) async fn ensure_route(&self, topic: &str) -> Result<()> {
        if self.routes.lock().unwrap().contains(topic) {
            return Ok(());
        }
        match self
            .admin
            .examine_topic_route_info(CheetahString::from(topic))
            .await
        {
            Ok(Some(route)) if !route.queue_datas.is_empty() => {
                self.routes.lock().unwrap().insert(topic.to_owned());
                Ok(())
            }
            Ok(_) => Err(unroutable(topic)),
            Err(e) => {
                let err = admin_error(&e, "route look-up");
                if err.kind() == ErrorKind::Unroutable || e.to_string().contains("No topic route") {
                    Err(unroutable(topic))
                } else {
                    Err(err.with_context("destination", topic))
                }
            }
        }
    }

    /// Topics whose routes cover the brokers: the cluster-name topics every Java broker
    /// registers (`clusterTopicEnable`, on by default), else `TBW102` (registered when
    /// `autoCreateTopicEnable` is on). Only those with a route are returned.
    ///
    /// Why: a `rocketmq-client-rust` producer learns broker addresses only from the routes
    /// of topics it publishes to, and heartbeats (registers its group) only with brokers
    /// it knows. Unlike the Java client it does not pre-load `TBW102` at start, so a
    /// producer that has not sent anything yet is unknown to every broker, and a
    /// check-back for its group finds "channel is null". Passing these topics as the
    /// producer's `topics` makes it fetch their routes at start and register at once.
    pub(crate) async fn anchor_topics(&self) -> Vec<String> {
        let mut candidates: Vec<String> = match self.admin.examine_broker_cluster_info().await {
            Ok(info) => info
                .cluster_addr_table
                .unwrap_or_default()
                .keys()
                .map(|c| c.to_string())
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cluster info for the producer's anchor topics failed");
                Vec::new()
            }
        };
        candidates.sort();
        candidates.push(DEFAULT_TOPIC_KEY.to_owned());
        let mut anchors = Vec::new();
        for topic in candidates {
            if self.ensure_route(&topic).await.is_ok() {
                anchors.push(topic);
                // One topic whose route names every broker is enough.
                break;
            }
        }
        anchors
    }

    /// Whether the broker serving `topic` lists a producer of `group` whose client id
    /// ends with `@<instance_name>`, i.e. whether check-backs for `group` can reach it.
    pub(crate) async fn producer_registered(
        &self,
        group: &str,
        topic: &str,
        instance_name: &str,
    ) -> bool {
        let suffix = format!("@{instance_name}");
        match self
            .admin
            .examine_producer_connection_info(
                CheetahString::from(group),
                CheetahString::from(topic),
            )
            .await
        {
            Ok(connections) => connections
                .connection_set()
                .iter()
                .any(|c| c.get_client_id().as_str().ends_with(&suffix)),
            Err(_) => false,
        }
    }

    async fn master_addresses(&self) -> Result<Vec<CheetahString>> {
        let info = self
            .admin
            .examine_broker_cluster_info()
            .await
            .map_err(|e| admin_error(&e, "cluster info"))?;
        let addrs: Vec<CheetahString> = info
            .broker_addr_table
            .unwrap_or_default()
            .values()
            .filter_map(|b| b.broker_addrs().get(&0).cloned())
            .collect();
        if addrs.is_empty() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "the name server knows no master broker",
            )
            .with_context("adapter", ADAPTER));
        }
        Ok(addrs)
    }

    /// Creates `topic` on every master broker and waits until the name server routes it.
    pub(crate) async fn create_topic(&self, topic: &str, queues: u32) -> Result<()> {
        codec::validate_topic(topic).map_err(|e| {
            Error::new(ErrorKind::Configuration, e.message().to_owned())
                .with_context("destination", topic)
        })?;
        if self.routes.lock().unwrap().contains(topic) {
            return Ok(());
        }
        for addr in self.master_addresses().await? {
            let mut config = TopicConfig::with_queues(topic, queues, queues);
            config.perm = PERM_READ_WRITE;
            self.admin
                .create_and_update_topic_config(addr, config)
                .await
                .map_err(|e| admin_error(&e, "create topic").with_context("destination", topic))?;
        }
        let deadline = Instant::now() + self.config.route_timeout;
        loop {
            match self.ensure_route(topic).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "topic {topic} was created but the name server has no route for it yet"
                        ),
                    )
                    .with_context("adapter", ADAPTER)
                    .with_source(e));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

fn unroutable(topic: &str) -> Error {
    Error::new(
        ErrorKind::Unroutable,
        format!("topic {topic} has no route: declare it first"),
    )
    .with_context("adapter", ADAPTER)
    .with_context("destination", topic)
}

pub(crate) fn rpc_hook(config: &RocketMqConfig) -> Option<Arc<dyn RPCHook>> {
    match (&config.access_key, &config.secret_key) {
        (Some(ak), Some(sk)) => Some(Arc::new(AclClientRPCHook::new(
            SessionCredentials::with_keys(ak.as_str(), sk.as_str()),
        ))),
        _ => None,
    }
}

/// Apache RocketMQ through `rocketmq-client-rust` (remoting protocol: name server and
/// broker, no proxy). See the crate documentation for what maps to what.
#[derive(Clone)]
pub struct RocketMqBroker {
    pub(crate) shared: Arc<Shared>,
    publisher: Arc<RocketMqPublisher>,
}

impl RocketMqBroker {
    /// Connects to the name server of `config`: starts the client runtime, the admin
    /// client and the shared producer, and checks that a master broker is registered.
    ///
    /// The future is boxed: the client's futures are deep enough to exceed the default
    /// recursion limit of a crate that awaits them unboxed.
    pub async fn connect(config: RocketMqConfig) -> Result<RocketMqBroker> {
        let boxed: futures::future::BoxFuture<'static, Result<RocketMqBroker>> =
            Box::pin(Self::connect_inner(config));
        boxed.await
    }

    async fn connect_inner(config: RocketMqConfig) -> Result<RocketMqBroker> {
        let host = ClientHost::start(config.handler_timeout)?;
        let instance_prefix = format!("surety-{}-{:x}", std::process::id(), rand_suffix());
        let mut admin = match rpc_hook(&config) {
            Some(hook) => DefaultMQAdminExt::with_admin_ext_group_and_rpc_hook(
                host.runtime.clone(),
                format!("{instance_prefix}-admin"),
                hook,
            ),
            None => DefaultMQAdminExt::with_admin_ext_group(
                host.runtime.clone(),
                format!("{instance_prefix}-admin"),
            ),
        };
        admin.set_namesrv_addr(config.namesrv.as_str());
        admin
            .client_config_mut()
            .set_instance_name(CheetahString::from(format!("{instance_prefix}-admin")));
        admin.start().await.map_err(|e| {
            admin_error(&e, "admin client start").with_context("namesrv", config.namesrv.clone())
        })?;
        let shared = Arc::new(Shared {
            config,
            host,
            admin,
            routes: Mutex::new(HashSet::new()),
            instance_seq: AtomicU64::new(0),
            instance_prefix,
        });
        shared
            .master_addresses()
            .await
            .map_err(|e| e.with_context("namesrv", shared.config.namesrv.clone()))?;
        let publisher = Arc::new(RocketMqPublisher::start(shared.clone()).await?);
        Ok(RocketMqBroker { shared, publisher })
    }

    /// The shared confirmed publisher, with the RocketMQ-specific modes (async callback).
    pub fn rocketmq_publisher(&self) -> Arc<RocketMqPublisher> {
        self.publisher.clone()
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

#[async_trait]
impl Broker for RocketMqBroker {
    fn name(&self) -> &'static str {
        ADAPTER
    }

    fn capabilities(&self) -> Capabilities {
        crate::capabilities(self.shared.config.max_message_size)
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        // Bad names are the caller's error, not a broker outage: refuse them before the
        // admin call (the broker answers an empty topic with a generic header error).
        crate::codec::validate_topic(&topology.destination)?;
        for group in &topology.groups {
            crate::codec::validate_topic(group)?;
        }
        let shared = &self.shared;
        let queues = shared.config.queues;
        shared.create_topic(&topology.destination, queues).await?;
        for group in &topology.groups {
            // Created here (not left to the broker) so that they exist before the first
            // consumer runs and can be read by other groups.
            shared
                .create_topic(&format!("{RETRY_PREFIX}{group}"), 1)
                .await?;
            if topology.dead_letter {
                shared
                    .create_topic(&format!("{DLQ_PREFIX}{group}"), 1)
                    .await?;
            }
        }
        Ok(())
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(self.publisher.clone())
    }

    async fn transactional_publisher(
        &self,
        producer_group: &str,
        check_back: Arc<dyn CheckBack>,
    ) -> Result<Arc<dyn TransactionalPublisher>> {
        self.capabilities()
            .require(ADAPTER, Capability::HalfMessages)?;
        let p = crate::transaction::RocketMqTransactionalPublisher::start(
            self.shared.clone(),
            self.publisher.clone(),
            producer_group,
            check_back,
        )
        .await?;
        Ok(Arc::new(p))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(crate::consumer::RocketMqSubscriber::new(
            self.shared.clone(),
            self.publisher.clone(),
        )))
    }

    /// RocketMQ's convention: `%DLQ%<group>`, one per consumer group (not per topic).
    fn dead_letter_destination(&self, _destination: &str, group: &str) -> String {
        format!("{DLQ_PREFIX}{group}")
    }

    /// `%DLQ%<group>` with a re-drive cursor kept as the consume offsets of the group
    /// `<group>-surety-redrive` (a queue cannot delete): see
    /// [`RocketMqBroker::redrive_cursor_group`].
    async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
        Ok(Arc::new(crate::dead_letters::RocketMqDeadLetters {
            shared: self.shared.clone(),
            publisher: self.publisher.clone(),
        }))
    }
}

/// Confirmed publishing: sync send mapped to `SendStatus` honestly, async callback, and
/// oneway (at-most-once).
pub struct RocketMqPublisher {
    shared: Arc<Shared>,
    producer: Option<DefaultMQProducer>,
}

impl RocketMqPublisher {
    async fn start(shared: Arc<Shared>) -> Result<RocketMqPublisher> {
        let group = format!("{}-producer", shared.instance_prefix);
        let mut builder = DefaultMQProducer::builder(shared.host.runtime.clone())
            .client_config(shared.client_config("producer"))
            .producer_group(group)
            .name_server_addr(shared.config.namesrv.as_str())
            .send_msg_timeout(shared.config.send_timeout.as_millis() as u32)
            // Retries are Surety's, bounded by `publish_retry`.
            .retry_times_when_send_failed(0)
            .retry_times_when_send_async_failed(0)
            .retry_another_broker_when_not_store_ok(false)
            .max_message_size(crate::config::BROKER_MAX_MESSAGE_SIZE as u32);
        if let Some(hook) = shared.rpc_hook() {
            builder = builder.rpc_hook(hook);
        }
        let mut producer = builder.build();
        producer
            .start()
            .await
            .map_err(|e| admin_error(&e, "producer start"))?;
        Ok(RocketMqPublisher {
            shared,
            producer: Some(producer),
        })
    }

    fn producer(&self) -> &DefaultMQProducer {
        self.producer.as_ref().expect("producer present until drop")
    }

    /// Sends an encoded message once and maps the answer: only `SEND_OK` is a receipt.
    pub(crate) async fn send_once(
        &self,
        message: &Message,
        raw: RmqMessage,
        topic: &str,
    ) -> Result<Receipt> {
        let result = match message.key() {
            Some(key) => {
                let hash = key_hash(key);
                self.producer()
                    .send_with_selector(
                        raw,
                        move |queues: &[MessageQueue], _: &RmqMessage, _: &()| {
                            (!queues.is_empty())
                                .then(|| queues[(hash % queues.len() as u64) as usize].clone())
                        },
                        (),
                    )
                    .await
            }
            None => self.producer().send(raw).await,
        };
        match result {
            Err(e) => Err(send_error(&e, topic)),
            // The client's `Option`: no result means no confirm.
            Ok(None) => Err(Error::new(
                ErrorKind::OutcomeUnknown,
                "the client returned no send result",
            )
            .with_context("adapter", ADAPTER)
            .with_context("destination", topic)),
            Ok(Some(r)) => match status_error(r.send_status, topic) {
                Some(e) => Err(e),
                None => {
                    let mut receipt = Receipt::for_message(message);
                    if let Some(id) = r.msg_id.as_ref() {
                        receipt = receipt.with_position(id.to_string());
                    }
                    Ok(receipt)
                }
            },
        }
    }

    /// Publishes `message` to `topic` with `extra` RocketMQ properties, retrying retryable
    /// failures as `publish_retry` allows.
    pub(crate) async fn publish_to(
        &self,
        message: &Message,
        topic: &str,
        extra: &[(&'static str, String)],
    ) -> Result<Receipt> {
        let started = std::time::Instant::now();
        let span = tracing::debug_span!(
            telemetry::SPAN_PUBLISH,
            message_id = %message.id(),
            destination = %topic
        );
        let result =
            tracing::Instrument::instrument(self.publish_inner(message, topic, extra), span).await;
        telemetry::record_publish_since(
            ADAPTER,
            topic,
            result.as_ref().map(|_| ()).map_err(|e| e.kind()),
            started,
        );
        result
    }

    async fn publish_inner(
        &self,
        message: &Message,
        topic: &str,
        extra: &[(&'static str, String)],
    ) -> Result<Receipt> {
        let max = self.shared.config.max_message_size;
        codec::encode(message, topic, max)?;
        self.shared.ensure_route(topic).await?;
        let policy = &self.shared.config.publish_retry;
        let mut attempt = 1;
        loop {
            let mut raw = codec::encode(message, topic, max)?;
            for (name, value) in extra {
                use rocketmq_model::common::message::MessageTrait;
                raw.put_property(
                    CheetahString::from_static_str(name),
                    CheetahString::from(value.as_str()),
                );
            }
            match self.send_once(message, raw, topic).await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_retryable() && policy.allows_another(attempt) => {
                    tracing::warn!(
                        message_id = %message.id(),
                        attempt,
                        error = %e,
                        "rocketmq send failed; retrying"
                    );
                    tokio::time::sleep(policy.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.with_context("attempts", attempt.to_string())),
            }
        }
    }

    /// Async (callback) mode: hands the message to the client and returns once it is
    /// queued; `callback` later receives the receipt or the error, mapped exactly as
    /// [`Publisher::publish`] maps them (only `SEND_OK` is a receipt). No retry: the
    /// callback decides.
    pub async fn publish_with_callback<F>(&self, message: &Message, callback: F) -> Result<()>
    where
        F: FnOnce(Result<Receipt>) + Send + 'static,
    {
        let boxed: futures::future::BoxFuture<'_, Result<()>> =
            Box::pin(self.publish_with_callback_inner(message, callback));
        boxed.await
    }

    async fn publish_with_callback_inner<F>(&self, message: &Message, callback: F) -> Result<()>
    where
        F: FnOnce(Result<Receipt>) + Send + 'static,
    {
        let topic = message.destination().to_owned();
        let raw = codec::encode(message, &topic, self.shared.config.max_message_size)?;
        self.shared.ensure_route(&topic).await?;
        let callback = Mutex::new(Some(callback));
        let for_receipt = message.clone();
        self.producer()
            .send_with_callback(raw, move |result, error| {
                let Some(callback) = callback.lock().ok().and_then(|mut c| c.take()) else {
                    return;
                };
                let outcome = match (result, error) {
                    (_, Some(e)) => Err(send_error(e, &topic)),
                    (Some(r), None) => match status_error(r.send_status, &topic) {
                        Some(e) => Err(e),
                        None => Ok(Receipt::for_message(&for_receipt)),
                    },
                    (None, None) => Err(Error::new(
                        ErrorKind::OutcomeUnknown,
                        "the client reported neither a result nor an error",
                    )
                    .with_context("adapter", ADAPTER)),
                };
                callback(outcome);
            })
            .await
            .map_err(|e| send_error(&e, message.destination()))
    }
}

/// A stable hash of the ordering key (FNV-1a), so that every producer process picks the
/// same queue for a key.
fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[async_trait]
impl Publisher for RocketMqPublisher {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.publish_to(message, message.destination(), &[]).await
    }

    /// Oneway: **at-most-once**. The client writes the request and does not wait for any
    /// answer; a broker that is down or refuses the message loses it without an error.
    async fn publish_oneway(&self, message: &Message) -> Result<()> {
        let topic = message.destination();
        let raw = codec::encode(message, topic, self.shared.config.max_message_size)?;
        self.shared.ensure_route(topic).await?;
        self.producer()
            .send_oneway(raw)
            .await
            .map_err(|e| send_error(&e, topic))
    }
}

impl Drop for RocketMqPublisher {
    fn drop(&mut self) {
        if let Some(mut producer) = self.producer.take() {
            self.shared.host.handle.spawn(async move {
                producer.shutdown().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_stable() {
        assert_eq!(key_hash("k0"), key_hash("k0"));
        assert_ne!(key_hash("k0"), key_hash("k1"));
    }
}
