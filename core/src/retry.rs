//! Bounded retries with exponential backoff and jitter, shared by consumers, the outbox
//! relay and publishers.

use std::time::Duration;

/// How often and how fast to retry.
///
/// Attempt numbers start at 1 (the first delivery or publish). After `max_attempts`
/// failed attempts the message is dead-lettered.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included. At least 1.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of any delay.
    pub max_backoff: Duration,
    /// Growth factor between attempts (2.0 doubles).
    pub multiplier: f64,
    /// Fraction of the delay randomised, 0.0 to 1.0 (0.2 gives ±20%).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts, 200 ms doubling to at most 30 s, ±20% jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// A policy with `max_attempts` and the default backoff.
    pub fn with_max_attempts(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..RetryPolicy::default()
        }
    }

    /// Replaces the backoff bounds.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Replaces the jitter fraction (clamped to 0.0..=1.0).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// Whether another attempt is allowed after `attempt` attempts failed.
    pub fn allows_another(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay before attempt `attempt + 1`, without jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let factor = self.multiplier.max(1.0).powi(exponent);
        let nanos = (self.initial_backoff.as_nanos() as f64 * factor)
            .min(self.max_backoff.as_nanos() as f64);
        Duration::from_nanos(nanos as u64)
    }

    /// The delay before attempt `attempt + 1`, with jitter, never above `max_backoff`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.base_delay(attempt);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 || base.is_zero() {
            return base;
        }
        let spread = rand::random::<f64>() * 2.0 - 1.0; // -1.0 ..= 1.0
        let nanos = base.as_nanos() as f64 * (1.0 + jitter * spread);
        Duration::from_nanos(nanos.max(0.0) as u64).min(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::with_max_attempts(10)
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .jitter(0.0);
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(3), Duration::from_millis(400));
        assert_eq!(p.delay(9), Duration::from_secs(1));
        assert_eq!(p.delay(1000), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let p = RetryPolicy::default().backoff(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..1000 {
            let d = p.delay(1);
            assert!(
                d >= Duration::from_millis(80) && d <= Duration::from_millis(120),
                "{d:?}"
            );
        }
    }

    #[test]
    fn attempts_are_bounded() {
        let p = RetryPolicy::with_max_attempts(3);
        assert!(p.allows_another(1));
        assert!(p.allows_another(2));
        assert!(!p.allows_another(3));
        assert_eq!(RetryPolicy::with_max_attempts(0).max_attempts, 1);
    }
}
