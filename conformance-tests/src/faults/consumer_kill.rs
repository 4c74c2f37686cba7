//! Scenario 4: a consumer killed after its effect, before its ack; and the inbox
//! consumer ([`DyingConsumer`]) the other scenarios with effects use.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_core::{Delivery, Handler, HandlerError, Message, MessageId, Outcome, Subscription};

use super::harness::KILL_MESSAGES;
use super::pg::PgInboxEffects;
use super::{EffectStore, FaultRow, declare, fail, fast_retry, publish_confirmed, stop, subscribe};
use crate::Fixture;
use crate::support::wait_until;

/// A handler that applies the effect through the store, and once `trigger` effects are
/// applied stops acking: every later delivery applies its effect and then hangs, like a
/// process killed right after its database commit. With `trigger = usize::MAX` it is a
/// plain inbox consumer ([`DyingConsumer::inbox`]).
pub struct DyingConsumer {
    effects: Arc<dyn EffectStore>,
    consumer: String,
    /// `usize::MAX`: never dies.
    trigger: usize,
    applied: AtomicUsize,
    duplicates: AtomicUsize,
    hung: AtomicUsize,
    dying: AtomicBool,
    seen: Mutex<HashSet<MessageId>>,
}

impl DyingConsumer {
    /// A consumer that never dies: applies each effect once through the inbox, acks.
    pub fn inbox(effects: Arc<dyn EffectStore>, consumer: &str) -> Self {
        DyingConsumer::new(effects, consumer, usize::MAX)
    }

    /// Effects applied for the first time.
    pub fn applied(&self) -> usize {
        self.applied.load(Ordering::SeqCst)
    }

    /// Deliveries the inbox absorbed as duplicates.
    pub fn duplicates(&self) -> usize {
        self.duplicates.load(Ordering::SeqCst)
    }

    /// Whether `id` was seen (applied now or before).
    pub fn has_seen(&self, id: &MessageId) -> bool {
        self.seen.lock().unwrap().contains(id)
    }

    /// Ids seen so far.
    pub fn seen_count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn new(effects: Arc<dyn EffectStore>, consumer: &str, trigger: usize) -> Self {
        DyingConsumer {
            effects,
            consumer: consumer.into(),
            trigger,
            applied: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            hung: AtomicUsize::new(0),
            dying: AtomicBool::new(false),
            seen: Mutex::default(),
        }
    }
}

#[async_trait::async_trait]
impl Handler for DyingConsumer {
    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandlerError> {
        let first = self
            .effects
            .apply(&self.consumer, &delivery.message)
            .await?;
        self.seen
            .lock()
            .unwrap()
            .insert(delivery.message.id().clone());
        if first {
            let applied = self.applied.fetch_add(1, Ordering::SeqCst) + 1;
            if applied >= self.trigger {
                self.dying.store(true, Ordering::SeqCst);
            }
        } else {
            self.duplicates.fetch_add(1, Ordering::SeqCst);
        }
        if self.dying.load(Ordering::SeqCst) {
            self.hung.fetch_add(1, Ordering::SeqCst);
            futures::future::pending::<()>().await;
        }
        Ok(Outcome::Ack)
    }
}

/// Publishes `n` messages; a first consumer applies effects through `effects` and, after
/// `n / 3` of them, hangs right after each effect (no ack) and is aborted like a killed
/// process. A second consumer in the same group takes the redeliveries. Every effect must
/// be applied exactly once (the inbox absorbs the redeliveries of applied ones).
pub async fn kill_before_ack(
    broker: &str,
    f: &Fixture,
    effects: Arc<dyn EffectStore>,
    n: usize,
) -> Result<FaultRow, String> {
    let mut row = FaultRow::new("consumer-killed-after-effect-before-ack", broker);
    row.messages = n;
    let (dest, group) = declare(f, "fault-kill").await?;
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(&dest, format!("effect {i}")))
        .collect();
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let (confirmed, problems) = publish_confirmed(
        publisher.as_ref(),
        &messages,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    row.failures = problems;

    let subscription = Subscription::new(&dest, &group)
        .retry(fast_retry(10))
        .concurrency(8);
    let first = Arc::new(DyingConsumer::new(effects.clone(), &group, n / 3));
    let handle = subscribe(f, subscription.clone(), first.clone()).await?;
    let died = wait_until(f.delivery_timeout, || first.dying.load(Ordering::SeqCst)).await;
    if !died {
        handle.abort();
        return Err(format!(
            "the first consumer applied only {} of {n} effects before the timeout",
            first.applied.load(Ordering::SeqCst)
        ));
    }
    // Let the other in-flight deliveries reach their effect and hang too.
    wait_until(Duration::from_secs(2), || {
        first.hung.load(Ordering::SeqCst) >= 4
    })
    .await;
    handle.abort();
    let killed_at = Instant::now();
    let hung = first.hung.load(Ordering::SeqCst);

    let second = Arc::new(DyingConsumer::new(effects.clone(), &group, usize::MAX));
    let handle = subscribe(f, subscription, second.clone()).await?;
    let all_applied = || {
        let a = first.seen.lock().unwrap();
        let b = second.seen.lock().unwrap();
        confirmed.iter().all(|id| a.contains(id) || b.contains(id))
    };
    let done = wait_until(f.delivery_timeout, all_applied).await;
    let recovered = killed_at.elapsed();
    // Redeliveries of the hung messages may come after the rest: wait for them too.
    wait_until(f.delivery_timeout, || {
        second.duplicates.load(Ordering::SeqCst) >= hung
    })
    .await;
    tokio::time::sleep(f.quiet_period).await;
    if let Err(why) = stop(handle).await {
        row.failures.push(why);
    }

    let counts = effects.applied().await?;
    row.tally_effects(&confirmed, &counts);
    let absorbed = second.duplicates.load(Ordering::SeqCst);
    row.delivered_twice = absorbed;
    row.recovery = done.then_some(recovered);
    if absorbed < hung {
        row.failures.push(format!(
            "{hung} deliveries hung after their effect, but only {absorbed} came back: \
             unacked messages were not redelivered"
        ));
    }
    row.note = format!("killed with {hung} unacked after their effect; inbox absorbed {absorbed}");
    Ok(row)
}

/// Runs [`kill_before_ack`] with the effects in a PostgreSQL inbox of its own.
pub(super) async fn run_kill(adapter: &str, f: &Fixture) -> Result<FaultRow, String> {
    let effects = Arc::new(PgInboxEffects::create().await?);
    let row = kill_before_ack(adapter, f, effects.clone(), KILL_MESSAGES).await;
    effects.drop_tables().await;
    row
}
