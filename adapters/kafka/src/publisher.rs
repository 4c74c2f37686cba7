//! Confirmed sends through the idempotent producer, and oneway sends. Validation, span,
//! metrics and retries are the shared publish path's.

use std::sync::Arc;

use async_trait::async_trait;
use surety_core::raw::Sender;
use surety_core::{Message, Receipt, Result};

use crate::codec::record_of;
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
