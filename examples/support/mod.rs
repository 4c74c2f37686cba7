//! Small helpers shared by the mechanism examples (included with `#[path]`, not an
//! example of its own).

#![allow(dead_code)] // each example uses a part

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety::MessageId;

/// Long enough for a consumer group to join and rebalance on a real broker.
pub const WAIT: Duration = Duration::from_secs(90);

/// The value after `flag` on the command line, if any.
pub fn arg(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The broker URL: `--broker <url>`, or the in-memory broker.
pub fn broker_url() -> String {
    arg("--broker").unwrap_or_else(|| "memory:".into())
}

/// Ids this run published, so a consumer on a real broker can ignore messages left by
/// earlier runs (their destinations persist).
#[derive(Clone, Default)]
pub struct RunIds(Arc<Mutex<HashSet<MessageId>>>);

impl RunIds {
    /// Remembers `id` as this run's.
    pub fn add(&self, id: &MessageId) {
        self.0.lock().unwrap().insert(id.clone());
    }

    /// Whether `id` is this run's.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.0.lock().unwrap().contains(id)
    }
}

/// Polls `done` every 50 ms until it holds or [`WAIT`] passes; returns whether it held.
pub async fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}
