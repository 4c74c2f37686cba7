//! State shared by the broker object, its publishers, subscribers and transactions:
//! connection settings, the client runtime, the admin client (topics and routes) and the
//! cache of routed topics.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cheetah_string::CheetahString;
use rocketmq_client_rust::{
    AclClientRPCHook, ClientConfig, ConsumerAdmin, DefaultMQAdminExt, RouteAdmin,
    SessionCredentials, TopicAdmin,
};
use rocketmq_model::topic::TopicConfig;
use rocketmq_transport::api::RPCHook;
use surety_core::raw::PublishPath;
use surety_core::{Capabilities, Capability, Error, ErrorKind, Result};

use crate::ADAPTER;
use crate::codec;
use crate::config::RocketMqConfig;
use crate::error::admin_error;
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
    /// Starts the client runtime and the admin client of `config`, and checks that the
    /// name server knows a master broker.
    pub(crate) async fn connect(config: RocketMqConfig) -> Result<Arc<Shared>> {
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
        Ok(shared)
    }

    /// What the adapter offers with these settings.
    pub(crate) fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with(Capability::OnewayPublish)
            .with(Capability::HalfMessages)
            .with(Capability::NativeHalfMessages)
            .with(Capability::OrderingPerKey)
            .with(Capability::DelayedRetry)
            .with(Capability::DeadLetter)
            .with_max_message_size(self.config.max_message_size)
    }

    /// The publish path of this adapter: validation, span, metrics, retries.
    pub(crate) fn publish_path(&self) -> PublishPath {
        PublishPath::new(ADAPTER, self.capabilities()).with_retry(self.config.publish_retry.clone())
    }

    /// The name of the producer group of this client's plain producer.
    pub(crate) fn producer_group(&self) -> String {
        format!("{}-producer", self.instance_prefix)
    }

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

/// The consumer group whose consume offsets on `%DLQ%<consumer group>` mark what was
/// re-driven: `<consumer group>-surety-redrive` (see [`codec::consumer_group`]).
pub(crate) fn redrive_cursor_group(consumer_group: &str) -> String {
    format!("{consumer_group}-surety-redrive")
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

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}
