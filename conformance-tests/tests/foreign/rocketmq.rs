//! RocketMQ's foreign producer: the client's `DefaultMQProducer` in its own group,
//! sending to the destination topic with user properties.

use async_trait::async_trait;
use cheetah_string::CheetahString;
use rocketmq_client_rust::{
    ClientConfig, ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, TelemetryHandle,
};
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::common::message::message_single::Message as RmqMessage;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use surety_conformance::{ForeignMessage, ForeignProducer, unique_name};
use surety_rocketmq::RocketMqConfig;
use tokio::sync::Mutex;

pub struct RocketForeign {
    producer: Mutex<DefaultMQProducer>,
}

impl RocketForeign {
    /// Call off any async context: the client builds its runtime here and keeps it.
    pub fn build(config: &RocketMqConfig) -> Result<Self, String> {
        let owner = RuntimeOwner::plan(RuntimeConfig::for_parallelism("surety-foreign", 2))
            .map_err(|e| format!("foreign RocketMQ runtime: {e}"))?
            .build()
            .map_err(|e| format!("foreign RocketMQ runtime: {e}"))?;
        let runtime = ClientRuntime::try_new(
            owner.root_context().component("client"),
            ClientRuntimeConfig::default(),
            TelemetryHandle::noop(),
        )
        .map_err(|e| format!("foreign RocketMQ client runtime: {e}"))?;
        // The runtime lives as long as the test process.
        std::mem::forget(owner);
        let mut client = ClientConfig::new();
        client.set_namesrv_addr(CheetahString::from(config.namesrv.as_str()));
        client.set_instance_name(CheetahString::from(unique_name("foreign")));
        client.set_vip_channel_enabled(false);
        let producer = DefaultMQProducer::builder(runtime)
            .client_config(client)
            .producer_group(unique_name("foreign-producer"))
            .name_server_addr(config.namesrv.as_str())
            .build();
        Ok(RocketForeign {
            producer: Mutex::new(producer),
        })
    }

    pub async fn start(&self) -> Result<(), String> {
        self.producer
            .lock()
            .await
            .start()
            .await
            .map_err(|e| format!("foreign RocketMQ producer start: {e}"))
    }
}

#[async_trait]
impl ForeignProducer for RocketForeign {
    async fn send(&self, destination: &str, message: ForeignMessage) -> Result<(), String> {
        let mut out = RmqMessage::builder()
            .topic(destination)
            .body(message.body.unwrap_or_default())
            .build_unchecked();
        if let Some(id) = message.id {
            out.put_property(
                CheetahString::from_static_str("surety-message-id"),
                CheetahString::from(id),
            );
        }
        for (name, value) in message.headers {
            // A property has a non-empty text value: a null one cannot be sent.
            let Some(value) = value else { continue };
            let value = String::from_utf8_lossy(&value).into_owned();
            out.put_user_property(CheetahString::from(name), CheetahString::from(value))
                .map_err(|e| format!("property: {e}"))?;
        }
        self.producer
            .lock()
            .await
            .send(out)
            .await
            .map(|_| ())
            .map_err(|e| format!("send: {e}"))
    }

    /// The broker stores all properties of a message in at most 32 767 bytes.
    fn max_header_bytes(&self) -> usize {
        30_000
    }

    /// The client refuses an empty body before sending.
    fn empty_bodies(&self) -> bool {
        false
    }

    /// Properties are text, and never null.
    fn binary_headers(&self) -> bool {
        false
    }
}
