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
//!   one call, and an unselected message is taken at most once); for each selected message it publishes [`redrive_message`] with confirm
//!   to the original destination and acks the dead letter only after the confirm. A failed
//!   publish stops the walk; that message and every unselected one go back to the queue
//!   when the channel closes (a crash at any point re-drives again, never loses: the
//!   message id is kept, so the consumer's inbox absorbs a duplicate).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::Channel;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use surety_core::{
    DeadLetter, DeadLetters, Error, ErrorKind, MessageId, Publisher, RedriveReport,
    RedriveSelection, Result, redrive_message,
};

use crate::ADAPTER;
use crate::broker::DEAD_LETTER_GROUP;
use crate::codec;
use crate::connection::Connector;
use crate::error;
use crate::publisher::RabbitPublisher;
use crate::topology;

pub(crate) struct RabbitDeadLetters {
    connector: Arc<Connector>,
    publisher: RabbitPublisher,
}

impl RabbitDeadLetters {
    pub(crate) fn new(connector: Arc<Connector>) -> Self {
        RabbitDeadLetters {
            publisher: RabbitPublisher::new(connector.clone()),
            connector,
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
    async fn open(&self, queue: &str) -> Result<(Channel, u32)> {
        let channel = self.connector.channel().await?;
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

    /// The next message of `queue`, held unacked on `channel`.
    async fn take(channel: &Channel, queue: &str) -> Result<Option<BasicGetMessage>> {
        channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| {
                error::unavailable("read the dead-letter queue", e).with_context("queue", queue)
            })
    }
}

/// How long [`RabbitDeadLetters::release`] waits for returned messages to be counted.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes a walk's channel: every message still unacked on it returns to the queue.
async fn close(channel: &Channel) {
    if let Err(e) = channel.close(200, "OK".into()).await {
        // The broker requeues the unacked messages of a channel that died anyway.
        tracing::debug!(adapter = ADAPTER, error = %e, "closing the dead-letter channel failed");
    }
}

impl RabbitDeadLetters {
    /// Closes the walk's channel and waits (bounded) until the queue shows at least
    /// `expected` ready messages again (the count at the start, less those acked). A quorum queue applies the return of a closed
    /// channel's messages asynchronously: without the wait, a list right after a list or
    /// a re-drive could find the queue briefly empty (nothing is lost, but an operator
    /// would see a wrong answer). Fewer than `expected` after the timeout (someone else
    /// consumed meanwhile) is not an error.
    async fn release(&self, channel: &Channel, queue: &str, expected: u32) {
        close(channel).await;
        if expected == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            match self.open(queue).await {
                Ok((probe, ready)) => {
                    close(&probe).await;
                    if ready >= expected {
                        return;
                    }
                }
                Err(_) => return,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::debug!(
            adapter = ADAPTER,
            queue,
            expected,
            "dead letters not all counted back within the settle timeout"
        );
    }
}

#[async_trait]
impl DeadLetters for RabbitDeadLetters {
    async fn list(&self, destination: &str, group: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        let (dead, queue) = Self::names(destination, group)?;
        let (channel, ready) = self.open(&queue).await?;
        let mut out = Vec::new();
        let result = async {
            while out.len() < limit {
                let Some(got) = Self::take(&channel, &queue).await? else {
                    break;
                };
                let d = &got.delivery;
                let message = codec::decode(&dead, &d.properties, &d.data);
                let position = format!("{queue} #{}", out.len() + 1);
                out.push(DeadLetter::from_message(message, Some(position)));
            }
            Ok(())
        }
        .await;
        // Nothing was acked: closing hands every message back.
        self.release(&channel, &queue, ready).await;
        result.map(|()| out)
    }

    async fn redrive(
        &self,
        destination: &str,
        group: &str,
        selection: &RedriveSelection,
    ) -> Result<RedriveReport> {
        let (dead, queue) = Self::names(destination, group)?;
        let (channel, ready) = self.open(&queue).await?;
        let mut report = RedriveReport::default();
        let wanted: Option<&[MessageId]> = match selection {
            RedriveSelection::All => None,
            RedriveSelection::Ids(ids) => Some(ids),
        };
        let mut found: Vec<MessageId> = Vec::new();
        let mut published: HashSet<(MessageId, String)> = HashSet::new();
        let mut removed: u32 = 0;
        let result: Result<()> = async {
            // Every copy of a selected message is taken off the queue (a message
            // dead-lettered twice has two) and the message published once, so the walk
            // covers the whole queue as it was at the start.
            for _ in 0..ready {
                let Some(got) = Self::take(&channel, &queue).await? else {
                    break;
                };
                let d = &got.delivery;
                let stored = codec::decode(&dead, &d.properties, &d.data);
                if wanted.is_some_and(|ids| !ids.contains(stored.id())) {
                    // Held unacked until the channel closes, then back in the queue.
                    continue;
                }
                if !found.contains(stored.id()) {
                    found.push(stored.id().clone());
                }
                let fresh = redrive_message(&stored, destination);
                let first = published.insert((fresh.id().clone(), fresh.destination().to_owned()));
                let receipt = if first {
                    Some(self.publisher.publish(&fresh).await.map_err(|e| {
                        e.with_context("message_id", stored.id().as_str())
                            .with_context("redriven_before_failure", report.redriven.len().to_string())
                    })?)
                } else {
                    None // another copy of a message confirmed above: acked only
                };
                // Acked only after the confirm: a crash before this line re-drives it again.
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::OutcomeUnknown,
                            "the re-driven message is confirmed at its destination but its dead letter could not be acked; it stays in the dead-letter queue and a later re-drive sends it again",
                        )
                        .with_context("adapter", ADAPTER)
                        .with_context("message_id", stored.id().as_str())
                        .with_source(e)
                    })?;
                removed += 1;
                report.redriven.extend(receipt);
            }
            Ok(())
        }
        .await;
        // Unselected messages (and one whose publish failed) go back to the queue.
        let left = ready.saturating_sub(removed);
        self.release(&channel, &queue, left).await;
        result?;
        if let Some(ids) = wanted {
            for id in ids {
                if !found.contains(id) && !report.not_found.contains(id) {
                    report.not_found.push(id.clone());
                }
            }
        }
        Ok(report)
    }
}
