//! The steps cases share: fresh destinations and groups, publishers, subscribing a
//! [`Collector`], waiting for deliveries then watching for the quiet period, and the
//! exactly-once check. Every step turns an error into the case's failure text.

use std::sync::Arc;
use std::time::Duration;

use surety_core::{
    CheckBack, Delivery, Handler, Message, MessageId, Publisher, RetryPolicy, Subscription,
    SubscriptionHandle, Topology, TransactionalPublisher,
};

use super::CaseResult;
use crate::support::{Collector, unique_name, wait_until};
use crate::{Fixture, Observed};

pub(super) fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Short backoff so retry cases finish in seconds.
pub(super) fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::with_max_attempts(max_attempts)
        .backoff(Duration::from_millis(50), Duration::from_millis(300))
        .jitter(0.1)
}

/// Declares a fresh destination with one fresh group per name in `groups` (and their
/// dead letters).
pub(super) async fn fresh(
    f: &Fixture,
    what: &str,
    groups: &[&str],
) -> Result<(String, Vec<String>), String> {
    let destination = unique_name(what);
    let groups: Vec<String> = groups.iter().map(|g| unique_name(g)).collect();
    let topology = groups
        .iter()
        .fold(Topology::new(&destination), |t, g| t.group(g));
    f.broker.declare(&topology).await.map_err(fail("declare"))?;
    Ok((destination, groups))
}

pub(super) async fn publisher(f: &Fixture) -> Result<Arc<dyn Publisher>, String> {
    f.broker.publisher().await.map_err(fail("publisher"))
}

pub(super) async fn transactional(
    f: &Fixture,
    group: &str,
    check_back: Arc<dyn CheckBack>,
) -> Result<Arc<dyn TransactionalPublisher>, String> {
    f.broker
        .transactional_publisher(group, check_back)
        .await
        .map_err(fail("transactional publisher"))
}

/// Publishes one by one, each confirmed before the next.
pub(super) async fn publish_all(
    publisher: &dyn Publisher,
    messages: &[Message],
) -> Result<(), String> {
    for m in messages {
        let receipt = publisher.publish(m).await.map_err(fail("publish"))?;
        ensure!(
            receipt.message_id == *m.id(),
            "the receipt for {} names {}",
            m.id(),
            receipt.message_id
        );
    }
    Ok(())
}

pub(super) async fn subscribe(
    f: &Fixture,
    subscription: Subscription,
    handler: Arc<dyn Handler>,
) -> Result<SubscriptionHandle, String> {
    let subscriber = f.broker.subscriber().await.map_err(fail("subscriber"))?;
    subscriber
        .subscribe(subscription, handler)
        .await
        .map_err(fail("subscribe"))
}

/// Starts `collector` on `subscription`.
pub(super) async fn start(
    f: &Fixture,
    subscription: Subscription,
    collector: &Collector,
) -> Result<SubscriptionHandle, String> {
    subscribe(f, subscription, Arc::new(collector.clone())).await
}

/// Waits until `done` holds (or the delivery timeout passes), keeps watching for the
/// quiet period to catch late or extra deliveries, then shuts the consumers down.
/// Returns whether `done` held.
pub(super) async fn settle(
    f: &Fixture,
    handles: Vec<SubscriptionHandle>,
    done: impl FnMut() -> bool,
) -> bool {
    let held = wait_until(f.delivery_timeout, done).await;
    tokio::time::sleep(f.quiet_period).await;
    for handle in handles {
        handle.shutdown().await;
    }
    held
}

/// Runs `collector` on `subscription` until `done(collector)` holds; see [`settle`].
pub(super) async fn consume_until(
    f: &Fixture,
    subscription: Subscription,
    collector: &Collector,
    done: impl Fn(&Collector) -> bool,
) -> Result<bool, String> {
    let handle = start(f, subscription, collector).await?;
    Ok(settle(f, vec![handle], || done(collector)).await)
}

/// Reads a dead-letter destination (or any destination) with a fresh group.
pub(super) async fn reader(
    f: &Fixture,
    destination: &str,
    collector: &Collector,
) -> Result<SubscriptionHandle, String> {
    start(
        f,
        Subscription::new(destination, unique_name("reader")),
        collector,
    )
    .await
}

pub(super) fn ids(messages: &[Message]) -> Vec<MessageId> {
    messages.iter().map(|m| m.id().clone()).collect()
}

pub(super) fn numbered(destination: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            Message::new(destination, format!("message {i}")).with_header("seq", i.to_string())
        })
        .collect()
}

/// Passes when nothing in `ids` was lost or delivered twice.
pub(super) fn exactly_once(collector: &Collector, ids: &[MessageId], what: &str) -> CaseResult {
    let ledger = collector.ledger();
    let observed = Observed {
        messages: ids.len(),
        lost: ledger.lost(ids),
        duplicated: ledger.duplicated_among(ids),
    };
    ensure!(
        observed.lost == 0,
        "{} of {} {what} never arrived",
        observed.lost,
        ids.len()
    );
    ensure!(
        observed.duplicated == 0,
        "{} {what} were delivered twice on a healthy broker",
        observed.duplicated
    );
    Ok(observed)
}

pub(super) fn header<'a>(d: &'a Delivery, name: &str) -> &'a str {
    d.message.header(name).unwrap_or_default()
}
