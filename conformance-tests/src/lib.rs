//! The behaviour suite every Surety adapter must pass, written once against the core
//! traits and run against each adapter's real broker.
//!
//! Each [`Case`] names the capabilities it needs; an adapter without them gets
//! "not supported", never "pass". Cases use fresh destination and group names, so runs
//! do not see each other's messages. [`Report`] renders the guarantee matrix.
//!
//! An adapter plugs in by building a [`Fixture`] around its [`Broker`]; see
//! `tests/conformance.rs` for the runner.
#![deny(missing_docs)]

mod cases;
pub mod fault_proxy;
pub mod faults;
mod harness;
mod report;
pub mod runner;
mod support;

use std::sync::Arc;
use std::time::Duration;

pub use cases::{CASES, Case};
pub use fault_proxy::{FaultProxy, ProxyOptions};
pub use harness::{run, runtime};
pub use report::{Report, Row, Verdict};
pub use support::{Collector, Ledger, unique_name};
use surety_core::Broker;

/// An adapter under test, with the timings that fit its broker.
#[derive(Clone)]
pub struct Fixture {
    /// The adapter.
    pub broker: Arc<dyn Broker>,
    /// How long to wait for expected deliveries before calling them lost.
    pub delivery_timeout: Duration,
    /// How long to keep watching before concluding that something was *not* delivered.
    pub quiet_period: Duration,
    /// How long a half message may take to be resolved by the check-back.
    pub check_back_timeout: Duration,
    /// Whether the broker may ask the check-back about a transaction that was already
    /// committed or rolled back (RocketMQ: the client's end-transaction request is
    /// oneway, and the broker's check can run before it arrives). The check-back must
    /// then answer as the local transaction decided, and the outcome must not change.
    pub settled_check_backs: bool,
}

impl Fixture {
    /// A fixture with timings for a broker on this machine.
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Fixture {
            broker,
            delivery_timeout: Duration::from_secs(30),
            quiet_period: Duration::from_secs(2),
            check_back_timeout: Duration::from_secs(60),
            settled_check_backs: false,
        }
    }

    /// Sets the quiet period.
    pub fn quiet_period(mut self, quiet: Duration) -> Self {
        self.quiet_period = quiet;
        self
    }

    /// Sets how long expected deliveries are waited for.
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// Sets the check-back timeout.
    pub fn check_back_timeout(mut self, timeout: Duration) -> Self {
        self.check_back_timeout = timeout;
        self
    }

    /// Says that the broker may ask the check-back about settled transactions.
    pub fn settled_check_backs(mut self, possible: bool) -> Self {
        self.settled_check_backs = possible;
        self
    }
}

/// The prefix of panics the cases raise on purpose (a runner may hide them).
pub const DELIBERATE_PANIC: &str = "deliberate panic";

/// What a passing case observed, for the matrix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Messages the case published.
    pub messages: usize,
    /// Confirmed messages that never arrived.
    pub lost: usize,
    /// Deliveries beyond the first for one message id, outside of intended retries.
    pub duplicated: usize,
}
