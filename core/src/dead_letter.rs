//! Dead letters as an operator sees them: list what a consumer group gave up on, and
//! re-drive it to where it came from, the same way on every broker.
//!
//! Adapters put a dead letter in the group's dead-letter destination with the headers
//! [`headers::DEAD_LETTER_REASON`], [`headers::DEAD_LETTER_ATTEMPTS`],
//! [`headers::ORIGINAL_DESTINATION`] and [`headers::CONSUMER_GROUP`]
//! ([`dead_letter_message`] builds it). [`DeadLetters`] reads them back and re-drives them
//! with [`redrive_message`]: same id (so an inbox still recognises the message), original
//! destination, attempt count reset.

use async_trait::async_trait;

use crate::error::Result;
use crate::message::{
    Message, MessageId, headers, valid_header_name, valid_header_value, valid_key,
};
use crate::publish::Receipt;

/// Longest reason kept in a dead letter's header, in characters.
pub const MAX_REASON_LEN: usize = 1024;

/// `message` as a dead letter of `group`, bound for `dead_letter_destination`, with the
/// reason and the attempts made. The reason loses control characters (handler errors may
/// hold line breaks; header values may not) and is cut at [`MAX_REASON_LEN`].
///
/// A dead letter must land whatever the message holds: a header (or key) that no message
/// may carry (over [`crate::MAX_HEADER_VALUE_LEN`], a name that is not a header name, a control
/// character), which a foreign producer can put on a received message, is removed, and
/// [`headers::DEAD_LETTER_REMOVED`] names each one with its size; the reason says so.
/// Otherwise every dead-letter publish would fail validation and the message would come
/// back for ever.
pub fn dead_letter_message(
    message: &Message,
    dead_letter_destination: &str,
    group: &str,
    reason: &str,
    attempts: u32,
) -> Message {
    let (kept, removed) = without_invalid_parts(message);
    let mut reason = reason.to_owned();
    let mut dead = kept;
    if !removed.is_empty() {
        reason.push_str(&format!(
            " ({} removed from the dead letter: see {})",
            removed.len(),
            headers::DEAD_LETTER_REMOVED
        ));
        dead = dead.with_header(
            headers::DEAD_LETTER_REMOVED,
            header_safe(&removed.join(", ")),
        );
    }
    dead.with_destination(dead_letter_destination)
        .with_header(headers::DEAD_LETTER_REASON, header_safe(&reason))
        .with_header(headers::DEAD_LETTER_ATTEMPTS, attempts.to_string())
        .with_header(headers::ORIGINAL_DESTINATION, message.destination())
        .with_header(headers::CONSUMER_GROUP, group)
}

/// `message` without the headers and key that no message may carry, and a description
/// of each part removed.
fn without_invalid_parts(message: &Message) -> (Message, Vec<String>) {
    let mut removed = Vec::new();
    let mut kept = Message::new(message.destination(), message.payload().clone())
        .with_id(message.id().clone())
        .with_created_at(message.created_at());
    match message.key() {
        Some(key) if !valid_key(key) => {
            removed.push(format!("key ({} bytes)", key.len()));
        }
        Some(key) => kept = kept.with_key(key),
        None => {}
    }
    for (name, value) in message.headers() {
        if valid_header_name(name) && valid_header_value(value) {
            kept = kept.with_header(name, value);
        } else {
            let shown: String = header_safe(name).chars().take(64).collect();
            removed.push(format!("header {shown} ({} bytes)", value.len()));
        }
    }
    (kept, removed)
}

/// `text` without control characters, at most [`MAX_REASON_LEN`] characters.
pub fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_LEN)
        .collect()
}

/// The message to publish when re-driving `dead`: same id, key, payload and business
/// headers; bound for its original destination (or `fallback_destination` when the header
/// is missing, for a message dead-lettered by a foreign producer); dead-letter and attempt
/// headers removed so the consumer starts again from attempt 1.
pub fn redrive_message(dead: &Message, fallback_destination: &str) -> Message {
    let destination = dead
        .header(headers::ORIGINAL_DESTINATION)
        .unwrap_or(fallback_destination)
        .to_owned();
    let mut fresh = Message::new(destination, dead.payload().clone())
        .with_id(dead.id().clone())
        .with_created_at(dead.created_at());
    if let Some(key) = dead.key() {
        fresh = fresh.with_key(key);
    }
    for (name, value) in dead.headers() {
        let dropped = [
            headers::DEAD_LETTER_REASON,
            headers::DEAD_LETTER_ATTEMPTS,
            headers::ORIGINAL_DESTINATION,
            headers::CONSUMER_GROUP,
            headers::ATTEMPT,
        ];
        if !dropped.contains(&name.as_str()) {
            fresh = fresh.with_header(name, value);
        }
    }
    fresh
}

/// One message in a dead-letter destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message as stored in the dead-letter destination, headers included.
    pub message: Message,
    /// Why it was dead-lettered, when the adapter recorded it.
    pub reason: Option<String>,
    /// How many deliveries were attempted before it was given up.
    pub attempts: Option<u32>,
    /// The destination it was consumed from.
    pub original_destination: Option<String>,
    /// Where the broker keeps it (`partition 0 offset 12`, a RocketMQ queue offset...).
    pub position: Option<String>,
}

impl DeadLetter {
    /// Reads the dead-letter headers of `message`.
    pub fn from_message(message: Message, position: Option<String>) -> Self {
        let reason = message
            .header(headers::DEAD_LETTER_REASON)
            .map(str::to_owned);
        let attempts = message
            .header(headers::DEAD_LETTER_ATTEMPTS)
            .and_then(|a| a.parse().ok());
        let original_destination = message
            .header(headers::ORIGINAL_DESTINATION)
            .map(str::to_owned);
        DeadLetter {
            message,
            reason,
            attempts,
            original_destination,
            position,
        }
    }
}

/// Which dead letters to re-drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedriveSelection {
    /// Every dead letter not re-driven yet.
    All,
    /// These ids only; ids not found are reported in [`RedriveReport::not_found`].
    Ids(Vec<MessageId>),
}

/// What a re-drive did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// The re-driven messages, each confirmed by the broker at its original destination.
    pub redriven: Vec<Receipt>,
    /// Selected ids that are not (or no longer) in the dead-letter destination.
    pub not_found: Vec<MessageId>,
}

/// The dead letters of one adapter. Get it from [`crate::Broker::dead_letters`].
///
/// A re-drive publishes with confirm first and only then removes the dead letter (or, on
/// a log that cannot delete, moves the group's re-drive cursor past it): a crash in between
/// re-drives the message again, never loses it. The consumer's inbox absorbs that
/// duplicate because the id is kept.
///
/// A message dead-lettered more than once (an upstream redelivery, or a retried
/// dead-letter send, leaves two copies with one id) is published once per re-drive: every
/// copy is removed, and the report holds one receipt for it.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Up to `limit` dead letters of `group` on `destination`, oldest first, not yet
    /// re-driven. Listing removes nothing.
    async fn list(&self, destination: &str, group: &str, limit: usize) -> Result<Vec<DeadLetter>>;

    /// Re-drives the selected dead letters of `group` on `destination` to their original
    /// destination with the attempt count reset.
    async fn redrive(
        &self,
        destination: &str,
        group: &str,
        selection: &RedriveSelection,
    ) -> Result<RedriveReport>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_its_reason_and_redrives_as_new() {
        let original = Message::new("orders", "x")
            .with_key("k")
            .with_header("tenant", "t1")
            .with_header(headers::ATTEMPT, "5");
        let dead = dead_letter_message(&original, "orders.g.dlq", "g", "bad\nline", 5);
        let seen = DeadLetter::from_message(dead.clone(), None);
        assert_eq!(seen.reason.as_deref(), Some("bad line"));
        assert_eq!(seen.attempts, Some(5));
        assert_eq!(seen.original_destination.as_deref(), Some("orders"));

        let again = redrive_message(&dead, "unused");
        assert_eq!(again.id(), original.id());
        assert_eq!(again.destination(), "orders");
        assert_eq!(again.key(), Some("k"));
        assert_eq!(again.header("tenant"), Some("t1"));
        assert_eq!(again.header(headers::ATTEMPT), None);
        assert_eq!(again.header(headers::DEAD_LETTER_REASON), None);
    }

    #[test]
    fn a_dead_letter_is_valid_whatever_the_message_carried() {
        let huge = "x".repeat(20 * 1024);
        let received = Message::new("orders", "poison")
            .with_key("k".repeat(crate::MAX_HEADER_VALUE_LEN + 1))
            .with_header("tenant", "t1")
            .with_header("big", huge.as_str())
            .with_header("bad name!", "v")
            .with_header("bell", "ring\u{7}");
        assert!(received.validate(None).is_err());
        let dead = dead_letter_message(&received, "orders.g.dlq", "g", "rejected", 3);
        dead.validate(None).expect("a dead letter always validates");
        assert_eq!(dead.id(), received.id());
        assert_eq!(dead.payload(), received.payload());
        assert_eq!(dead.header("tenant"), Some("t1"));
        assert_eq!(dead.key(), None);
        for gone in ["big", "bad name!", "bell"] {
            assert_eq!(dead.header(gone), None, "{gone}");
        }
        let removed = dead.header(headers::DEAD_LETTER_REMOVED).unwrap();
        assert!(removed.contains("header big (20480 bytes)"), "{removed}");
        assert!(removed.contains("key (8193 bytes)"), "{removed}");
        assert!(removed.contains("header bell"), "{removed}");
        let reason = dead.header(headers::DEAD_LETTER_REASON).unwrap();
        assert!(reason.starts_with("rejected (4 removed"), "{reason}");
        // A valid message loses nothing and says nothing.
        let fine = Message::new("orders", "ok")
            .with_key("k")
            .with_header("a", "b");
        let dead = dead_letter_message(&fine, "orders.g.dlq", "g", "rejected", 3);
        assert_eq!(dead.header(headers::DEAD_LETTER_REMOVED), None);
        assert_eq!(dead.header(headers::DEAD_LETTER_REASON), Some("rejected"));
        assert_eq!((dead.key(), dead.header("a")), (Some("k"), Some("b")));
    }

    #[test]
    fn reasons_are_cut_to_a_header_safe_length() {
        let long = "é".repeat(MAX_REASON_LEN * 2);
        assert_eq!(header_safe(&long).chars().count(), MAX_REASON_LEN);
    }
}
