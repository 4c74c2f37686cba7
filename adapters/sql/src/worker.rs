//! A background loop (relay, checker) and its handle.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running background loop. Dropping the handle leaves the loop running; stop it with
/// [`Worker::shutdown`] (finishes the current batch) or [`Worker::abort`] (at once, as a
/// crash would: leased rows are taken over when their lease expires).
#[derive(Debug)]
pub struct Worker {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Worker {
    /// Runs `step` until stopped. `step` returns whether there may be more work at once;
    /// otherwise the loop sleeps `idle` (or until stopped).
    pub(crate) fn spawn<F, Fut>(idle: Duration, mut step: F) -> Worker
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = bool> + Send,
    {
        Worker::spawn_loop(move |mut stop| async move {
            while !stop.requested() {
                if !step().await {
                    stop.sleep(idle).await;
                }
            }
        })
    }

    /// Runs a loop that watches `StopSignal` itself: for loops that hold work between
    /// steps and must hand it back when asked to stop.
    pub(crate) fn spawn_loop<F, Fut>(run: F) -> Worker
    where
        F: FnOnce(StopSignal) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(StopSignal(stopped)));
        Worker { stop, task }
    }

    /// Asks the loop to stop after its current step and waits for it.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops the loop at once, wherever it is (a simulated crash).
    pub fn abort(self) {
        self.task.abort();
    }

    /// Whether the loop has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// The loop's side of [`Worker::shutdown`]. Clones watch the same worker (one per loop
/// when a worker runs several).
#[derive(Clone)]
pub(crate) struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// Whether a stop was asked for.
    pub(crate) fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Sleeps `idle`, or less if a stop is asked for meanwhile. A dropped [`Worker`]
    /// handle can never ask, so then the full `idle` is slept (not a busy loop).
    pub(crate) async fn sleep(&mut self, idle: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(idle) => {}
            Ok(()) = self.0.changed() => {}
        }
    }
}
