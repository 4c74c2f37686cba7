//! The fault runner: every scenario against every adapter as libtest-mimic trials, one
//! at a time under a time limit each, then the fault matrix (and, on request,
//! `docs/guarantees.md`). A `harness = false` test binary calls [`run`] from its `main`
//! with a function that builds each adapter's [`FaultAdapter`].

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Failed, Trial};
use surety_core::{Broker, CapabilityCheck};

use super::children::child_main;
use super::consumer_kill::run_kill;
use super::guarantees::write_guarantees;
use super::network::run_network_fault;
use super::producer_kill::run_producer_kill;
use super::relay_kill::run_relay_kill;
use super::restart::run_restart;
use super::{
    FaultReport, FaultRow, NetworkFault, RESTART, bad_input, hostile_input, poison_stream,
};
use crate::Fixture;
use crate::fault_proxy::FaultProxy;
use crate::harness::runtime;
use crate::runner::adapters_from_env;

pub(super) const CUT: &str = "connection-cut-during-confirmed-sends";
pub(super) const RELAY_KILL: &str = "relay-killed-mid-batch";
pub(super) const KILL: &str = "consumer-killed-after-effect-before-ack";
pub(super) const PRODUCER_KILL: &str = "producer-killed-between-half-message-and-commit";
pub(super) const POISON: &str = "poison-messages-in-a-stream";
pub(super) const STALL: &str = "stall-beyond-client-timeouts";
pub(super) const BAD: &str = "bad-input";
pub(super) const HOSTILE: &str = "hostile-input";
/// Every scenario, in the order (scenarios 1 to 7, then bad and hostile input).
pub const SCENARIOS: &[&str] = &[
    RESTART,
    CUT,
    RELAY_KILL,
    KILL,
    PRODUCER_KILL,
    POISON,
    STALL,
    BAD,
    HOSTILE,
];

/// Messages per scenario: enough to overlap faults with traffic, few enough to keep a
/// broker's run near a minute.
pub(super) const CUT_MESSAGES: usize = 2000;
pub(super) const STALL_MESSAGES: usize = 1000;
/// Longer than the 5 s confirm and request timeouts the runner gives the proxied clients.
pub(super) const STALL_PAUSE: Duration = Duration::from_secs(8);
pub(super) const POISON_MESSAGES: usize = 500;
pub(super) const KILL_MESSAGES: usize = 600;
pub(super) const RESTART_MESSAGES: usize = 1000;
pub(super) const RELAY_MESSAGES: usize = 1000;
/// Relay batches: the one in flight at the kill is published twice.
pub(super) const RELAY_BATCH: usize = 50;
/// Half messages in flight when the producer is killed; every other one commits locally.
pub(super) const PRODUCER_MESSAGES: usize = 60;

/// Longest a scenario may run: past it the row fails with the phase it was in, and the
/// next scenario runs (the watchdog then never has to end a healthy run).
const SCENARIO_LIMIT: Duration = Duration::from_secs(300);

type SetUp<T> = Arc<dyn Fn() -> BoxFuture<'static, Result<T, String>> + Send + Sync>;

/// An adapter connected through fault proxies, and every proxy its traffic passes.
pub type Proxied = (Arc<dyn Broker>, Vec<FaultProxy>);

/// What the fault scenarios need from one adapter besides its [`Fixture`]: whether its
/// broker lives in this process, how to reach it through fault proxies, and how to
/// restart it. A scenario the adapter gives no set-up for fails saying so; one that
/// cannot apply to an in-process broker is "not run", with the reason.
#[derive(Clone)]
pub struct FaultAdapter {
    pub(super) fixture: Fixture,
    pub(super) in_process: bool,
    pub(super) proxied: Option<SetUp<Proxied>>,
    pub(super) restart: Option<SetUp<()>>,
}

impl FaultAdapter {
    /// An adapter whose broker lives in this process (the memory broker): there is no
    /// connection to cut and no broker to restart, and killing a producer's process would
    /// kill the broker too; the relay it kills is a task of this process.
    pub fn in_process(fixture: Fixture) -> Self {
        FaultAdapter {
            fixture,
            in_process: true,
            proxied: None,
            restart: None,
        }
    }

    /// An adapter whose broker runs on its own, reached over the network.
    pub fn networked(fixture: Fixture) -> Self {
        FaultAdapter {
            in_process: false,
            ..FaultAdapter::in_process(fixture)
        }
    }

    /// How to connect the adapter again with all of its traffic through fault proxies,
    /// for the cut and stall scenarios: the broker and every proxy it goes through (a row
    /// fails when a proxy saw no connection).
    pub fn proxied<F, Fut>(mut self, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Proxied, String>> + Send + 'static,
    {
        self.proxied = Some(Arc::new(move || Box::pin(connect())));
        self
    }

    /// How to restart the broker (stop, start, wait until it answers), for the restart
    /// scenario.
    pub fn restart<F, Fut>(mut self, restart: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.restart = Some(Arc::new(move || Box::pin(restart())));
        self
    }

    /// The adapter connected directly, with its timings.
    pub fn fixture(&self) -> &Fixture {
        &self.fixture
    }
}

async fn run_scenario(
    scenario: &'static str,
    adapter: &str,
    target: &FaultAdapter,
) -> Result<FaultRow, String> {
    let f = &target.fixture;
    match scenario {
        RESTART => run_restart(adapter, target).await,
        CUT => {
            let fault = NetworkFault::Cut { times: 3 };
            run_network_fault(adapter, target, CUT_MESSAGES, fault).await
        }
        RELAY_KILL => run_relay_kill(adapter, target).await,
        STALL => {
            let fault = NetworkFault::Stall { pause: STALL_PAUSE };
            run_network_fault(adapter, target, STALL_MESSAGES, fault).await
        }
        POISON => poison_stream(adapter, f, POISON_MESSAGES, 10).await,
        KILL => run_kill(adapter, f).await,
        PRODUCER_KILL => run_producer_kill(adapter, target).await,
        BAD => bad_input(adapter, f).await,
        HOSTILE => hostile_input(HOSTILE, adapter, f).await,
        other => Err(format!("unknown scenario {other}")),
    }
}

/// Runs every scenario against the adapters named in `SURETY_ADAPTERS` (see
/// [`adapters_from_env`]), each built by `adapter`, as one trial per scenario and
/// adapter (`<adapter>::<scenario>`), one at a time unless `--test-threads` says
/// otherwise; then prints the fault matrix. With `SURETY_WRITE_GUARANTEES=1` the matrix
/// is also written to `guarantees` (the workspace's `docs/guarantees.md`).
///
/// Call it first in `main`: in the child processes the scenarios start (a relay or a
/// producer to be killed), it runs only that child, with the adapter `adapter` builds.
/// Each trial's broker is put behind [`CapabilityCheck`], as applications get it. A run
/// still going after `SURETY_FAULTS_BUDGET_SECS` (900) exits with a failure.
pub fn run(
    adapter: impl Fn(&str) -> Result<FaultAdapter, String>,
    guarantees: Option<&Path>,
) -> ExitCode {
    if let Some(code) = child_main(&adapter) {
        return code;
    }
    // A scenario that hangs (an await that never completes after a cut) must fail the run,
    // not stall CI: past the budget the whole binary exits with a failure.
    let budget = std::env::var("SURETY_FAULTS_BUDGET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900);
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(budget));
        eprintln!("faults: still running after {budget} s; a scenario hangs: failing the run");
        std::process::exit(1);
    });
    let mut args = Arguments::from_args();
    // Scenarios measure recovery times and share two cores: one at a time.
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }

    // Behind the capability layer, as applications get their broker.
    let target = |name: &str| {
        adapter(name).map(|a| FaultAdapter {
            fixture: Fixture {
                broker: CapabilityCheck::wrap(a.fixture.broker.clone()),
                ..a.fixture.clone()
            },
            ..a
        })
    };
    let Some(targets) = adapters_from_env("faults", target) else {
        return ExitCode::FAILURE;
    };

    let report = Arc::new(FaultReport::default());
    let mut trials = Vec::new();
    for (adapter, target) in &targets {
        for scenario in SCENARIOS {
            let (adapter, target) = (adapter.clone(), target.clone());
            let report = report.clone();
            trials.push(Trial::test(format!("{adapter}::{scenario}"), move || {
                let began = Instant::now();
                let ran = runtime().block_on(async {
                    tokio::time::timeout(SCENARIO_LIMIT, run_scenario(scenario, &adapter, &target))
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!(
                                "the scenario did not finish within {} s",
                                SCENARIO_LIMIT.as_secs()
                            ))
                        })
                });
                eprintln!(
                    "faults: {adapter}::{scenario} took {:.1} s",
                    began.elapsed().as_secs_f64()
                );
                let row = match ran {
                    Ok(row) => row,
                    Err(why) => {
                        let mut row = FaultRow::not_run(scenario, &adapter, "");
                        row.ran = true;
                        row.failures.push(why);
                        row
                    }
                };
                let verdict = row.verdict();
                report.add(row);
                match verdict {
                    None => Ok(()),
                    Some(why) => Err(Failed::from(why)),
                }
            }));
        }
    }

    let conclusion = libtest_mimic::run(&args, trials);
    let matrix = report.markdown(SCENARIOS);
    println!("\n## Fault guarantee matrix\n\n{matrix}");
    if std::env::var("SURETY_WRITE_GUARANTEES").as_deref() == Ok("1") {
        let Some(path) = guarantees else {
            eprintln!("faults: SURETY_WRITE_GUARANTEES=1, but this runner names no file for it");
            return ExitCode::FAILURE;
        };
        let adapters: Vec<String> = targets.iter().map(|(a, _)| a.clone()).collect();
        match write_guarantees(path, &adapters, &matrix, !conclusion.has_failed()) {
            Ok(()) => println!("faults: wrote {}", path.display()),
            Err(e) => {
                eprintln!("faults: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    conclusion.exit_code()
}
