//! The names of every metric and span Surety records, in one place.
//!
//! Metrics go through the [`metrics`](https://docs.rs/metrics) facade: Surety never
//! installs a recorder; an application does (see the Prometheus example). Every metric
//! has the label `adapter`; publish metrics also `destination`.

use crate::error::ErrorKind;

/// Counter: messages handed to a broker for a confirmed publish.
pub const PUBLISHED: &str = "surety_published_total";
/// Counter: publishes the broker confirmed.
pub const CONFIRMED: &str = "surety_confirmed_total";
/// Counter: publishes that failed; label `kind` ([`ErrorKind::as_str`]).
pub const PUBLISH_FAILED: &str = "surety_publish_failed_total";
/// Histogram: seconds from publish to confirm.
pub const PUBLISH_SECONDS: &str = "surety_publish_seconds";
/// Counter: deliveries handed to a handler; label `group`.
pub const DELIVERED: &str = "surety_delivered_total";
/// Counter: deliveries acked after the handler succeeded.
pub const ACKED: &str = "surety_acked_total";
/// Counter: deliveries scheduled for redelivery.
pub const RETRIED: &str = "surety_retried_total";
/// Counter: messages dead-lettered; label `group`.
pub const DEAD_LETTERED: &str = "surety_dead_lettered_total";
/// Counter: dead-letter attempts that failed (the message stays and is retried); label
/// `group`.
pub const DEAD_LETTER_FAILED: &str = "surety_dead_letter_failed_total";
/// Counter: check-back answers; label `state` ([`crate::TxState::as_str`]).
pub const CHECK_BACKS: &str = "surety_check_backs_total";
/// Counter: half messages discarded after the check limit.
pub const CHECK_BACK_EXHAUSTED: &str = "surety_check_back_exhausted_total";
/// Counter: duplicate deliveries the inbox skipped.
pub const INBOX_DUPLICATES: &str = "surety_inbox_duplicates_total";
/// Gauge: seconds since the oldest pending outbox row was due.
pub const RELAY_LAG_SECONDS: &str = "surety_relay_lag_seconds";
/// Gauge: outbox rows per state; label `state`.
pub const OUTBOX_DEPTH: &str = "surety_outbox_depth";
/// Counter: connections or channels re-established after a failure.
pub const RECONNECTS: &str = "surety_reconnects_total";

/// Span around a confirmed publish; fields `message_id`, `destination`.
pub const SPAN_PUBLISH: &str = "surety.publish";
/// Span around one handler call; fields `message_id`, `destination`, `group`, `attempt`.
pub const SPAN_CONSUME: &str = "surety.consume";
/// Span around a local transaction; field `message_id`.
pub const SPAN_LOCAL_TRANSACTION: &str = "surety.local_transaction";
/// Span around a check-back; field `message_id`.
pub const SPAN_CHECK_BACK: &str = "surety.check_back";
/// Span around one relay batch.
pub const SPAN_RELAY_BATCH: &str = "surety.relay_batch";

/// Records the result of one confirmed publish.
pub(crate) fn record_publish(
    adapter: &'static str,
    destination: &str,
    result: Result<(), ErrorKind>,
) {
    let destination = destination.to_owned();
    metrics::counter!(PUBLISHED, "adapter" => adapter, "destination" => destination.clone())
        .increment(1);
    match result {
        Ok(()) => metrics::counter!(CONFIRMED, "adapter" => adapter, "destination" => destination)
            .increment(1),
        Err(kind) => metrics::counter!(
            PUBLISH_FAILED,
            "adapter" => adapter,
            "destination" => destination,
            "kind" => kind.as_str()
        )
        .increment(1),
    }
}

/// [`record_publish`], plus the time since `started` in [`PUBLISH_SECONDS`] when the
/// publish was confirmed.
pub(crate) fn record_publish_since(
    adapter: &'static str,
    destination: &str,
    result: Result<(), ErrorKind>,
    started: std::time::Instant,
) {
    let confirmed = result.is_ok();
    record_publish(adapter, destination, result);
    if confirmed {
        metrics::histogram!(PUBLISH_SECONDS, "adapter" => adapter)
            .record(started.elapsed().as_secs_f64());
    }
}

/// Counts one consume event (`name` is one of the consume counters) of `group`.
pub(crate) fn record_consumed(name: &'static str, adapter: &'static str, group: &str) {
    metrics::counter!(name, "adapter" => adapter, "group" => group.to_owned()).increment(1);
}

/// Records a check-back answer (`state` is [`crate::TxState::as_str`]).
pub(crate) fn record_check_back(adapter: &'static str, state: &'static str) {
    metrics::counter!(CHECK_BACKS, "adapter" => adapter, "state" => state).increment(1);
}
