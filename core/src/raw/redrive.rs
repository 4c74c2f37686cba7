//! The re-drive rule, once for every adapter.
//!
//! An adapter supplies a [`DeadLetterLog`]: it opens a [`DeadLetterPass`] over one
//! group's dead letters, which yields them in order and removes the one it yielded last
//! (deletes it, acks it, or moves a cursor over it). [`DeadLetterQueue`] does the rest,
//! the same way everywhere:
//!
//! - **list** reads up to `limit` dead letters and removes none;
//! - **redrive** publishes each selected dead letter with confirm to its original
//!   destination ([`redrive_message`]: same id, attempt count reset) and removes it only
//!   after the confirm, so a crash in between re-drives it again and never loses it;
//! - copies of one message (one id dead-lettered twice, by an upstream redelivery or a
//!   retried dead-letter send) are published once per re-drive and every copy removed;
//! - a failed publish stops the re-drive; what was removed before it stays removed (the
//!   pass is closed either way) and the error says how many were re-driven.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;

use crate::dead_letter::{
    DeadLetter, DeadLetters, RedriveReport, RedriveSelection, redrive_message,
};
use crate::error::Result;
use crate::message::{Message, MessageId};
use crate::publish::Publisher;

/// A dead letter as the adapter's storage holds it.
#[derive(Clone, Debug)]
pub struct StoredDeadLetter {
    /// The message, headers included.
    pub message: Message,
    /// Where the broker keeps it, for operators (`partition 0 offset 12`).
    pub position: Option<String>,
}

/// What a pass is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassScope {
    /// A listing: at most this many dead letters are read, none removed.
    List {
        /// How many the listing shows.
        limit: usize,
    },
    /// A re-drive: every dead letter held when the pass opened (later ones are left to
    /// the next re-drive), some removed.
    Redrive,
}

/// An adapter's dead-letter storage.
#[async_trait]
pub trait DeadLetterLog: Send + Sync {
    /// Opens a pass over the dead letters of `group` on `destination`.
    async fn open(
        &self,
        destination: &str,
        group: &str,
        scope: PassScope,
    ) -> Result<Box<dyn DeadLetterPass>>;
}

/// One walk over a group's dead letters, oldest first.
#[async_trait]
pub trait DeadLetterPass: Send {
    /// The next dead letter not removed yet; `None` at the end of the pass.
    async fn next(&mut self) -> Result<Option<StoredDeadLetter>>;

    /// Removes the dead letter [`DeadLetterPass::next`] returned last. Called only after
    /// its re-drive was confirmed (or another copy of it was).
    async fn remove(&mut self) -> Result<()>;

    /// Ends the pass, making its removals durable (a cursor commit) and handing back
    /// whatever it holds and did not remove. Called after a failure too.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// [`DeadLetters`] over an adapter's [`DeadLetterLog`], re-driving through its
/// confirmed publisher.
pub struct DeadLetterQueue {
    log: Arc<dyn DeadLetterLog>,
    publisher: Arc<dyn Publisher>,
}

impl DeadLetterQueue {
    /// Dead letters read from `log`, re-driven through `publisher`.
    pub fn new(log: Arc<dyn DeadLetterLog>, publisher: Arc<dyn Publisher>) -> Self {
        DeadLetterQueue { log, publisher }
    }

    async fn redrive_pass(
        &self,
        pass: &mut dyn DeadLetterPass,
        destination: &str,
        selection: &RedriveSelection,
        report: &mut RedriveReport,
        found: &mut Vec<MessageId>,
    ) -> Result<()> {
        let mut published: HashSet<(MessageId, String)> = HashSet::new();
        while let Some(stored) = pass.next().await? {
            let id = stored.message.id();
            if let RedriveSelection::Ids(ids) = selection
                && !ids.contains(id)
            {
                continue;
            }
            if !found.contains(id) {
                found.push(id.clone());
            }
            let fresh = redrive_message(&stored.message, destination);
            // The destination is part of the key: one dead-letter destination may hold
            // messages of several origins (RocketMQ's %DLQ% holds every topic of a group).
            if published.insert((fresh.id().clone(), fresh.destination().to_owned())) {
                let receipt = self.publisher.publish(&fresh).await.map_err(|e| {
                    e.with_context("redriven_before_failure", report.redriven.len().to_string())
                })?;
                report.redriven.push(receipt);
            }
            // Removed only after the confirm: a crash before this line re-drives it again.
            pass.remove().await.map_err(|e| {
                e.with_context("message_id", id.as_str())
                    .with_context("redriven", report.redriven.len().to_string())
            })?;
        }
        Ok(())
    }
}

#[async_trait]
impl DeadLetters for DeadLetterQueue {
    async fn list(&self, destination: &str, group: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut pass = self
            .log
            .open(destination, group, PassScope::List { limit })
            .await?;
        let mut listed = Vec::new();
        let read: Result<()> = async {
            while listed.len() < limit {
                let Some(stored) = pass.next().await? else {
                    break;
                };
                listed.push(DeadLetter::from_message(stored.message, stored.position));
            }
            Ok(())
        }
        .await;
        let closed = pass.close().await;
        read?;
        closed?;
        Ok(listed)
    }

    async fn redrive(
        &self,
        destination: &str,
        group: &str,
        selection: &RedriveSelection,
    ) -> Result<RedriveReport> {
        let mut pass = self
            .log
            .open(destination, group, PassScope::Redrive)
            .await?;
        let mut report = RedriveReport::default();
        let mut found = Vec::new();
        let walked = self
            .redrive_pass(
                pass.as_mut(),
                destination,
                selection,
                &mut report,
                &mut found,
            )
            .await;
        // Closed after a failure too: what was re-driven before it stays removed.
        let closed = pass.close().await;
        walked?;
        // Published, but a removal was not made durable: a later re-drive repeats those.
        closed.map_err(|e| e.with_context("redriven", report.redriven.len().to_string()))?;
        if let RedriveSelection::Ids(ids) = selection {
            for id in ids {
                if !found.contains(id) && !report.not_found.contains(id) {
                    report.not_found.push(id.clone());
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::dead_letter::dead_letter_message;
    use crate::error::{Error, ErrorKind};
    use crate::headers;
    use crate::publish::Receipt;

    /// A log over a vector; removals apply on close, as a cursor's would.
    struct VecLog {
        stored: Arc<Mutex<Vec<Message>>>,
    }

    struct VecPass {
        stored: Arc<Mutex<Vec<Message>>>,
        snapshot: Vec<Message>,
        at: usize,
        limit: usize,
        removed: Vec<usize>,
    }

    #[async_trait]
    impl DeadLetterLog for VecLog {
        async fn open(
            &self,
            _: &str,
            _: &str,
            scope: PassScope,
        ) -> Result<Box<dyn DeadLetterPass>> {
            let snapshot = self.stored.lock().unwrap().clone();
            Ok(Box::new(VecPass {
                stored: self.stored.clone(),
                limit: match scope {
                    PassScope::List { limit } => limit,
                    PassScope::Redrive => snapshot.len(),
                },
                snapshot,
                at: 0,
                removed: Vec::new(),
            }))
        }
    }

    #[async_trait]
    impl DeadLetterPass for VecPass {
        async fn next(&mut self) -> Result<Option<StoredDeadLetter>> {
            if self.at >= self.limit.min(self.snapshot.len()) {
                return Ok(None);
            }
            self.at += 1;
            Ok(Some(StoredDeadLetter {
                message: self.snapshot[self.at - 1].clone(),
                position: Some(format!("#{}", self.at - 1)),
            }))
        }
        async fn remove(&mut self) -> Result<()> {
            self.removed.push(self.at - 1);
            Ok(())
        }
        async fn close(self: Box<Self>) -> Result<()> {
            let mut stored = self.stored.lock().unwrap();
            *stored = self
                .snapshot
                .iter()
                .enumerate()
                .filter(|(i, _)| !self.removed.contains(i))
                .map(|(_, m)| m.clone())
                .collect();
            Ok(())
        }
    }

    /// Confirms publishes, or refuses those bound for `refuse`.
    #[derive(Default)]
    struct Origin {
        published: Mutex<Vec<Message>>,
        refuse: Option<MessageId>,
    }

    #[async_trait]
    impl Publisher for Origin {
        async fn publish(&self, message: &Message) -> Result<Receipt> {
            if self.refuse.as_ref() == Some(message.id()) {
                return Err(Error::new(ErrorKind::Unavailable, "origin down"));
            }
            self.published.lock().unwrap().push(message.clone());
            Ok(Receipt::for_message(message))
        }
    }

    fn dead(origin: &str, body: &str) -> Message {
        dead_letter_message(&Message::new(origin, body.to_owned()), "dlq", "g", "bad", 3)
    }

    fn queue(
        stored: Vec<Message>,
        origin: Origin,
    ) -> (DeadLetterQueue, Arc<Mutex<Vec<Message>>>, Arc<Origin>) {
        let stored = Arc::new(Mutex::new(stored));
        let origin = Arc::new(origin);
        let queue = DeadLetterQueue::new(
            Arc::new(VecLog {
                stored: stored.clone(),
            }),
            origin.clone(),
        );
        (queue, stored, origin)
    }

    #[tokio::test]
    async fn listing_removes_nothing() {
        let (queue, stored, _) = queue(vec![dead("a", "1"), dead("a", "2")], Origin::default());
        let listed = queue.list("a", "g", 1).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].reason.as_deref(), Some("bad"));
        assert_eq!(stored.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn copies_are_published_once_and_all_removed() {
        let one = dead("a", "1");
        let (queue, stored, origin) = queue(
            vec![one.clone(), dead("a", "2"), one.clone()],
            Origin::default(),
        );
        let report = queue
            .redrive("a", "g", &RedriveSelection::Ids(vec![one.id().clone()]))
            .await
            .unwrap();
        assert_eq!(report.redriven.len(), 1);
        assert!(report.not_found.is_empty());
        let published = origin.published.lock().unwrap().clone();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].id(), one.id());
        assert_eq!(published[0].destination(), "a");
        assert_eq!(published[0].header(headers::DEAD_LETTER_REASON), None);
        assert_eq!(
            stored.lock().unwrap().len(),
            1,
            "only the unselected one stays"
        );
    }

    #[tokio::test]
    async fn a_failed_publish_keeps_that_message_and_reports_progress() {
        let (first, second) = (dead("a", "1"), dead("a", "2"));
        let (queue, stored, _) = queue(
            vec![first.clone(), second.clone()],
            Origin {
                refuse: Some(second.id().clone()),
                ..Origin::default()
            },
        );
        let e = queue
            .redrive("a", "g", &RedriveSelection::All)
            .await
            .unwrap_err();
        assert_eq!(e.context_value("redriven_before_failure"), Some("1"));
        let left = stored.lock().unwrap().clone();
        assert_eq!(left.len(), 1);
        assert_eq!(
            left[0].id(),
            second.id(),
            "the first stays removed, the second stays"
        );
    }

    #[tokio::test]
    async fn unknown_ids_are_reported() {
        let (queue, _, _) = queue(vec![dead("a", "1")], Origin::default());
        let missing = MessageId::new();
        let report = queue
            .redrive("a", "g", &RedriveSelection::Ids(vec![missing.clone()]))
            .await
            .unwrap();
        assert_eq!(report.not_found, vec![missing]);
        assert!(report.redriven.is_empty());
    }
}
