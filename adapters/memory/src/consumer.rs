//! Consumers: workers that take entries from a group's queue, hand them to the shared
//! consume path, and settle them in the queue as it decides.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use surety_core::raw::{ConsumePath, PublishPath, Settle};
use surety_core::{
    Delivery, Handler, Message, Result, Subscriber, Subscription, SubscriptionHandle,
};
use tokio::sync::watch;

use crate::shared::{Entry, Shared, dead_letter_name, take_next};

pub(crate) struct MemorySubscriber {
    shared: Arc<Shared>,
    publish: PublishPath,
}

impl MemorySubscriber {
    pub(crate) fn new(shared: Arc<Shared>, publish: PublishPath) -> Self {
        MemorySubscriber { shared, publish }
    }
}

#[async_trait]
impl Subscriber for MemorySubscriber {
    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn Handler>,
    ) -> Result<SubscriptionHandle> {
        // Creates the group now, so the subscription fails fast on an undeclared
        // destination instead of inside a background task.
        Shared::with_group(
            &mut self.shared.lock(),
            &subscription.destination,
            &subscription.group,
            |_| (),
        )?;
        let (stop, stop_rx) = SubscriptionHandle::stop_signal();
        let dead_letter = subscription
            .dead_letter
            .clone()
            .unwrap_or_else(|| dead_letter_name(&subscription.destination, &subscription.group));
        let worker = Arc::new(Worker {
            shared: self.shared.clone(),
            path: ConsumePath::new(crate::ADAPTER, &subscription, dead_letter),
            publish: self.publish.clone(),
            handler,
            subscription,
        });
        let tasks = (0..worker.subscription.concurrency.max(1))
            .map(|_| tokio::spawn(worker.clone().run(stop_rx.clone())))
            .collect();
        Ok(SubscriptionHandle::new(stop, tasks))
    }
}

struct Worker {
    shared: Arc<Shared>,
    subscription: Subscription,
    path: ConsumePath,
    publish: PublishPath,
    handler: Arc<dyn Handler>,
}

impl Worker {
    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut changed = self.shared.changed.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            changed.borrow_and_update();
            let sub = &self.subscription;
            let next =
                Shared::with_group(&mut self.shared.lock(), &sub.destination, &sub.group, |g| {
                    take_next(g, sub.ordered, Instant::now())
                });
            match next {
                Ok(Ok(entry)) => self.process(entry).await,
                Ok(Err(wake)) => {
                    let sleep = wake
                        .map(|w| w.saturating_duration_since(Instant::now()))
                        .unwrap_or(Duration::from_secs(3600));
                    tokio::select! {
                        _ = changed.changed() => {}
                        _ = tokio::time::sleep(sleep) => {}
                        _ = stop.changed() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "memory consumer stopped");
                    return;
                }
            }
        }
    }

    async fn process(&self, entry: Entry) {
        let mut settle = InFlight {
            worker: self,
            seq: entry.seq,
            settled: false,
        };
        let delivery = Delivery {
            message: entry.message,
            attempt: entry.attempt,
            group: self.subscription.group.clone(),
        };
        self.path
            .deliver(delivery, self.handler.as_ref(), &mut settle)
            .await;
        self.shared.wake();
    }

    /// Takes the in-flight entry `seq` out, and puts it back (due after `after`) when
    /// `requeue` says so.
    fn finish(&self, seq: u64, requeue: Option<Duration>) {
        let sub = &self.subscription;
        let mut state = self.shared.lock();
        let _ = Shared::with_group(&mut state, &sub.destination, &sub.group, |g| {
            let Some(mut entry) = g.in_flight.remove(&seq) else {
                return;
            };
            if let Some(after) = requeue {
                entry.not_before = Some(Instant::now() + after);
                if sub.ordered {
                    // Holds back later messages with the same key.
                    g.queue.push_front(entry);
                } else {
                    g.queue.push_back(entry);
                }
            }
        });
    }
}

/// One in-flight entry. Settling takes it out of the group's in-flight set; dropped
/// unsettled (an aborted worker) it goes back to the front of the queue, as a broker
/// requeues a dead consumer's unacknowledged messages.
struct InFlight<'a> {
    worker: &'a Worker,
    seq: u64,
    settled: bool,
}

#[async_trait]
impl Settle for InFlight<'_> {
    async fn ack(&mut self) -> Result<()> {
        self.worker.finish(self.seq, None);
        self.settled = true;
        Ok(())
    }

    async fn redeliver(&mut self, after: Duration, _next_attempt: u32) -> Result<()> {
        // The broker counts attempts itself: the entry's count grows at each take.
        self.worker.finish(self.seq, Some(after));
        self.settled = true;
        Ok(())
    }

    async fn dead_letter(&mut self, dead_letter: &Message) -> Result<()> {
        let shared = &self.worker.shared;
        self.worker
            .publish
            .run(dead_letter, dead_letter.destination(), || async {
                let receipt = Shared::publish_locked(&mut shared.lock(), dead_letter)?;
                shared.wake();
                Ok(receipt)
            })
            .await
            .map(|_| ())
    }

    async fn hold(&mut self, after: Duration, next_attempt: u32) {
        let _ = self.redeliver(after, next_attempt).await;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let sub = &self.worker.subscription;
        let mut state = self.worker.shared.lock();
        let _ = Shared::with_group(&mut state, &sub.destination, &sub.group, |g| {
            if let Some(entry) = g.in_flight.remove(&self.seq) {
                g.queue.push_front(entry);
            }
        });
        drop(state);
        self.worker.shared.wake();
    }
}
