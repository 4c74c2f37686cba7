//! The behaviour suite every Surety adapter must pass, written once against the core
//! traits and run against each adapter's real broker.
//!
//! Each [`Case`] names the capabilities it needs; an adapter without them gets
//! "not supported", never "pass". Cases use fresh destination and group names, so runs
//! do not see each other's messages. [`Report`] renders the guarantee matrix.
//!
//! An adapter plugs in by building a [`Fixture`] around its [`Broker`]; [`run`] turns
//! every case into a trial per adapter and prints the matrix.
//!
//! # Running the suite against your own adapter
//!
//! An adapter outside this repository runs the same cases from a test of its own, with
//! no database and no fault tooling:
//!
//! ```toml
//! [dev-dependencies]
//! surety-conformance = { version = "0.1", default-features = false }
//!
//! [[test]]
//! name = "conformance"
//! harness = false
//! ```
//!
//! ```no_run
//! // tests/conformance.rs
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use surety_conformance::{Fixture, runtime};
//! # mod my_adapter {
//! #     pub async fn connect() -> surety_core::Result<surety_memory::MemoryBroker> {
//! #         Ok(surety_memory::MemoryBroker::new())
//! #     }
//! # }
//!
//! fn main() -> std::process::ExitCode {
//!     // Connect on the suite's runtime: a client may keep tasks on it.
//!     let broker = runtime().block_on(my_adapter::connect()).expect("my broker answers");
//!     let fixture = Fixture::new(Arc::new(broker)).quiet_period(Duration::from_secs(1));
//!     surety_conformance::run(&[("my-broker".to_owned(), fixture)])
//! }
//! ```
//!
//! `cargo test --test conformance` then runs one trial per case (`my-broker::<case>`),
//! with libtest's filters and `--list`; a case whose capabilities the broker lacks is an
//! ignored trial saying what it needs. As object_store runs its exported suite against
//! its in-memory store, this workspace runs it against `surety-memory` on every run.
//!
//! # Features
//!
//! | feature | what it adds | default |
//! |---|---|---|
//! | `sql` | `runner::with_sql_half_messages`: half messages from `surety-sql`'s prepared-message store, for brokers without their own | yes |
//! | `fault-proxy` | `FaultProxy`: a loopback TCP proxy that cuts, stalls, refuses or drops connections | yes |
//! | `faults` | the `faults` module: the fault scenarios and their runner (needs PostgreSQL; implies `sql` and `fault-proxy`) | yes |
//!
//! # Layout
//!
//! `cases/` holds the cases, one file per topic, and the steps they share; `harness.rs`
//! is [`run`]; `report.rs` the matrix; `support.rs` the recording handler and ledger;
//! `recorder.rs` the metrics recorder of the metrics case; `foreign.rs` the producer
//! that is not Surety, which the hostile-input cases send through;
//! `runner.rs` what every runner shares (adapters from `SURETY_ADAPTERS`, hiding
//! deliberate panics). `faults/` holds the fault scenarios and their runner. The test
//! binaries in `tests/` only build this workspace's adapters.
#![deny(missing_docs)]

mod cases;
#[cfg(feature = "fault-proxy")]
pub mod fault_proxy;
#[cfg(feature = "faults")]
pub mod faults;
pub mod foreign;
mod harness;
mod recorder;
mod report;
pub mod runner;
mod support;

use std::sync::Arc;
use std::time::Duration;

pub use cases::{CASES, Case};
#[cfg(feature = "fault-proxy")]
pub use fault_proxy::{FaultProxy, ProxyOptions};
pub use foreign::{ForeignMessage, ForeignProducer};
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
    /// Whether a re-drive can leave a copy of a re-driven message listed: on a log whose
    /// re-drive cursor moves over a prefix only (RocketMQ's `%DLQ%` consume offset), a
    /// second copy of the message behind an entry that stays is still there. Every other
    /// adapter removes every copy.
    pub redrive_leaves_copies_behind: bool,
    /// The broker's own client as a producer that is not Surety, for the hostile-input
    /// cases; without one they are not supported.
    pub foreign: Option<Arc<dyn ForeignProducer>>,
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
            redrive_leaves_copies_behind: false,
            foreign: None,
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

    /// Gives the hostile-input cases a producer that is not Surety.
    pub fn foreign(mut self, producer: Arc<dyn ForeignProducer>) -> Self {
        self.foreign = Some(producer);
        self
    }

    /// Says that a re-drive may leave a copy of a re-driven message listed.
    pub fn redrive_leaves_copies_behind(mut self, possible: bool) -> Self {
        self.redrive_leaves_copies_behind = possible;
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
