//! A lane: one partition's records, processed in order, one at a time, each settled
//! before the next (its offset committed, or the record retried in place).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use surety_core::raw::Settle;
use surety_core::{Delivery, Message, Result};
use tokio::sync::mpsc;

use super::{Core, Ctx, Gate, partition_list};
use crate::codec::{Origin, decode, retry_message};
use crate::shared::blocking;

/// One partition's records, processed in order.
pub(super) struct Lane {
    pub(super) core: Arc<Core>,
    pub(super) consumer: Arc<BaseConsumer<Ctx>>,
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) gate: Arc<Gate>,
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) rx: mpsc::UnboundedReceiver<OwnedMessage>,
    /// The offset to commit once nothing else is going on.
    pub(super) pending_ack: Option<i64>,
}

enum Step {
    Next,
    Stop,
}

impl Lane {
    fn stopping(&self) -> bool {
        self.core.stopping() || self.gate.revoked.load(Ordering::SeqCst)
    }

    pub(super) async fn run(mut self) {
        let mut first = true;
        let mut stop = self.core.stop.clone();
        loop {
            if self.stopping() {
                break;
            }
            let record = match self.rx.try_recv() {
                Ok(r) => r,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if let Some(next) = self.pending_ack.take() {
                        self.commit(next, None).await;
                    }
                    tokio::select! {
                        r = self.rx.recv() => match r {
                            Some(r) => r,
                            None => break,
                        },
                        _ = stop.changed() => continue,
                        // The revoke flag has no waker of its own.
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            };
            self.queued.fetch_sub(1, Ordering::SeqCst);
            if let Step::Stop = self.process(record, &mut first).await {
                break;
            }
        }
        if !self.core.crashed()
            && let Some(next) = self.pending_ack.take()
        {
            self.commit(next, None).await;
        }
        self.gate.finished.store(true, Ordering::SeqCst);
    }

    /// Commits `offset` (everything before it is done) with optional delivery metadata.
    /// Returns `false` if the partition is no longer ours.
    async fn commit(&self, offset: i64, metadata: Option<String>) -> bool {
        if self.core.crashed() {
            return false;
        }
        let (gate, consumer) = (self.gate.clone(), self.consumer.clone());
        let (topic, partition) = (self.topic.clone(), self.partition);
        let result = blocking(move || {
            let assigned = gate.assigned.lock().unwrap_or_else(|e| e.into_inner());
            if !*assigned {
                return Ok(false);
            }
            let mut tpl = TopicPartitionList::new();
            let mut elem = tpl.add_partition(&topic, partition);
            let _ = elem.set_offset(Offset::Offset(offset));
            if let Some(m) = metadata {
                elem.set_metadata(m);
            }
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                // The record will be delivered again: at least once, never lost.
                tracing::warn!(error = %e, %topic, partition, offset, "offset commit failed");
            }
            Ok(true)
        })
        .await;
        result.unwrap_or(false)
    }

    /// Deliveries of the record at `offset` already started by this group, from the
    /// metadata of the committed offset (see the module docs).
    async fn earlier_deliveries(&self, offset: i64) -> u32 {
        let consumer = self.consumer.clone();
        let tpl = partition_list(&self.topic, self.partition);
        let timeout = self.core.inner.config.request_timeout;
        blocking(move || {
            let committed = consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| crate::error::broker_error("committed offsets", &e))?;
            let found = committed.elements().first().and_then(|e| {
                if e.offset() != Offset::Offset(offset) {
                    return None;
                }
                let (at, n) = e.metadata().split_once(':')?;
                (at.parse::<i64>().ok()? == offset).then(|| n.parse::<u32>().ok())?
            });
            Ok(found.unwrap_or(0))
        })
        .await
        .unwrap_or(0)
    }

    /// Sleeps `duration` unless the lane must stop; `false` if it must.
    async fn pause(&self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            if self.stopping() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(50))).await;
        }
        !self.stopping()
    }

    async fn process(&mut self, record: OwnedMessage, first: &mut bool) -> Step {
        let core = self.core.clone();
        let offset = record.offset();
        let origin = if record.topic() == self.core.retry_topic {
            Origin::RetryTopic {
                destination: &core.subscription.destination,
                max_attempts: core.subscription.retry.max_attempts,
            }
        } else {
            Origin::Open
        };
        let decoded = decode(&record, origin);
        drop(record);
        if let Some(due) = decoded.due
            && let Ok(wait) = due.duration_since(SystemTime::now())
            && !self.pause(wait).await
        {
            return Step::Stop;
        }
        let mut deliveries = if std::mem::take(first) {
            self.earlier_deliveries(offset).await
        } else {
            0
        };
        loop {
            deliveries += 1;
            // Records the delivery before the handler runs (and acks what came before).
            if !self
                .commit(offset, Some(format!("{offset}:{deliveries}")))
                .await
            {
                return Step::Stop;
            }
            self.pending_ack = None;
            let delivery = Delivery {
                message: decoded.message.clone(),
                attempt: decoded.prior_attempts + deliveries,
                group: core.subscription.group.clone(),
            };
            let mut settle = LaneSettle {
                lane: self,
                message: &decoded.message,
                offset,
                attempt: delivery.attempt,
                next: Step::Next,
                again: false,
            };
            core.path
                .deliver(delivery, core.handler.as_ref(), &mut settle)
                .await;
            let (next, again) = (settle.next, settle.again);
            if let Step::Stop = next {
                return Step::Stop;
            }
            if !again {
                return Step::Next;
            }
        }
    }
}

/// One record being settled by its lane. Settling moves the lane's offset past the
/// record; a retry in place (ordered subscriptions, or nothing could be written) delivers
/// it again from the lane's loop.
struct LaneSettle<'a> {
    lane: &'a mut Lane,
    message: &'a Message,
    offset: i64,
    attempt: u32,
    next: Step,
    /// Deliver the same record again, in place.
    again: bool,
}

impl LaneSettle<'_> {
    /// Waits `after` in place, then the lane delivers the record again (unless it must
    /// stop).
    async fn in_place(&mut self, after: Duration) {
        if self.lane.pause(after).await {
            self.again = true;
        } else {
            self.next = Step::Stop;
        }
    }
}

#[async_trait]
impl Settle for LaneSettle<'_> {
    async fn ack(&mut self) -> Result<()> {
        self.lane.pending_ack = Some(self.offset + 1);
        Ok(())
    }

    async fn redeliver(&mut self, after: Duration, _next_attempt: u32) -> Result<()> {
        let core = self.lane.core.clone();
        if core.subscription.ordered {
            // Ordered: retry in place, holding back the rest of the partition (and so
            // every later message with this key).
            self.in_place(after).await;
            return Ok(());
        }
        let retry = retry_message(
            self.message,
            &core.retry_topic,
            self.attempt,
            SystemTime::now() + after,
        );
        core.publish
            .run(&retry, &core.retry_topic, || core.inner.send(&retry))
            .await?;
        self.lane.pending_ack = Some(self.offset + 1);
        Ok(())
    }

    async fn dead_letter(&mut self, dead_letter: &Message) -> Result<()> {
        let core = self.lane.core.clone();
        core.publish
            .run(dead_letter, dead_letter.destination(), || {
                core.inner.send(dead_letter)
            })
            .await
            .map(|_| ())
    }

    /// Neither lost nor hot-looped: the offset stays where it is, and the record is
    /// delivered again in place after `after`.
    async fn hold(&mut self, after: Duration, _next_attempt: u32) {
        self.in_place(after).await;
    }
}
