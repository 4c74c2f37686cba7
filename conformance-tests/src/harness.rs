//! The test harness: every case against every adapter as libtest-mimic trials, then the
//! guarantee matrix. A `harness = false` test binary calls [`run`] from its `main`, the
//! workspace's runner as a third-party adapter's.

use std::process::ExitCode;
use std::sync::{Arc, LazyLock};

use libtest_mimic::{Arguments, Failed, Trial};
use surety_core::CapabilityCheck;

use crate::runner::quiet_deliberate_panics;
use crate::{CASES, Fixture, Report, Verdict};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
});

/// The runtime the cases run on. Connect adapters on it (`runtime().block_on(…)`): a
/// client may keep tasks on the runtime that connected it.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    &RUNTIME
}

/// Runs every case against each `(adapter, fixture)` as one trial (`<adapter>::<case>`),
/// with libtest's command line (filters, `--list`, `--test-threads`), then prints the
/// guarantee matrix. A case the adapter lacks a capability for is an ignored trial
/// saying what it needs, and "not supported" in the matrix, never a pass.
///
/// Each broker is put behind [`CapabilityCheck`], as applications get it from
/// `surety::connect`, so an unsupported call fails there. Panics the cases raise on
/// purpose are kept out of the output. Returns the exit code of the run.
pub fn run(fixtures: &[(String, Fixture)]) -> ExitCode {
    quiet_deliberate_panics();
    let args = Arguments::from_args();
    let report = Arc::new(Report::default());
    let fixtures: Vec<(String, Fixture)> = fixtures
        .iter()
        .map(|(adapter, f)| {
            let f = Fixture {
                broker: CapabilityCheck::wrap(f.broker.clone()),
                ..f.clone()
            };
            (adapter.clone(), f)
        })
        .collect();
    eprintln!(
        "conformance: running against {}",
        fixtures
            .iter()
            .map(|(a, _)| a.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut trials = Vec::new();
    for (adapter, fixture) in &fixtures {
        for case in CASES {
            let name = format!("{adapter}::{}", case.name);
            if let Some(why) = case.unsupported_by(fixture) {
                if args
                    .filter
                    .as_ref()
                    .is_none_or(|f| name.contains(f.as_str()))
                {
                    report.add(case.name, adapter, Verdict::NotSupported(why.clone()));
                }
                trials.push(
                    Trial::test(name, || Ok(()))
                        .with_kind(why)
                        .with_ignored_flag(true),
                );
                continue;
            }
            let fixture = fixture.clone();
            let adapter = adapter.clone();
            let report = report.clone();
            trials.push(Trial::test(name, move || {
                let result = RUNTIME.block_on((case.run)(fixture));
                match result {
                    Ok(observed) => {
                        report.add(case.name, &adapter, Verdict::Pass(observed));
                        Ok(())
                    }
                    Err(why) => {
                        report.add(case.name, &adapter, Verdict::Fail(why.clone()));
                        Err(Failed::from(why))
                    }
                }
            }));
        }
    }

    let conclusion = libtest_mimic::run(&args, trials);
    let order: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    println!("\n## Guarantee matrix\n\n{}", report.markdown(&order));
    conclusion.exit_code()
}
