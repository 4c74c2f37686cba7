//! Settings of the in-process broker.

use std::time::Duration;

use surety_core::RetryPolicy;

/// Settings of a [`crate::MemoryBroker`].
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// Largest message accepted, in bytes.
    pub max_message_size: usize,
    /// How old a half message must be before its check-back is asked.
    pub transaction_timeout: Duration,
    /// How often prepared half messages are checked.
    pub check_interval: Duration,
    /// How many check-backs a half message gets before it is discarded.
    pub check_max: u32,
    /// How long one check-back may take before it counts as `Unknown`.
    pub check_back_timeout: Duration,
    /// Retries of a failed publish (off by default; in process a publish only fails for
    /// reasons a retry cannot fix, but the setting is the same on every adapter).
    pub publish_retry: Option<RetryPolicy>,
}

impl Default for MemoryConfig {
    /// 4 MiB messages; check-back after 1 s, every 250 ms, at most 15 times, each
    /// answering within 10 s; no publish retries.
    fn default() -> Self {
        MemoryConfig {
            max_message_size: 4 * 1024 * 1024,
            transaction_timeout: Duration::from_secs(1),
            check_interval: Duration::from_millis(250),
            check_max: 15,
            check_back_timeout: surety_core::raw::DEFAULT_CHECK_BACK_TIMEOUT,
            publish_retry: None,
        }
    }
}
