//! Running a workload with a bounded window of messages in flight, repeating several
//! workloads in alternation, and summarising them.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use surety_core::{Message, Publisher};

use crate::fail;

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

/// Confirmed publishes of `messages` messages of `payload` to `destination` through
/// Surety's `Publisher`, `window` in flight: the Surety side of every broker's scenario 1.
pub async fn surety_publish(
    publisher: &Arc<dyn Publisher>,
    destination: &str,
    payload: &Bytes,
    messages: usize,
    window: usize,
) -> Result<Run, String> {
    windowed(messages, window, |_| {
        let publisher = publisher.clone();
        // A fresh message (and id) each time, as an application would build it.
        let message = Message::new(destination, payload.clone());
        async move {
            publisher
                .publish(&message)
                .await
                .map(|_| ())
                .map_err(fail("surety publish"))
        }
    })
    .await
}

/// [`surety_publish`] as a workload.
pub fn surety_workload<'a>(
    publisher: &'a Arc<dyn Publisher>,
    destination: &'a str,
    payload: &'a Bytes,
    window: usize,
) -> Workload<'a> {
    workload(move |n| surety_publish(publisher, destination, payload, n, window))
}

/// One workload of a comparison: runs itself with the given number of messages.
pub type Workload<'a> = Box<dyn Fn(usize) -> BoxFuture<'a, Result<Run, String>> + Send + Sync + 'a>;

/// Something to do between two timed runs (empty a queue, clear a table); untimed.
pub type Reset<'a> = Box<dyn Fn() -> BoxFuture<'a, Result<(), String>> + Send + Sync + 'a>;

/// Boxes a workload closure.
pub fn workload<'a, F, Fut>(f: F) -> Workload<'a>
where
    F: Fn(usize) -> Fut + Send + Sync + 'a,
    Fut: Future<Output = Result<Run, String>> + Send + 'a,
{
    Box::new(move |n| Box::pin(f(n)))
}

/// The one measurement loop every scenario shares: each workload once with `warmup`
/// messages (untimed), then `repetitions` rounds in which every workload runs once with
/// its own message count, in order, so that drift over the run hits all of them alike.
/// `reset` runs after every run. Returns the runs of each workload, in input order.
pub async fn alternate(
    repetitions: usize,
    warmup: usize,
    workloads: &[(usize, Workload<'_>)],
    reset: Option<&Reset<'_>>,
) -> Result<Vec<Vec<Run>>, String> {
    for (_, run) in workloads {
        run(warmup).await?;
        if let Some(reset) = reset {
            reset().await?;
        }
    }
    let mut runs: Vec<Vec<Run>> = workloads.iter().map(|_| Vec::new()).collect();
    for _ in 0..repetitions.max(1) {
        for ((messages, run), out) in workloads.iter().zip(runs.iter_mut()) {
            out.push(run(*messages).await?);
            if let Some(reset) = reset {
                reset().await?;
            }
        }
    }
    Ok(runs)
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
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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

    #[tokio::test]
    async fn alternate_warms_up_then_repeats_each_workload() {
        let resets = AtomicUsize::new(0);
        let a = workload(|n| async move { windowed(n, 4, |_| async { Ok(()) }).await });
        let b = workload(|n| async move { windowed(n * 2, 4, |_| async { Ok(()) }).await });
        let reset: Reset<'_> = Box::new(|| {
            resets.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        });
        let runs = alternate(3, 5, &[(10, a), (7, b)], Some(&reset))
            .await
            .unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].len(), 3);
        assert!(runs[0].iter().all(|r| r.latencies.len() == 10));
        assert!(runs[1].iter().all(|r| r.latencies.len() == 14));
        // Two warm-ups plus 3 × 2 timed runs.
        assert_eq!(resets.load(Ordering::SeqCst), 8);
    }
}
