//! Surety processes the scenarios kill: the runner starts its own test binary again
//! with `SURETY_FAULTS_CHILD=relay|producer`; [`run`](super::run) then runs only a relay
//! or a producer on the scenario's tables and broker, and the parent SIGKILLs it at the
//! chosen point. The child builds its adapter with the runner's own function, so it
//! talks to the same broker the same way.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::FaultAdapter;
use super::producer_kill::child_producer;
use super::relay_kill::child_relay;

/// Set in a child process: `relay` or `producer`.
const CHILD_ENV: &str = "SURETY_FAULTS_CHILD";
/// The child's adapter, table prefix, destination, producer group and message count.
pub(super) const CHILD_ADAPTER: &str = "SURETY_FAULTS_CHILD_ADAPTER";
pub(super) const CHILD_PREFIX: &str = "SURETY_FAULTS_CHILD_PREFIX";
pub(super) const CHILD_DEST: &str = "SURETY_FAULTS_CHILD_DEST";
pub(super) const CHILD_GROUP: &str = "SURETY_FAULTS_CHILD_GROUP";
pub(super) const CHILD_COUNT: &str = "SURETY_FAULTS_CHILD_COUNT";
/// A child that outlives this is an orphan of a dead parent: it exits.
const CHILD_LIFETIME: Duration = Duration::from_secs(180);

/// A variable the parent set for the child, or why the child cannot run.
pub(super) fn child_env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

/// Starts this binary again as a child running `role` only.
pub(super) fn spawn_child(role: &str, vars: &[(&str, &str)]) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the test binary's path: {e}"))?;
    let mut command = Command::new(exe);
    command
        .env(CHILD_ENV, role)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (k, v) in vars {
        command.env(k, v);
    }
    command
        .spawn()
        .map_err(|e| format!("start the {role} child: {e}"))
}

/// SIGKILLs a child (std's `kill` is SIGKILL on Unix) and reaps it.
pub(super) fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs the child role named in the environment; `None` when this is not a child.
pub(super) fn child_main(
    build: &dyn Fn(&str) -> Result<FaultAdapter, String>,
) -> Option<std::process::ExitCode> {
    let role = std::env::var(CHILD_ENV).ok()?;
    std::thread::spawn(|| {
        std::thread::sleep(CHILD_LIFETIME);
        std::process::exit(3);
    });
    let result = match role.as_str() {
        "relay" => child_relay(build),
        "producer" => child_producer(build),
        other => Err(format!("unknown child role {other}")),
    };
    if let Err(why) = result {
        eprintln!("faults child {role}: {why}");
    }
    Some(std::process::ExitCode::FAILURE)
}
