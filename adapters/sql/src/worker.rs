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
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            while !*stopped.borrow() {
                let more = step().await;
                if !more {
                    tokio::select! {
                        _ = tokio::time::sleep(idle) => {}
                        _ = stopped.changed() => {}
                    }
                }
            }
        });
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
