//! Confirmed sends through the idempotent producer, and oneway sends. Validation, span,
//! metrics and retries are the shared publish path's.

use std::sync::Arc;

use async_trait::async_trait;
use rdkafka::producer::FutureRecord;
use surety_core::raw::Sender;
use surety_core::{Message, Receipt, Result};

use crate::codec::record_headers;
use crate::error::delivery_error;
use crate::shared::Inner;

pub(crate) struct KafkaSender {
    inner: Arc<Inner>,
}

impl KafkaSender {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        KafkaSender { inner }
    }
}

#[async_trait]
impl Sender for KafkaSender {
    async fn send(&self, message: &Message) -> Result<Receipt> {
        self.inner.send(message).await
    }

    async fn send_oneway(&self, message: &Message) -> Result<()> {
        self.inner.check_topic(message.destination()).await?;
        let producer = self.inner.producer();
        // Enqueued, report ignored: at-most-once as documented.
        match producer.send_result(record_of(message)) {
            Ok(_report) => Ok(()),
            Err((e, _)) => Err(delivery_error(&e, message.destination())),
        }
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
