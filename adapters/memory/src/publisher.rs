//! Publishing: a message is appended to its destination and to every group's queue, and
//! that is the confirm. Validation, span and metrics are the shared publish path's.

use std::sync::Arc;

use async_trait::async_trait;
use surety_core::raw::Sender;
use surety_core::{Message, Receipt, Result};

use crate::shared::Shared;

pub(crate) struct MemorySender {
    shared: Arc<Shared>,
}

impl MemorySender {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemorySender { shared }
    }
}

#[async_trait]
impl Sender for MemorySender {
    async fn send(&self, message: &Message) -> Result<Receipt> {
        let receipt = Shared::publish_locked(&mut self.shared.lock(), message)?;
        self.shared.wake();
        Ok(receipt)
    }

    async fn send_oneway(&self, message: &Message) -> Result<()> {
        // In process nothing can be lost between hand-off and store, but a oneway caller
        // must not rely on the error either: it only reports an undeclared destination.
        self.send(message).await.map(|_| ())
    }
}
