//! Running a workload with a bounded window of messages in flight, and summarising it.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;

/// One timed run: how long it took and every message's latency (start of its publish to
/// its confirm).
pub struct Run {
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// One latency per message.
    pub latencies: Vec<Duration>,
}

impl Run {
    /// Messages per second of this run.
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `op(0..messages)` with at most `window` operations in flight; the first error
/// ends the run (a benchmark of failing publishes would measure nothing useful).
pub async fn windowed<F, Fut>(messages: usize, window: usize, op: F) -> Result<Run, String>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(messages);
    let mut stream = futures::stream::iter(0..messages)
        .map(|i| {
            let fut = op(i);
            async move {
                let t = Instant::now();
                fut.await.map(|()| t.elapsed())
            }
        })
        .buffer_unordered(window.max(1));
    while let Some(result) = stream.next().await {
        latencies.push(result?);
    }
    Ok(Run {
        elapsed: start.elapsed(),
        latencies,
    })
}

/// What a table row shows about the repetitions of one scenario.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Median over the repetitions of messages per second.
    pub rate: f64,
    /// Median latency over all messages of all repetitions.
    pub p50: Duration,
    /// 99th percentile latency over all messages of all repetitions.
    pub p99: Duration,
}

/// Summarises repetitions: median rate, latency percentiles over every message.
pub fn summarise(runs: &[Run]) -> Summary {
    let mut rates: Vec<f64> = runs.iter().map(Run::rate).collect();
    rates.sort_by(f64::total_cmp);
    let rate = median(&rates);
    let mut all: Vec<Duration> = runs.iter().flat_map(|r| r.latencies.clone()).collect();
    all.sort();
    Summary {
        rate,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of a sorted slice.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_median() {
        let ms = |v: u64| Duration::from_millis(v);
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&sorted, 0.5), ms(50));
        assert_eq!(percentile(&sorted, 0.99), ms(99));
        assert_eq!(median(&[1.0, 2.0, 10.0]), 2.0);
        assert_eq!(median(&[1.0, 3.0]), 2.0);
    }

    #[tokio::test]
    async fn window_runs_every_message() {
        let run = windowed(50, 8, |_| async { Ok(()) }).await.unwrap();
        assert_eq!(run.latencies.len(), 50);
        let err = windowed(5, 2, |i| async move {
            if i == 3 { Err("boom".into()) } else { Ok(()) }
        })
        .await;
        assert!(err.is_err());
    }
}
