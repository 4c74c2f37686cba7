//! Confirmed publishing: a sync send mapped to `SendStatus` honestly (only `SEND_OK` is a
//! receipt), the async callback mode, and oneway (at-most-once). Validation, span,
//! metrics and the bounded publish retries are the shared publish path's.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cheetah_string::CheetahString;
use rocketmq_client_rust::DefaultMQProducer;
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::common::message::message_single::Message as RmqMessage;
use surety_core::raw::{Publish, Sender};
use surety_core::{Error, ErrorKind, Message, Publisher, Receipt, Result};

use crate::ADAPTER;
use crate::codec;
use crate::error::{admin_error, send_error, status_error};
use crate::shared::Shared;

/// The adapter's confirmed publisher, with the RocketMQ-specific modes (async callback).
pub struct RocketMqPublisher {
    publish: Publish<RocketMqSender>,
}

impl RocketMqPublisher {
    pub(crate) async fn start(shared: Arc<Shared>) -> Result<RocketMqPublisher> {
        let path = shared.publish_path();
        Ok(RocketMqPublisher {
            publish: Publish::new(path, RocketMqSender::start(shared).await?),
        })
    }

    /// Publishes `message` to `topic` with `extra` RocketMQ properties (a retry copy, a
    /// dead letter), through the shared publish path without its validation.
    pub(crate) async fn publish_to(
        &self,
        message: &Message,
        topic: &str,
        extra: &[(&'static str, String)],
    ) -> Result<Receipt> {
        let sender = self.publish.sender();
        self.publish
            .path()
            .run(message, topic, || sender.send_to(message, topic, extra))
            .await
    }

    /// Async (callback) mode: hands the message to the client and returns once it is
    /// queued; `callback` later receives the receipt or the error, mapped exactly as
    /// [`Publisher::publish`] maps them (only `SEND_OK` is a receipt). No retry: the
    /// callback decides.
    pub async fn publish_with_callback<F>(&self, message: &Message, callback: F) -> Result<()>
    where
        F: FnOnce(Result<Receipt>) + Send + 'static,
    {
        self.publish.path().check(message)?;
        let boxed: futures::future::BoxFuture<'_, Result<()>> = Box::pin(
            self.publish
                .sender()
                .publish_with_callback_inner(message, callback),
        );
        boxed.await
    }
}

#[async_trait]
impl Publisher for RocketMqPublisher {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.publish.publish(message).await
    }

    /// Oneway: **at-most-once**. The client writes the request and does not wait for any
    /// answer; a broker that is down or refuses the message loses it without an error.
    async fn publish_oneway(&self, message: &Message) -> Result<()> {
        self.publish.publish_oneway(message).await
    }
}

/// One send through the client's producer.
pub(crate) struct RocketMqSender {
    shared: Arc<Shared>,
    producer: Option<DefaultMQProducer>,
}

impl RocketMqSender {
    async fn start(shared: Arc<Shared>) -> Result<RocketMqSender> {
        let mut builder = DefaultMQProducer::builder(shared.host.runtime.clone())
            .client_config(shared.client_config("producer"))
            .producer_group(shared.producer_group())
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
        Ok(RocketMqSender {
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

    /// Encodes `message` for `topic` with `extra` properties (a copy: Surety's message
    /// rules are not applied again), checks the route, sends once.
    async fn send_to(
        &self,
        message: &Message,
        topic: &str,
        extra: &[(&'static str, String)],
    ) -> Result<Receipt> {
        let mut raw = codec::encode_copy(message, topic)?;
        self.shared.ensure_route(topic).await?;
        for (name, value) in extra {
            raw.put_property(
                CheetahString::from_static_str(name),
                CheetahString::from(value.as_str()),
            );
        }
        self.send_once(message, raw, topic).await
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

#[async_trait]
impl Sender for RocketMqSender {
    async fn send(&self, message: &Message) -> Result<Receipt> {
        self.send_to(message, message.destination(), &[]).await
    }

    async fn send_oneway(&self, message: &Message) -> Result<()> {
        let topic = message.destination();
        let raw = codec::encode(message, topic, self.shared.config.max_message_size)?;
        self.shared.ensure_route(topic).await?;
        self.producer()
            .send_oneway(raw)
            .await
            .map_err(|e| send_error(&e, topic))
    }
}

impl Drop for RocketMqSender {
    fn drop(&mut self) {
        if let Some(mut producer) = self.producer.take() {
            self.shared.host.handle.spawn(async move {
                producer.shutdown().await;
            });
        }
    }
}

/// A stable hash of the ordering key (FNV-1a), so that every producer process picks the
/// same queue for a key.
fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
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
