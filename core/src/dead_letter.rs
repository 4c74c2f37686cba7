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
use crate::message::{Message, MessageId, headers};
use crate::publish::Receipt;

/// Longest reason kept in a dead letter's header, in characters.
pub const MAX_REASON_LEN: usize = 1024;

/// `message` as a dead letter of `group`, bound for `dead_letter_destination`, with the
/// reason and the attempts made. The reason loses control characters (handler errors may
/// hold line breaks; header values may not) and is cut at [`MAX_REASON_LEN`].
pub fn dead_letter_message(
    message: &Message,
    dead_letter_destination: &str,
    group: &str,
    reason: &str,
    attempts: u32,
) -> Message {
    message
        .clone()
        .with_destination(dead_letter_destination)
        .with_header(headers::DEAD_LETTER_REASON, header_safe(reason))
        .with_header(headers::DEAD_LETTER_ATTEMPTS, attempts.to_string())
        .with_header(headers::ORIGINAL_DESTINATION, message.destination())
        .with_header(headers::CONSUMER_GROUP, group)
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
    fn reasons_are_cut_to_a_header_safe_length() {
        let long = "é".repeat(MAX_REASON_LEN * 2);
        assert_eq!(header_safe(&long).chars().count(), MAX_REASON_LEN);
    }
}
