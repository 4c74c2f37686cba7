//! Dead letters of a consumer group: the queue `<d>.<g>.dlq:dead-letters` that
//! [`crate::RabbitBroker`]'s `declare` binds to the group's dead-letter destination.
//!
//! AMQP 0-9-1 has no way to read a queue without taking messages out of it, so both
//! operations take messages with `basic.get` and manual acks, on a channel of their own:
//!
//! - **list** takes up to `limit` messages and never acks them; closing the channel hands
//!   them all back to the queue. Nothing is lost, even if this process dies mid-list (the
//!   broker requeues unacked messages of a dead channel). What a listing does to the queue:
//!   the messages are marked `redelivered`, a quorum queue counts one more delivery in
//!   their `x-delivery-count`, and while the listing runs they are invisible to other
//!   readers of the dead-letter queue. Classic queues put them back at their old position;
//!   quorum queues deliver returned messages before the rest, and the order of several
//!   returned at once is the broker's (a full listing came back in order in our tests; a
//!   re-drive that took some out of the middle did not always), so listing order is
//!   oldest first only as far as the queue keeps it. A quorum queue with a `x-delivery-limit` (RabbitMQ
//!   4 sets 20 by default; 3.x none) drops or dead-letters a message past that many
//!   returns, so on RabbitMQ 4 a dead letter listed very often can leave the queue: the
//!   dead-letter queue then needs a policy with a high delivery limit.
//! - **redrive** walks the queue the same way (at most the messages it held when the
//!   re-drive began, so a message dead-lettered again meanwhile is not re-driven twice in
//!   one call, and an unselected message is taken at most once). Removing a dead letter
//!   acks it; core's re-drive rule (`raw::DeadLetterQueue`) does so only after the
//!   re-driven copy is confirmed. Every message not acked (unselected, or one whose
//!   publish failed) goes back to the queue when the channel closes; a crash at any point
//!   re-drives again, never loses.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::Channel;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use surety_core::raw::{DeadLetterLog, DeadLetterPass, PassScope, StoredDeadLetter};
use surety_core::{Error, ErrorKind, Result};

use crate::ADAPTER;
use crate::codec;
use crate::error;
use crate::shared::Connector;
use crate::topology::{self, DEAD_LETTER_GROUP};

pub(crate) struct RabbitDeadLetterLog {
    connector: Arc<Connector>,
}

impl RabbitDeadLetterLog {
    pub(crate) fn new(connector: Arc<Connector>) -> Self {
        RabbitDeadLetterLog { connector }
    }
}

/// The dead-letter destination and its queue, checked.
fn names(destination: &str, group: &str) -> Result<(String, String)> {
    topology::check_destination(destination)?;
    topology::validate_group(group)?;
    let dead = topology::dead_letter_name(destination, group);
    let queue = topology::group_queue(&dead, DEAD_LETTER_GROUP);
    Ok((dead, queue))
}

/// A channel for one walk of `queue`, and the messages ready in it now. A queue that
/// does not exist is a configuration error (the passive declare closes the channel).
async fn open(connector: &Connector, queue: &str) -> Result<(Channel, u32)> {
    let channel = connector.channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => Ok((channel, q.message_count())),
        Err(e) => Err(error::topology(
            &format!(
                "find the dead-letter queue {queue:?} (declare the destination with dead letters for this group first)"
            ),
            e,
        )
        .with_context("queue", queue)),
    }
}

/// How long [`Walk::close`] waits for returned messages to be counted.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes a walk's channel: every message still unacked on it returns to the queue.
async fn close_channel(channel: &Channel) {
    if let Err(e) = channel.close(200, "OK".into()).await {
        // The broker requeues the unacked messages of a channel that died anyway.
        tracing::debug!(adapter = ADAPTER, error = %e, "closing the dead-letter channel failed");
    }
}

/// One walk of the dead-letter queue on a channel of its own: messages taken with
/// `basic.get` and held unacked.
struct Walk {
    connector: Arc<Connector>,
    channel: Channel,
    dead: String,
    queue: String,
    /// Messages ready when the walk began.
    ready: u32,
    /// How many more this walk may take.
    left: u32,
    taken: u32,
    removed: u32,
    last: Option<BasicGetMessage>,
}

#[async_trait]
impl DeadLetterLog for RabbitDeadLetterLog {
    async fn open(
        &self,
        destination: &str,
        group: &str,
        scope: PassScope,
    ) -> Result<Box<dyn DeadLetterPass>> {
        let (dead, queue) = names(destination, group)?;
        let (channel, ready) = open(&self.connector, &queue).await?;
        let left = match scope {
            PassScope::List { limit } => ready.min(limit.min(u32::MAX as usize) as u32),
            // At most the messages held at the start: one dead-lettered again meanwhile
            // is left to the next re-drive, and an unselected one is taken once.
            PassScope::Redrive => ready,
        };
        Ok(Box::new(Walk {
            connector: self.connector.clone(),
            channel,
            dead,
            queue,
            ready,
            left,
            taken: 0,
            removed: 0,
            last: None,
        }))
    }
}

#[async_trait]
impl DeadLetterPass for Walk {
    async fn next(&mut self) -> Result<Option<StoredDeadLetter>> {
        self.last = None;
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let got = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(|e| {
                error::unavailable("read the dead-letter queue", e)
                    .with_context("queue", self.queue.clone())
            })?;
        let Some(got) = got else {
            self.left = 0;
            return Ok(None);
        };
        self.taken += 1;
        let d = &got.delivery;
        let stored = StoredDeadLetter {
            message: codec::decode(&self.dead, &d.properties, &d.data, codec::Lane::Open),
            position: Some(format!("{} #{}", self.queue, self.taken)),
        };
        self.last = Some(got);
        Ok(Some(stored))
    }

    async fn remove(&mut self) -> Result<()> {
        let Some(got) = self.last.take() else {
            return Ok(());
        };
        got.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::OutcomeUnknown,
                    "the re-driven message is confirmed at its destination but its dead letter could not be acked; it stays in the dead-letter queue and a later re-drive sends it again",
                )
                .with_context("adapter", ADAPTER)
                .with_source(e)
            })?;
        self.removed += 1;
        Ok(())
    }

    /// Closes the channel (every message not acked returns to the queue), then waits,
    /// bounded, until the queue shows them again. A quorum queue applies the return of a
    /// closed channel's messages asynchronously: without the wait, a list right after a
    /// list or a re-drive could find the queue briefly empty (nothing is lost, but an
    /// operator would see a wrong answer). Fewer after the timeout (someone else consumed
    /// meanwhile) is not an error.
    async fn close(self: Box<Self>) -> Result<()> {
        close_channel(&self.channel).await;
        let expected = self.ready.saturating_sub(self.removed);
        if expected == 0 {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            match open(&self.connector, &self.queue).await {
                Ok((probe, ready)) => {
                    close_channel(&probe).await;
                    if ready >= expected {
                        return Ok(());
                    }
                }
                Err(_) => return Ok(()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::debug!(
            adapter = ADAPTER,
            queue = %self.queue,
            expected,
            "dead letters not all counted back within the settle timeout"
        );
        Ok(())
    }
}
