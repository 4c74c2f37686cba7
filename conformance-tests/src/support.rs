//! Tools shared by the cases: a collecting handler, a ledger of ids, unique names.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_core::{Delivery, Handler, HandlerError, MessageId, Outcome};

/// A fresh name for a destination or group: `surety-<what>-<random>`, valid on every
/// broker (letters, digits and `-`).
pub fn unique_name(what: &str) -> String {
    format!("surety-{what}-{:08x}", rand::random::<u32>())
}

/// Waits until `done()` is true or `timeout` passes; returns whether it became true.
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts, per message id, how many times it was delivered.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    seen: HashMap<MessageId, usize>,
}

impl Ledger {
    /// Records a delivery.
    pub fn record(&mut self, id: &MessageId) {
        *self.seen.entry(id.clone()).or_default() += 1;
    }

    /// How many of `expected` never arrived.
    pub fn lost(&self, expected: &[MessageId]) -> usize {
        expected
            .iter()
            .filter(|id| !self.seen.contains_key(*id))
            .count()
    }

    /// Deliveries beyond the first among `ids` only.
    pub fn duplicated_among(&self, ids: &[MessageId]) -> usize {
        ids.iter().map(|id| self.count(id).saturating_sub(1)).sum()
    }

    /// Adds every delivery of `other`.
    pub fn merge(mut self, other: &Ledger) -> Ledger {
        for (id, n) in &other.seen {
            *self.seen.entry(id.clone()).or_default() += n;
        }
        self
    }

    /// Deliveries beyond the first, summed over ids.
    pub fn duplicated(&self) -> usize {
        self.seen.values().map(|n| n.saturating_sub(1)).sum()
    }

    /// How often `id` was delivered.
    pub fn count(&self, id: &MessageId) -> usize {
        self.seen.get(id).copied().unwrap_or(0)
    }

    /// Distinct ids delivered.
    pub fn distinct(&self) -> usize {
        self.seen.len()
    }
}

type Decide = dyn Fn(&Delivery) -> Result<Outcome, HandlerError> + Send + Sync;

/// A handler that records every delivery and answers with a rule.
#[derive(Clone)]
pub struct Collector {
    deliveries: Arc<Mutex<Vec<(Instant, Delivery)>>>,
    decide: Arc<Decide>,
}

impl Collector {
    /// Acks everything.
    pub fn acking() -> Self {
        Collector::with(|_| Ok(Outcome::Ack))
    }

    /// Answers each delivery with `decide`.
    pub fn with(
        decide: impl Fn(&Delivery) -> Result<Outcome, HandlerError> + Send + Sync + 'static,
    ) -> Self {
        Collector {
            deliveries: Arc::default(),
            decide: Arc::new(decide),
        }
    }

    /// Every delivery so far, in arrival order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock().iter().map(|(_, d)| d.clone()).collect()
    }

    /// Arrival times and deliveries.
    pub fn timed(&self) -> Vec<(Instant, Delivery)> {
        self.lock().clone()
    }

    /// The ledger of ids delivered.
    pub fn ledger(&self) -> Ledger {
        let mut ledger = Ledger::default();
        for (_, d) in self.lock().iter() {
            ledger.record(d.message.id());
        }
        ledger
    }

    /// Number of deliveries.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was delivered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deliveries of one id.
    pub fn of(&self, id: &MessageId) -> Vec<Delivery> {
        self.lock()
            .iter()
            .filter(|(_, d)| d.message.id() == id)
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// Waits until `done(self)` holds, up to `timeout`.
    pub fn wait<'a>(
        &'a self,
        timeout: Duration,
        done: impl Fn(&Collector) -> bool + 'a,
    ) -> impl Future<Output = bool> + 'a {
        wait_until(timeout, move || done(self))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, Delivery)>> {
        self.deliveries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl Handler for Collector {
    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandlerError> {
        self.lock().push((Instant::now(), delivery.clone()));
        (self.decide)(delivery)
    }
}
