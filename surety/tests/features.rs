//! The facade compiles with each cargo feature alone, with none, and with all together.
//!
//! Features must be additive: an application that turns on `kafka` alone, or `rabbitmq`
//! and `postgres`, must build. A workspace build unifies features and so never sees a
//! missing `#[cfg]`; this test runs `cargo check -p surety --no-default-features
//! --features X` for each set instead.
//!
//! The checks use their own target directory (`target/features`), so they neither
//! rebuild nor lock the workspace's artifacts. The first run compiles every adapter's
//! dependencies in check mode (librdkafka's C build is most of it); later runs only
//! re-check what changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Every feature of the facade alone, none, and all together.
const SETS: &[&str] = &[
    "",
    "memory",
    "rabbitmq",
    "kafka",
    "rocketmq",
    "postgres",
    "sqlite",
    "memory,rabbitmq,kafka,rocketmq,postgres,sqlite",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the facade lives one level below the workspace root")
        .to_path_buf()
}

#[test]
fn facade_compiles_with_each_feature_alone_and_all_together() {
    let root = workspace_root();
    let target = root.join("target").join("features");
    let mut failed = Vec::new();
    let all = Instant::now();
    for set in SETS {
        let started = Instant::now();
        let mut check = Command::new(env!("CARGO"));
        check
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            .args([
                "check",
                "--locked",
                "--quiet",
                "-p",
                "surety",
                "--no-default-features",
            ]);
        if !set.is_empty() {
            check.args(["--features", set]);
        }
        let output = check.output().expect("cargo runs");
        let label = if set.is_empty() { "(none)" } else { set };
        println!(
            "features {label}: {} in {:.1} s",
            if output.status.success() {
                "ok"
            } else {
                "FAILED"
            },
            started.elapsed().as_secs_f64()
        );
        if !output.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&output.stderr));
            failed.push(label);
        }
    }
    println!(
        "feature matrix: {} sets in {:.1} s",
        SETS.len(),
        all.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "the facade does not compile with features {failed:?}"
    );
}
