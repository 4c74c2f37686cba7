//! The operator's view of a group's dead letters on a destination, in
//! `%DLQ%<group>|<destination>`: list and re-drive ([`surety_core::DeadLetters`]).
//!
//! A RocketMQ queue cannot delete a message, so "removed from the dead letters" is a
//! *cursor*: the consume offsets of a dedicated consumer group,
//! `<group>|<destination>-surety-redrive`
//! ([`crate::RocketMqBroker::redrive_cursor_group`]). Everything before the cursor has been
//! re-driven; `list` shows the messages from the cursor on.
//!
//! - **Reading** uses a classic pull consumer of the cursor group: it reads the cursor
//!   from the broker, pulls each queue from it up to the max offset seen at the start (so
//!   a listing terminates while new dead letters arrive), and is shut down before any
//!   cursor is written. It never stores an offset itself.
//! - **Re-driving** publishes each chosen message with confirm to its original topic
//!   ([`surety_core::raw::redrive_message`]: same id, attempt count reset) and only then
//!   moves the cursor with the admin request `UPDATE_CONSUMER_OFFSET`: a crash in between
//!   re-drives the message again (the consumer's inbox absorbs the duplicate by id), never
//!   loses it.
//! - **Re-driving some ids only.** Moving a queue's cursor past a message that was *not*
//!   chosen would hide it for good, so the cursor only moves over the contiguous prefix
//!   of re-driven messages. A chosen message behind an unchosen one is re-driven but stays
//!   listed (a consume offset carries no metadata to remember it), and a later
//!   `redrive(All)` re-drives it once more: at least once, never lost.
//! - **Readable dead-letter topics.** A topic without the read permission cannot be
//!   pulled. [`surety_core::Broker::declare`] creates `%DLQ%<group>` read + write, and the
//!   5.5 broker creates its own dead-letter topics read + write too, but older material
//!   describes write-only (perm 2) ones and an operator may set one: before reading, a
//!   topic without the read bit is updated to `perm | read` on each of its brokers (see
//!   `docs/rocketmq-interop.md`).

#![allow(deprecated)] // The classic pull consumer is the client's pull-by-offset API.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cheetah_string::CheetahString;
use rocketmq_client_rust::{
    ClientOptions, DefaultMQPullConsumer, OffsetAdmin, PullStatus, TopicAdmin,
};
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::topic::TopicConfig;
use surety_core::raw::{DeadLetterLog, DeadLetterPass, PassScope, StoredDeadLetter};
use surety_core::{Error, ErrorKind, Message, Result};

use crate::ADAPTER;
use crate::codec::{self, DLQ_PREFIX};
use crate::error::admin_error;
use crate::shared::{QueueRoute, Shared, redrive_cursor_group};

/// `PermName.PERM_READ`.
const PERM_READ: u32 = 4;
/// Messages asked for in one pull.
const PULL_BATCH: i32 = 32;

/// A dead letter as pulled from its queue.
struct Record {
    queue: usize,
    offset: i64,
    stored_at: i64,
    message: Message,
}

/// One queue of the dead-letter topic and its cursor.
struct Queue {
    mq: MessageQueue,
    /// The master broker holding it.
    addr: CheetahString,
    /// The first offset not re-driven.
    next: i64,
    /// Its max offset when the scan started.
    end: i64,
}

struct Scan {
    /// The re-drive cursor's consumer group.
    cursor_group: String,
    queues: Vec<Queue>,
    /// In queue order, each queue's in offset order.
    records: Vec<Record>,
}

pub(crate) struct RocketMqDeadLetterLog {
    shared: Arc<Shared>,
}

impl RocketMqDeadLetterLog {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RocketMqDeadLetterLog { shared }
    }
}

fn rmq_error(e: &rocketmq_client_rust::ClientError, what: &str) -> Error {
    admin_error(e, what)
}

impl RocketMqDeadLetterLog {
    /// The dead-letter topic's queues with their master addresses, after making the topic
    /// readable if it is not.
    async fn queues(&self, topic: &str, destination: &str, group: &str) -> Result<Vec<Queue>> {
        let not_declared = || {
            Error::new(
                ErrorKind::Configuration,
                format!(
                    "dead-letter topic {topic} does not exist (declare {destination:?} with dead letters for group {group:?})"
                ),
            )
            .with_context("adapter", ADAPTER)
            .with_context("destination", topic)
        };
        let Some(mut route) = self.shared.route_of(topic).await? else {
            return Err(not_declared());
        };
        if route.iter().any(|q| q.perm & PERM_READ == 0) {
            self.make_readable(topic, &route).await?;
            let deadline = Instant::now() + self.shared.config.route_timeout;
            loop {
                match self.shared.route_of(topic).await? {
                    Some(r) if r.iter().all(|q| q.perm & PERM_READ != 0) => {
                        route = r;
                        break;
                    }
                    _ if Instant::now() >= deadline => {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!("{topic} was made readable but its route does not show it yet"),
                        )
                        .with_context("adapter", ADAPTER));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        let mut queues = Vec::new();
        route.sort_by(|a, b| a.broker.cmp(&b.broker));
        for q in route {
            let Some(addr) = q.master else {
                continue; // no master: nothing can be read or committed there now
            };
            for id in 0..q.read_queues as i32 {
                queues.push(Queue {
                    mq: MessageQueue::from_parts(topic, q.broker.clone(), id),
                    addr: addr.clone(),
                    next: 0,
                    end: 0,
                });
            }
        }
        if queues.is_empty() {
            return Err(not_declared());
        }
        Ok(queues)
    }

    /// Gives `topic` the read permission on every broker whose queues lack it.
    async fn make_readable(&self, topic: &str, route: &[QueueRoute]) -> Result<()> {
        for q in route.iter().filter(|q| q.perm & PERM_READ == 0) {
            let Some(addr) = q.master.clone() else {
                continue;
            };
            let mut config = TopicConfig::with_queues(topic, q.read_queues, q.write_queues);
            config.perm = q.perm | PERM_READ;
            config.topic_sys_flag = q.sys_flag;
            tracing::info!(
                %topic,
                broker = %q.broker,
                old_perm = q.perm,
                new_perm = config.perm,
                "making the dead-letter topic readable"
            );
            self.shared
                .admin()
                .create_and_update_topic_config(addr, config)
                .await
                .map_err(|e| rmq_error(&e, "update topic permission"))?;
        }
        Ok(())
    }

    /// Reads the dead letters from each queue's cursor up to its max offset at the start,
    /// at most `per_queue` per queue.
    async fn scan(&self, destination: &str, group: &str, per_queue: usize) -> Result<Scan> {
        let consumer_group = codec::consumer_group(group, destination)?;
        let topic = format!("{DLQ_PREFIX}{consumer_group}");
        let mut queues = self.queues(&topic, destination, group).await?;
        let cursor_group = redrive_cursor_group(&consumer_group);
        let shared = &self.shared;
        let mut builder = DefaultMQPullConsumer::builder(shared.host.runtime.clone())
            .client_options(ClientOptions::legacy(shared.client_config("dlq-reader")))
            .name_server_addr(shared.config.namesrv.as_str())
            .consumer_group(cursor_group.as_str());
        if let Some(hook) = shared.rpc_hook() {
            builder = builder.rpc_hook(hook);
        }
        let consumer = builder
            .build()
            .map_err(|e| rmq_error(&e, "dead-letter reader"))?;
        consumer
            .start()
            .await
            .map_err(|e| rmq_error(&e, "dead-letter reader start"))?;
        let result = pull_all(
            &consumer,
            &mut queues,
            per_queue,
            shared.config.route_timeout,
        )
        .await;
        // Shut down before any cursor is written, so the reader can never store a stale
        // offset over it.
        if let Err(e) = consumer.shutdown().await {
            tracing::warn!(error = %e, "dead-letter reader shutdown");
        }
        let records = result?;
        Ok(Scan {
            cursor_group,
            queues,
            records,
        })
    }
}

async fn pull_all(
    consumer: &DefaultMQPullConsumer,
    queues: &mut [Queue],
    per_queue: usize,
    timeout: Duration,
) -> Result<Vec<Record>> {
    let deadline = Instant::now() + timeout.max(Duration::from_secs(10));
    let mut records = Vec::new();
    for (i, q) in queues.iter_mut().enumerate() {
        let stored = consumer
            .fetch_consume_offset(&q.mq, true)
            .await
            .map_err(|e| rmq_error(&e, "re-drive cursor"))?;
        let min = consumer
            .min_offset(&q.mq)
            .await
            .map_err(|e| rmq_error(&e, "dead-letter min offset"))?;
        q.end = consumer
            .max_offset(&q.mq)
            .await
            .map_err(|e| rmq_error(&e, "dead-letter max offset"))?;
        // -1: the cursor group never moved on this queue.
        q.next = stored.max(min);
        let mut offset = q.next;
        let mut taken = 0;
        while offset < q.end && taken < per_queue {
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    "could not read the dead-letter topic to its end in time",
                )
                .with_context("adapter", ADAPTER));
            }
            let result = consumer
                .pull(&q.mq, "*", offset, PULL_BATCH)
                .await
                .map_err(|e| rmq_error(&e, "dead-letter pull"))?;
            let next = result.next_begin_offset() as i64;
            match result.pull_status() {
                PullStatus::Found => {
                    for m in result.msg_found_list().unwrap_or_default() {
                        let at = m.queue_offset();
                        if at < offset || at >= q.end || taken >= per_queue {
                            continue;
                        }
                        let message = match codec::decode(m, codec::Lane::Open) {
                            Ok((message, _)) => message,
                            Err(_) => {
                                Message::new(m.topic().to_string(), m.body().unwrap_or_default())
                            }
                        };
                        records.push(Record {
                            queue: i,
                            offset: at,
                            stored_at: m.store_timestamp(),
                            message,
                        });
                        taken += 1;
                    }
                }
                _ if next <= offset => break,
                _ => {}
            }
            if next <= offset {
                break;
            }
            offset = next;
        }
    }
    Ok(records)
}

/// One pass: the records read at open, served in order; removing one marks it, and
/// closing a re-drive pass moves each queue's cursor over its contiguous prefix of
/// removed records.
struct Pass {
    shared: Arc<Shared>,
    cursor_group: String,
    queues: Vec<Queue>,
    records: Vec<Record>,
    at: usize,
    removed: HashSet<(usize, i64)>,
    redrive: bool,
}

#[async_trait]
impl DeadLetterLog for RocketMqDeadLetterLog {
    async fn open(
        &self,
        destination: &str,
        group: &str,
        scope: PassScope,
    ) -> Result<Box<dyn DeadLetterPass>> {
        let per_queue = match scope {
            PassScope::List { limit } => limit,
            PassScope::Redrive => usize::MAX,
        };
        let scan = self.scan(destination, group, per_queue).await?;
        let mut records = scan.records;
        if let PassScope::List { .. } = scope {
            // Oldest first across queues; each queue's own order is kept.
            records.sort_by_key(|r| (r.stored_at, r.queue, r.offset));
        }
        Ok(Box::new(Pass {
            shared: self.shared.clone(),
            cursor_group: scan.cursor_group,
            queues: scan.queues,
            records,
            at: 0,
            removed: HashSet::new(),
            redrive: scope == PassScope::Redrive,
        }))
    }
}

#[async_trait]
impl DeadLetterPass for Pass {
    async fn next(&mut self) -> Result<Option<StoredDeadLetter>> {
        let Some(r) = self.records.get(self.at) else {
            return Ok(None);
        };
        self.at += 1;
        let q = &self.queues[r.queue].mq;
        Ok(Some(StoredDeadLetter {
            message: r.message.clone(),
            position: Some(format!(
                "broker {} queue {} offset {}",
                q.broker_name(),
                q.queue_id(),
                r.offset
            )),
        }))
    }

    async fn remove(&mut self) -> Result<()> {
        if let Some(r) = self.at.checked_sub(1).and_then(|i| self.records.get(i)) {
            self.removed.insert((r.queue, r.offset));
        }
        Ok(())
    }

    /// Moves the cursors, after a failure too: a later re-drive then starts after what
    /// was re-driven. A removed message behind one that stays cannot be skipped by a
    /// consume offset: it stays listed, and a later re-drive sends it again.
    async fn close(self: Box<Self>) -> Result<()> {
        if !self.redrive {
            return Ok(());
        }
        let cursor_group = CheetahString::from(self.cursor_group.as_str());
        let mut failure = None;
        for (i, q) in self.queues.iter().enumerate() {
            let mut next = q.next;
            for r in self.records.iter().filter(|r| r.queue == i) {
                if !self.removed.contains(&(i, r.offset)) {
                    break;
                }
                next = r.offset + 1;
            }
            if next <= q.next {
                continue;
            }
            if let Err(e) = self
                .shared
                .admin()
                .update_consume_offset(
                    q.addr.clone(),
                    cursor_group.clone(),
                    q.mq.clone(),
                    next as u64,
                )
                .await
            {
                failure = Some(rmq_error(&e, "re-drive cursor update"));
            }
        }
        failure.map_or(Ok(()), Err)
    }
}
