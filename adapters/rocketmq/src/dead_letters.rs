//! The operator's view of a group's dead letters in `%DLQ%<group>`: list and re-drive
//! ([`surety_core::DeadLetters`]).
//!
//! A RocketMQ queue cannot delete a message, so "removed from the dead letters" is a
//! *cursor*: the consume offsets of a dedicated consumer group, `<group>-surety-redrive`
//! ([`RocketMqBroker::redrive_cursor_group`]). Everything before the cursor has been
//! re-driven; `list` shows the messages from the cursor on.
//!
//! - **Reading** uses a classic pull consumer of the cursor group: it reads the cursor
//!   from the broker, pulls each queue from it up to the max offset seen at the start (so
//!   a listing terminates while new dead letters arrive), and is shut down before any
//!   cursor is written. It never stores an offset itself.
//! - **Re-driving** publishes each chosen message with confirm to its original topic
//!   ([`surety_core::redrive_message`]: same id, attempt count reset) and only then
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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cheetah_string::CheetahString;
use rocketmq_client_rust::{
    ClientOptions, DefaultMQPullConsumer, OffsetAdmin, PullStatus, TopicAdmin,
};
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::topic::TopicConfig;
use surety_core::{
    DeadLetter, DeadLetters, Error, ErrorKind, Message, MessageId, RedriveReport, RedriveSelection,
    Result, redrive_message,
};

use crate::ADAPTER;
use crate::broker::{QueueRoute, RocketMqBroker, RocketMqPublisher, Shared};
use crate::codec::{self, DLQ_PREFIX};
use crate::error::admin_error;

/// `PermName.PERM_READ`.
const PERM_READ: u32 = 4;
/// Messages asked for in one pull.
const PULL_BATCH: i32 = 32;

impl RocketMqBroker {
    /// The consumer group whose consume offsets on `%DLQ%<group>` mark what was
    /// re-driven: `<group>-surety-redrive`.
    pub fn redrive_cursor_group(group: &str) -> String {
        format!("{group}-surety-redrive")
    }

    /// The permission bits (`PermName`: 2 write, 4 read) of `topic` on its brokers, as
    /// the name server routes it; `None` if it has no route.
    pub async fn topic_permissions(&self, topic: &str) -> Result<Option<Vec<u32>>> {
        Ok(self
            .shared
            .route_of(topic)
            .await?
            .map(|r| r.iter().map(|q| q.perm).collect()))
    }
}

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
    queues: Vec<Queue>,
    /// In queue order, each queue's in offset order.
    records: Vec<Record>,
}

pub(crate) struct RocketMqDeadLetters {
    pub(crate) shared: Arc<Shared>,
    pub(crate) publisher: Arc<RocketMqPublisher>,
}

fn rmq_error(e: &rocketmq_client_rust::ClientError, what: &str) -> Error {
    admin_error(e, what)
}

impl RocketMqDeadLetters {
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
        codec::validate_topic(group)?;
        let topic = format!("{DLQ_PREFIX}{group}");
        let mut queues = self.queues(&topic, destination, group).await?;
        let cursor_group = RocketMqBroker::redrive_cursor_group(group);
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
        Ok(Scan { queues, records })
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
                        let message = match codec::decode(m) {
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

#[async_trait]
impl DeadLetters for RocketMqDeadLetters {
    async fn list(&self, destination: &str, group: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let scan = self.scan(destination, group, limit).await?;
        let mut records = scan.records;
        // Oldest first across queues; each queue's own order is kept.
        records.sort_by_key(|r| (r.stored_at, r.queue, r.offset));
        Ok(records
            .into_iter()
            .take(limit)
            .map(|r| {
                let q = &scan.queues[r.queue].mq;
                let position = format!(
                    "broker {} queue {} offset {}",
                    q.broker_name(),
                    q.queue_id(),
                    r.offset
                );
                DeadLetter::from_message(r.message, Some(position))
            })
            .collect())
    }

    async fn redrive(
        &self,
        destination: &str,
        group: &str,
        selection: &RedriveSelection,
    ) -> Result<RedriveReport> {
        let scan = self.scan(destination, group, usize::MAX).await?;
        let mut report = RedriveReport::default();
        let mut found: Vec<MessageId> = Vec::new();
        let mut published: HashSet<(MessageId, String)> = HashSet::new();
        // Per queue: whether every record so far was re-driven, and the cursor it allows.
        let mut prefix: HashMap<usize, (bool, i64)> = scan
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| (i, (true, q.next)))
            .collect();
        let mut failure = None;
        for r in &scan.records {
            let chosen = match selection {
                RedriveSelection::All => true,
                RedriveSelection::Ids(ids) => ids.contains(r.message.id()),
            };
            let entry = prefix.entry(r.queue).or_insert((true, 0));
            if !chosen {
                entry.0 = false;
                continue;
            }
            found.push(r.message.id().clone());
            // Confirmed at the origin first; the cursor moves after (below).
            let fresh = redrive_message(&r.message, destination);
            if !published.insert((fresh.id().clone(), fresh.destination().to_owned())) {
                // Another copy of a message this re-drive published (%DLQ% holds every
                // topic of the group, hence the destination in the key).
                if entry.0 {
                    entry.1 = r.offset + 1;
                }
                continue;
            }
            match self
                .publisher
                .publish_to(&fresh, fresh.destination(), &[])
                .await
            {
                Ok(receipt) => {
                    report.redriven.push(receipt);
                    if entry.0 {
                        entry.1 = r.offset + 1;
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let RedriveSelection::Ids(ids) = selection {
            for id in ids {
                if !found.contains(id) && !report.not_found.contains(id) {
                    report.not_found.push(id.clone());
                }
            }
        }
        // Move the cursors even when a publish failed: a later re-drive then starts
        // after what was re-driven.
        let cursor_group = CheetahString::from(RocketMqBroker::redrive_cursor_group(group));
        let mut commit_error = None;
        for (i, q) in scan.queues.iter().enumerate() {
            let (_, next) = prefix[&i];
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
                commit_error = Some(rmq_error(&e, "re-drive cursor update"));
            }
        }
        if let Some(e) = failure {
            return Err(
                e.with_context("redriven_before_failure", report.redriven.len().to_string())
            );
        }
        if let Some(e) = commit_error {
            // Published, but a cursor did not move: a later re-drive repeats those.
            return Err(e.with_context("redriven", report.redriven.len().to_string()));
        }
        Ok(report)
    }
}
