//! The operator's view of a group's dead-letter topic `<topic>.<group>.dlq`: list and
//! re-drive ([`surety_core::DeadLetters`]).
//!
//! A Kafka log cannot delete a record, so "removed from the dead letters" is a *cursor*:
//! the committed offsets of a dedicated consumer group, `<group>.surety-redrive`
//! ([`crate::KafkaBroker::redrive_cursor_group`]). Everything before the cursor has been
//! re-driven; `list` shows the records from the cursor on.
//!
//! - **Reading** uses a consumer of the cursor group that is *assigned* the partitions
//!   (it never joins the group, so nothing rebalances) and never commits while reading.
//!   It stops at the high watermarks seen when it started, so a listing terminates even
//!   while new dead letters arrive.
//! - **Re-driving** publishes each chosen record with confirm to its original topic
//!   ([`surety_core::raw::redrive_message`]: same id, attempt count reset), and only then
//!   moves the cursor: a crash in between re-drives the record again (the consumer's
//!   inbox absorbs the duplicate by id), never loses it.
//! - **Re-driving some ids only.** Moving a partition's cursor past a record that was
//!   *not* chosen would hide that record for good, so the cursor only moves over the
//!   contiguous prefix of re-driven records. Records re-driven beyond that prefix are
//!   remembered in the commit's metadata (`surety-redriven:<offset>,...`), so that they are
//!   neither listed nor re-driven again; the cursor absorbs them once the records before
//!   them are re-driven too. The metadata is bounded (the broker's
//!   `offset.metadata.max.bytes`, 4096 by default): offsets that do not fit are forgotten,
//!   and those records would be re-driven once more by a later `redrive(All)` (at least
//!   once, never lost).
//!
//! Two re-drives of one group at the same time may both publish a record: at least once.
//! Every librdkafka call here blocks, so it runs in `spawn_blocking`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, DefaultConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use surety_core::raw::{DeadLetterLog, DeadLetterPass, PassScope, StoredDeadLetter};
use surety_core::{Error, ErrorKind, Message, Result};

use crate::ADAPTER;
use crate::codec::{Origin, decode};
use crate::config::create;
use crate::error::broker_error;
use crate::shared::{Inner, blocking, dead_letter_topic, redrive_cursor_group, validate_topic};

/// Prefix of the commit metadata listing offsets re-driven beyond the cursor.
const REDRIVEN_PREFIX: &str = "surety-redriven:";
/// Longest commit metadata written (below the broker's default limit of 4096 bytes).
const MAX_METADATA: usize = 3000;

/// A dead letter as read from the topic.
#[derive(Clone)]
struct Record {
    partition: i32,
    offset: i64,
    timestamp: i64,
    message: Message,
    /// Re-driven already (recorded in the cursor's metadata).
    redriven: bool,
}

/// One partition's cursor: the next offset not re-driven, and the offsets beyond it that
/// were re-driven already.
#[derive(Default)]
struct Cursor {
    next: i64,
    high: i64,
    done: BTreeSet<i64>,
}

/// What one pass over the dead-letter topic found.
struct Scan {
    consumer: BaseConsumer,
    cursors: HashMap<i32, Cursor>,
    /// Per partition in offset order, partitions in order.
    records: Vec<Record>,
    /// Every partition was read up to the high watermark seen at the start.
    complete: bool,
}

pub(crate) struct KafkaDeadLetterLog {
    inner: Arc<Inner>,
}

impl KafkaDeadLetterLog {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        KafkaDeadLetterLog { inner }
    }
}

fn no_dead_letter_topic(topic: &str, destination: &str, group: &str) -> Error {
    Error::new(
        ErrorKind::Configuration,
        format!(
            "dead-letter topic {topic:?} does not exist (declare {destination:?} with dead letters for group {group:?})"
        ),
    )
    .with_context("adapter", ADAPTER)
    .with_context("destination", topic)
}

/// `surety-redriven:1,5,9` → {1, 5, 9}; anything else → {}.
fn parse_done(metadata: &str) -> BTreeSet<i64> {
    metadata
        .strip_prefix(REDRIVEN_PREFIX)
        .map(|list| list.split(',').filter_map(|o| o.parse().ok()).collect())
        .unwrap_or_default()
}

/// The metadata for `done`, keeping the lowest offsets that fit in [`MAX_METADATA`].
fn format_done(done: &BTreeSet<i64>) -> String {
    let mut out = String::new();
    for offset in done {
        let item = offset.to_string();
        if REDRIVEN_PREFIX.len() + out.len() + item.len() + 1 > MAX_METADATA {
            tracing::warn!(
                "too many dead letters re-driven out of order to remember; later ones may be re-driven again"
            );
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&item);
    }
    if out.is_empty() {
        String::new()
    } else {
        format!("{REDRIVEN_PREFIX}{out}")
    }
}

/// Reads `topic` from the cursor of `cursor_group` up to the high watermarks seen at the
/// start, keeping at most `per_partition` records not re-driven yet per partition.
/// `None` if the topic does not exist.
fn scan(
    inner: &Inner,
    topic: &str,
    cursor_group: &str,
    per_partition: usize,
) -> Result<Option<Scan>> {
    let timeout = inner.config.request_timeout;
    let mut config = inner.config.consumer(cursor_group);
    // EOF events tell when a partition has nothing more (its end may hold only
    // transaction markers, which are never delivered as records).
    config.set("enable.partition.eof", "true");
    let consumer: BaseConsumer<DefaultConsumerContext> =
        create("dead-letter reader", || config.create())?;
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| broker_error("dead-letter topic metadata", &e))?;
    let partitions: Vec<i32> = match md.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            t.partitions().iter().map(|p| p.id()).collect()
        }
        _ => return Ok(None),
    };
    let mut all = TopicPartitionList::new();
    for p in &partitions {
        all.add_partition(topic, *p);
    }
    // A group the cluster has not seen yet gets its coordinator assigned (and loaded) on
    // first use: "not coordinator" and "loading" answers are transient, so ask again.
    let deadline = std::time::Instant::now() + timeout;
    let committed = loop {
        match consumer.committed_offsets(all.clone(), timeout) {
            Ok(committed) => break committed,
            Err(e)
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::NotCoordinator
                            | RDKafkaErrorCode::CoordinatorLoadInProgress
                            | RDKafkaErrorCode::CoordinatorNotAvailable
                    )
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => return Err(broker_error("re-drive cursor", &e)),
        }
    };
    let mut cursors = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(|e| broker_error("dead-letter watermarks", &e))?;
        let (next, done) = match committed.find_partition(topic, *p) {
            Some(e) => match e.offset() {
                Offset::Offset(n) => (n.max(low), parse_done(e.metadata())),
                _ => (low, BTreeSet::new()),
            },
            None => (low, BTreeSet::new()),
        };
        let done = done.into_iter().filter(|o| *o >= next).collect();
        if next < high {
            assignment
                .add_partition_offset(topic, *p, Offset::Offset(next))
                .map_err(|e| broker_error("dead-letter assignment", &e))?;
        }
        cursors.insert(*p, Cursor { next, high, done });
    }
    let mut records: HashMap<i32, Vec<Record>> = HashMap::new();
    let mut open: HashSet<i32> = assignment
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect();
    if !open.is_empty() {
        consumer
            .assign(&assignment)
            .map_err(|e| broker_error("dead-letter assignment", &e))?;
    }
    let deadline = Instant::now() + timeout;
    while !open.is_empty() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => {
                let p = m.partition();
                if !open.contains(&p) {
                    continue;
                }
                let cursor = &cursors[&p];
                let offset = m.offset();
                if offset >= cursor.high {
                    open.remove(&p);
                    continue;
                }
                let list = records.entry(p).or_default();
                let fresh = list.iter().filter(|r| !r.redriven).count();
                if fresh < per_partition {
                    list.push(Record {
                        partition: p,
                        offset,
                        timestamp: m.timestamp().to_millis().unwrap_or(0),
                        message: decode(&m.detach(), Origin::Open).message,
                        redriven: cursor.done.contains(&offset),
                    });
                }
                let fresh = list.iter().filter(|r| !r.redriven).count();
                if offset + 1 >= cursor.high || fresh >= per_partition {
                    open.remove(&p);
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => {
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) {
                    return Ok(None);
                }
                tracing::warn!(error = %e, %topic, "error while reading the dead-letter topic");
            }
        }
    }
    let complete = open.is_empty();
    let mut ordered: Vec<Record> = Vec::new();
    let mut keys: Vec<i32> = records.keys().copied().collect();
    keys.sort_unstable();
    for p in keys {
        ordered.extend(records.remove(&p).unwrap_or_default());
    }
    Ok(Some(Scan {
        consumer,
        cursors,
        records: ordered,
        complete,
    }))
}

/// Moves every partition's cursor over its contiguous prefix of re-driven records and
/// commits the cursors (with the offsets re-driven beyond them as metadata).
fn advance_and_commit(topic: &str, scan: Scan) -> Result<()> {
    let Scan {
        consumer,
        mut cursors,
        records,
        complete,
    } = scan;
    let mut by_partition: HashMap<i32, Vec<&Record>> = HashMap::new();
    for r in &records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, cursor) in cursors.iter_mut() {
        let seen = by_partition.remove(p).unwrap_or_default();
        let mut whole = true;
        for r in &seen {
            if cursor.done.contains(&r.offset) {
                cursor.next = r.offset + 1;
            } else {
                whole = false;
                break;
            }
        }
        // Everything up to the end was re-driven: skip trailing transaction markers too.
        if whole && complete {
            cursor.next = cursor.next.max(cursor.high);
        }
        let next = cursor.next;
        cursor.done.retain(|o| *o >= next);
        let mut elem = tpl.add_partition(topic, *p);
        elem.set_offset(Offset::Offset(next))
            .map_err(|e| broker_error("re-drive cursor", &e))?;
        elem.set_metadata(format_done(&cursor.done));
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| broker_error("re-drive cursor commit", &e))?;
    Ok(())
}

/// One pass: the records read at open, served in order; removing one marks its offset
/// re-driven, and closing a re-drive pass commits the cursors.
struct Pass {
    topic: String,
    /// `None` for a listing (its reader is closed at once).
    scan: Option<Scan>,
    records: std::vec::IntoIter<Record>,
    last: Option<(i32, i64)>,
}

#[async_trait]
impl DeadLetterLog for KafkaDeadLetterLog {
    async fn open(
        &self,
        destination: &str,
        group: &str,
        scope: PassScope,
    ) -> Result<Box<dyn DeadLetterPass>> {
        validate_topic(destination)?;
        let topic = dead_letter_topic(destination, group);
        let per_partition = match scope {
            PassScope::List { limit } => limit,
            PassScope::Redrive => usize::MAX,
        };
        let (inner, t, cursor_group) = (
            self.inner.clone(),
            topic.clone(),
            redrive_cursor_group(group),
        );
        let Some(scan) = blocking(move || scan(&inner, &t, &cursor_group, per_partition)).await?
        else {
            return Err(no_dead_letter_topic(&topic, destination, group));
        };
        // The scan keeps every record read (the cursor's advance needs the re-driven ones
        // too); the pass serves those not re-driven yet.
        let mut records: Vec<Record> = scan
            .records
            .iter()
            .filter(|r| !r.redriven)
            .cloned()
            .collect();
        let scan = match scope {
            PassScope::List { .. } => {
                if !scan.complete {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("could not read dead-letter topic {topic:?} to its end in time"),
                    )
                    .with_context("adapter", ADAPTER));
                }
                // Oldest first across partitions; each partition's own order is kept.
                records.sort_by_key(|r| (r.timestamp, r.partition, r.offset));
                blocking(move || {
                    drop(scan);
                    Ok(())
                })
                .await?;
                None
            }
            PassScope::Redrive => Some(scan),
        };
        Ok(Box::new(Pass {
            topic,
            scan,
            records: records.into_iter(),
            last: None,
        }))
    }
}

#[async_trait]
impl DeadLetterPass for Pass {
    async fn next(&mut self) -> Result<Option<StoredDeadLetter>> {
        let Some(r) = self.records.next() else {
            self.last = None;
            return Ok(None);
        };
        self.last = Some((r.partition, r.offset));
        Ok(Some(StoredDeadLetter {
            message: r.message,
            position: Some(format!("partition {} offset {}", r.partition, r.offset)),
        }))
    }

    async fn remove(&mut self) -> Result<()> {
        if let (Some((partition, offset)), Some(scan)) = (self.last, self.scan.as_mut())
            && let Some(cursor) = scan.cursors.get_mut(&partition)
        {
            cursor.done.insert(offset);
        }
        Ok(())
    }

    /// Commits what was re-driven, after a failure too: a later re-drive then starts
    /// after it.
    async fn close(self: Box<Self>) -> Result<()> {
        let Pass { topic, scan, .. } = *self;
        match scan {
            Some(scan) => blocking(move || advance_and_commit(&topic, scan)).await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redriven_offsets_round_trip_through_metadata() {
        let done: BTreeSet<i64> = [3, 5, 9].into_iter().collect();
        assert_eq!(parse_done(&format_done(&done)), done);
        assert!(
            parse_done("3:1").is_empty(),
            "a consumer's delivery metadata"
        );
        assert_eq!(format_done(&BTreeSet::new()), "");
    }

    #[test]
    fn metadata_is_bounded() {
        let done: BTreeSet<i64> = (1_000_000..1_010_000).collect();
        let text = format_done(&done);
        assert!(text.len() <= MAX_METADATA, "{}", text.len());
        let kept = parse_done(&text);
        assert!(!kept.is_empty() && kept.iter().all(|o| done.contains(o)));
        assert_eq!(kept.first(), done.first(), "the lowest offsets are kept");
    }
}
