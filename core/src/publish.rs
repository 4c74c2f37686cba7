//! Send with confirm.

use async_trait::async_trait;

use crate::capability::Capability;
use crate::error::Result;
use crate::message::{Message, MessageId};

/// Proof that the broker took responsibility for a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The id of the confirmed message.
    pub message_id: MessageId,
    /// Where it went.
    pub destination: String,
    /// Where the broker put it, when the broker says (`partition 2 offset 17`, a RocketMQ
    /// message id).
    pub position: Option<String>,
}

impl Receipt {
    /// A receipt for `message` without a position.
    pub fn for_message(message: &Message) -> Self {
        Receipt {
            message_id: message.id().clone(),
            destination: message.destination().to_owned(),
            position: None,
        }
    }

    /// Sets the broker position.
    pub fn with_position(mut self, position: impl Into<String>) -> Self {
        self.position = Some(position.into());
        self
    }
}

/// Publishes messages with confirm.
///
/// `publish` returns `Ok` only once the broker has taken responsibility for the message
/// (RabbitMQ publisher confirm without a return, Kafka delivery report with `acks=all`,
/// RocketMQ `SEND_OK`). Any other outcome is an [`crate::Error`] whose kind says whether a retry
/// can help. Retrying is safe with respect to effects: the message id stays the same, so
/// an idempotent consumer absorbs a duplicate.
///
/// The trait is object safe: hold an `Arc<dyn Publisher>` without knowing the broker.
///
/// ```
/// use std::sync::Arc;
/// use surety_core::{Message, Publisher, Result};
///
/// /// A library that only knows the contract.
/// struct OrderEvents {
///     publisher: Arc<dyn Publisher>,
/// }
///
/// impl OrderEvents {
///     async fn order_placed(&self, order_id: u64) -> Result<()> {
///         let message = Message::json("orders", &order_id)?.with_key(order_id.to_string());
///         self.publisher.publish(&message).await?;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one message and waits for the broker's confirm.
    async fn publish(&self, message: &Message) -> Result<Receipt>;

    /// Publishes many messages with their confirms in flight at once, returning one result
    /// per message in the same order. A failure of one does not stop the others.
    async fn publish_batch(&self, messages: &[Message]) -> Vec<Result<Receipt>> {
        futures::future::join_all(messages.iter().map(|m| self.publish(m))).await
    }

    /// Fire-and-forget: hands the message to the client and returns without a confirm.
    ///
    /// **At-most-once**: a message sent this way can be lost without any error. Use it
    /// only for data whose loss is acceptable (metrics, logs). Adapters without it return
    /// an [`crate::ErrorKind::Unsupported`] error.
    async fn publish_oneway(&self, message: &Message) -> Result<()> {
        let _ = message;
        Err(Capability::OnewayPublish.unsupported("this adapter"))
    }
}
