//! Consumers: workers that take entries from a group's queue and settle them after the
//! handler.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use surety_core::{
    Delivery, Disposition, Handler, Result, Subscriber, Subscription, SubscriptionHandle,
    dead_letter_message, decide, run_handler, telemetry,
};
use tokio::sync::watch;
use tracing::Instrument;

use crate::broker::{ADAPTER, Entry, Shared, dead_letter_name, take_next};

pub(crate) struct MemorySubscriber {
    shared: Arc<Shared>,
}

impl MemorySubscriber {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemorySubscriber { shared }
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
        let subscription = Arc::new(subscription);
        let tasks = (0..subscription.concurrency.max(1))
            .map(|_| {
                let worker = Worker {
                    shared: self.shared.clone(),
                    subscription: subscription.clone(),
                    handler: handler.clone(),
                };
                tokio::spawn(worker.run(stop_rx.clone()))
            })
            .collect();
        Ok(SubscriptionHandle::new(stop, tasks))
    }
}

struct Worker {
    shared: Arc<Shared>,
    subscription: Arc<Subscription>,
    handler: Arc<dyn Handler>,
}

/// Puts an in-flight entry back in the queue if its worker dies before settling it
/// (an aborted task), as a broker does when a consumer's connection drops.
struct InFlight<'a> {
    worker: &'a Worker,
    seq: u64,
    settled: bool,
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

impl Worker {
    async fn run(self, mut stop: watch::Receiver<bool>) {
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
        let sub = &self.subscription;
        let mut guard = InFlight {
            worker: self,
            seq: entry.seq,
            settled: false,
        };
        let delivery = Delivery {
            message: entry.message,
            attempt: entry.attempt,
            group: sub.group.clone(),
        };
        let span = tracing::info_span!(
            "surety.consume",
            message_id = %delivery.message.id(),
            destination = %sub.destination,
            group = %sub.group,
            attempt = delivery.attempt,
        );
        metrics_delivered(&sub.group);
        let result = run_handler(self.handler.as_ref(), &delivery)
            .instrument(span)
            .await;
        let mut disposition = decide(&result, delivery.attempt, &sub.retry);
        if let Disposition::DeadLetter { reason, attempts } = &disposition
            && let Err(e) = self.dead_letter(&delivery, reason, *attempts)
        {
            // Neither lost nor hot-looped: the message stays and comes back after the
            // longest backoff, still counting attempts.
            tracing::error!(
                message_id = %delivery.message.id(),
                error = %e,
                "dead-letter destination unavailable; message kept for a later attempt"
            );
            metrics::counter!(telemetry::DEAD_LETTER_FAILED, "adapter" => ADAPTER).increment(1);
            disposition = Disposition::Redeliver {
                after: sub.retry.max_backoff,
                next_attempt: delivery.attempt + 1,
            };
        }
        telemetry::record_settled(ADAPTER, &sub.group, &disposition);
        self.settle(entry.seq, &disposition);
        guard.settled = true;
        self.shared.wake();
    }

    fn dead_letter(&self, delivery: &Delivery, reason: &str, attempts: u32) -> Result<()> {
        let sub = &self.subscription;
        let target = sub
            .dead_letter
            .clone()
            .unwrap_or_else(|| dead_letter_name(&sub.destination, &sub.group));
        let message = dead_letter_message(&delivery.message, &target, &sub.group, reason, attempts);
        self.shared.publish(&message).map(|_| ())
    }

    fn settle(&self, seq: u64, disposition: &Disposition) {
        let sub = &self.subscription;
        let mut state = self.shared.lock();
        let _ = Shared::with_group(&mut state, &sub.destination, &sub.group, |g| {
            let Some(mut entry) = g.in_flight.remove(&seq) else {
                return;
            };
            if let Disposition::Redeliver { after, .. } = disposition {
                entry.not_before = Some(Instant::now() + *after);
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

fn metrics_delivered(group: &str) {
    metrics::counter!(telemetry::DELIVERED, "adapter" => ADAPTER, "group" => group.to_owned())
        .increment(1);
}
