//! The cases. Each is an async function from a [`Fixture`] to what it observed, in the
//! file of its topic; [`CASES`] lists them in the order of the matrix.
//!
//! `steps.rs` holds what the cases share (fresh names, publishers, subscribing and
//! settling). A new topic is a file here, its cases added to [`CASES`].

use futures::future::BoxFuture;
use surety_core::{Capabilities, Capability};

use crate::{Fixture, Observed};

// Before the modules: `ensure!` is in scope in every file below.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

mod consuming;
mod dead_letters;
mod hostile;
mod metrics;
mod publishing;
mod steps;
mod transactions;

use consuming::{
    ack_after_process, attempts_survive_restart, crash_before_ack_redelivers,
    groups_and_competing_consumers, per_key_ordering, retry_after_delay,
};
use dead_letters::{
    dead_letter_unavailable_keeps_message, dead_letters_listed_and_redriven,
    reject_dead_letters_at_once, retry_then_dead_letter,
};
use hostile::{
    forged_control_headers_are_data, one_group_on_two_destinations_stays_apart,
    oversized_headers_never_block_the_dead_letter, unusable_ids_are_replaced_by_stable_ones,
};
use metrics::metrics_recorded;
use publishing::{
    batch_reports_each_message, confirm_then_consume, duplicate_detectable_by_id,
    invalid_message_is_rejected, oneway_publish, unroutable_is_an_error,
};
use transactions::{
    broker_transaction_is_atomic, check_back_after_producer_dies, check_back_resolves_unknown,
    transactional_commit_and_rollback,
};

type CaseResult = Result<Observed, String>;

/// One behaviour every adapter must show, with the capabilities it needs.
pub struct Case {
    /// A short name, used in test names and the matrix.
    pub name: &'static str,
    /// What a user relies on, in one line.
    pub promise: &'static str,
    /// Capabilities the adapter must have; otherwise "not supported".
    pub requires: &'static [Capability],
    /// Whether the case sends through a producer that is not Surety
    /// ([`Fixture::foreign`]); otherwise "not supported".
    pub needs_foreign: bool,
    /// Runs the case.
    pub run: fn(Fixture) -> BoxFuture<'static, CaseResult>,
}

impl Case {
    /// Why `fixture` cannot run this case (`needs <capabilities>`, or a foreign producer),
    /// or `None` when it can.
    pub fn unsupported_by(&self, fixture: &Fixture) -> Option<String> {
        let caps: Capabilities = fixture.broker.capabilities();
        let mut missing: Vec<String> = self
            .requires
            .iter()
            .filter(|c| !caps.supports(**c))
            .map(|c| c.to_string())
            .collect();
        if self.needs_foreign && fixture.foreign.is_none() {
            missing.push("a foreign producer (the broker's own client)".to_owned());
        }
        (!missing.is_empty()).then(|| format!("needs {}", missing.join(", ")))
    }
}

macro_rules! case {
    ($name:ident, $promise:literal, [$($cap:ident),*]) => {
        case!($name, $promise, [$($cap),*], needs_foreign: false)
    };
    ($name:ident, $promise:literal, [$($cap:ident),*], foreign) => {
        case!($name, $promise, [$($cap),*], needs_foreign: true)
    };
    ($name:ident, $promise:literal, [$($cap:ident),*], needs_foreign: $foreign:literal) => {
        Case {
            name: stringify!($name),
            promise: $promise,
            requires: &[$(Capability::$cap),*],
            needs_foreign: $foreign,
            run: |f| Box::pin($name(f)),
        }
    };
}

/// Every case, in the order of the matrix.
#[rustfmt::skip]
pub static CASES: &[Case] = &[
    case!(confirm_then_consume, "every confirmed message is consumed, once", []),
    case!(batch_reports_each_message, "a batch returns one result per message; a bad one does not sink the rest", []),
    case!(unroutable_is_an_error, "a destination nobody declared is an unroutable error, not a silent success", []),
    case!(invalid_message_is_rejected, "oversized or malformed messages get a typed error and nothing is sent", []),
    case!(ack_after_process, "a handler that fails k times sees the message again; it is acked only after success", []),
    case!(crash_before_ack_redelivers, "a consumer that dies before acking does not lose the message", []),
    case!(attempts_survive_restart, "the attempt count survives a consumer restart", []),
    case!(groups_and_competing_consumers, "each group gets every message; consumers of a group share them", []),
    case!(retry_then_dead_letter, "a poison message is retried, then dead-lettered with reason and attempts; others flow", [DeadLetter]),
    case!(reject_dead_letters_at_once, "a rejected message is dead-lettered on its first delivery", [DeadLetter]),
    case!(dead_letter_unavailable_keeps_message, "if the dead-letter destination is unavailable, the message is kept, neither lost nor hot-looped", [DeadLetter]),
    case!(dead_letters_listed_and_redriven, "dead letters are listed with reason and attempts without being removed, and each re-driven one comes back once as attempt 1", [DeadLetter]),
    case!(retry_after_delay, "Retry { after } is not delivered before the delay", [DelayedRetry]),
    case!(per_key_ordering, "messages with one key are processed in publish order, retries included", [OrderingPerKey]),
    case!(duplicate_detectable_by_id, "a message published twice is delivered with the same id both times", []),
    case!(oneway_publish, "oneway publish hands messages over without a confirm", [OnewayPublish]),
    case!(transactional_commit_and_rollback, "a committed half message is delivered, a rolled-back one never; neither is visible before", [HalfMessages]),
    case!(check_back_resolves_unknown, "Unknown (or a panicking local transaction) is resolved by the check-back, both ways", [HalfMessages]),
    case!(check_back_after_producer_dies, "a new producer of the group answers the check-back of a producer that died", [HalfMessages]),
    case!(broker_transaction_is_atomic, "a broker transaction delivers all its messages on commit and none on abort", [BrokerTransactions]),
    case!(one_group_on_two_destinations_stays_apart, "a group on two destinations: retries, dead letters and re-drives of one never reach the other", [DeadLetter]),
    case!(forged_control_headers_are_data, "Surety's control headers written by a foreign producer are delivered as data, never obeyed", [], foreign),
    case!(oversized_headers_never_block_the_dead_letter, "poison messages with headers at, over and far over Surety's limits are retried and dead-lettered with a reason; the next message flows", [DeadLetter], foreign),
    case!(unusable_ids_are_replaced_by_stable_ones, "a foreign message without a usable id keeps one id on every delivery and in its dead letter; odd bytes and empty bodies arrive", [DeadLetter], foreign),
    case!(metrics_recorded, "publishes, confirms, failures, deliveries, retries and dead letters are counted under the documented names and labels", [DeadLetter]),
];
