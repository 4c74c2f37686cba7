//! The cases. Each is an async function from a [`Fixture`] to what it observed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use surety_core::{
    Capability, CheckBack, Delivery, ErrorKind, Handler, Message, MessageId, Outcome, RetryPolicy,
    Subscription, SubscriptionHandle, Topology, TxOutcome, TxState, check_back_fn, headers,
};

use crate::support::{Collector, unique_name, wait_until};
use crate::{DELIBERATE_PANIC, Fixture, Observed};

type CaseResult = Result<Observed, String>;

/// One behaviour every adapter must show, with the capabilities it needs.
pub struct Case {
    /// A short name, used in test names and the matrix.
    pub name: &'static str,
    /// What a user relies on, in one line.
    pub promise: &'static str,
    /// Capabilities the adapter must have; otherwise "not supported".
    pub requires: &'static [Capability],
    /// Runs the case.
    pub run: fn(Fixture) -> BoxFuture<'static, CaseResult>,
}

macro_rules! case {
    ($name:ident, $promise:literal, [$($cap:ident),*]) => {
        Case {
            name: stringify!($name),
            promise: $promise,
            requires: &[$(Capability::$cap),*],
            run: |f| Box::pin($name(f)),
        }
    };
}

/// Every case, in the order of the matrix.
pub static CASES: &[Case] = &[
    case!(
        confirm_then_consume,
        "every confirmed message is consumed, once",
        []
    ),
    case!(
        batch_reports_each_message,
        "a batch returns one result per message; a bad one does not sink the rest",
        []
    ),
    case!(
        unroutable_is_an_error,
        "a destination nobody declared is an unroutable error, not a silent success",
        []
    ),
    case!(
        invalid_message_is_rejected,
        "oversized or malformed messages get a typed error and nothing is sent",
        []
    ),
    case!(
        ack_after_process,
        "a handler that fails k times sees the message again; it is acked only after success",
        []
    ),
    case!(
        crash_before_ack_redelivers,
        "a consumer that dies before acking does not lose the message",
        []
    ),
    case!(
        attempts_survive_restart,
        "the attempt count survives a consumer restart",
        []
    ),
    case!(
        groups_and_competing_consumers,
        "each group gets every message; consumers of a group share them",
        []
    ),
    case!(
        retry_then_dead_letter,
        "a poison message is retried, then dead-lettered with reason and attempts; others flow",
        [DeadLetter]
    ),
    case!(
        reject_dead_letters_at_once,
        "a rejected message is dead-lettered on its first delivery",
        [DeadLetter]
    ),
    case!(
        dead_letter_unavailable_keeps_message,
        "if the dead-letter destination is unavailable, the message is kept, not lost nor hot-looped",
        [DeadLetter]
    ),
    case!(
        retry_after_delay,
        "Retry { after } is not delivered before the delay",
        [DelayedRetry]
    ),
    case!(
        per_key_ordering,
        "messages with one key are processed in publish order, retries included",
        [OrderingPerKey]
    ),
    case!(
        duplicate_detectable_by_id,
        "a message published twice is delivered with the same id both times",
        []
    ),
    case!(
        oneway_publish,
        "oneway publish hands messages over without a confirm",
        [OnewayPublish]
    ),
    case!(
        transactional_commit_and_rollback,
        "a committed half message is delivered, a rolled-back one never; neither is visible before",
        [HalfMessages]
    ),
    case!(
        check_back_resolves_unknown,
        "Unknown (or a panicking local transaction) is resolved by the check-back, both ways",
        [HalfMessages]
    ),
    case!(
        check_back_after_producer_dies,
        "a new producer of the group answers the check-back of a producer that died",
        [HalfMessages]
    ),
    case!(
        broker_transaction_is_atomic,
        "a broker transaction delivers all its messages on commit and none on abort",
        [BrokerTransactions]
    ),
];

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::with_max_attempts(max_attempts)
        .backoff(Duration::from_millis(50), Duration::from_millis(300))
        .jitter(0.1)
}

/// Declares a fresh destination with `groups` (and their dead letters).
async fn fresh(f: &Fixture, what: &str, groups: &[&str]) -> Result<(String, Vec<String>), String> {
    let destination = unique_name(what);
    let groups: Vec<String> = groups.iter().map(|g| unique_name(g)).collect();
    let mut topology = Topology::new(&destination);
    for g in &groups {
        topology = topology.group(g);
    }
    f.broker.declare(&topology).await.map_err(fail("declare"))?;
    Ok((destination, groups))
}

async fn subscribe(
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

fn numbered(destination: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            Message::new(destination, format!("message {i}")).with_header("seq", i.to_string())
        })
        .collect()
}

async fn confirm_then_consume(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "confirm", &["g"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let messages = numbered(&dest, 300);
    // Half pipelined in one batch, half one by one.
    for r in publisher.publish_batch(&messages[..150]).await {
        r.map_err(fail("batch publish"))?;
    }
    for m in &messages[150..] {
        let receipt = publisher.publish(m).await.map_err(fail("publish"))?;
        ensure!(
            receipt.message_id == *m.id(),
            "receipt names another message"
        );
    }
    let collector = Collector::acking();
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(collector.clone()),
    )
    .await?;
    let ids: Vec<&MessageId> = messages.iter().map(Message::id).collect();
    collector
        .wait(f.delivery_timeout, |c| {
            c.ledger().lost(ids.iter().copied()) == 0
        })
        .await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    let ledger = collector.ledger();
    let observed = Observed {
        messages: messages.len(),
        lost: ledger.lost(ids.iter().copied()),
        duplicated: ledger.duplicated(),
    };
    ensure!(
        observed.lost == 0,
        "{} of {} confirmed messages never arrived",
        observed.lost,
        messages.len()
    );
    ensure!(
        observed.duplicated == 0,
        "{} duplicate deliveries on a healthy broker",
        observed.duplicated
    );
    let payloads_ok = collector.deliveries().iter().all(|d| {
        let seq = d.message.header("seq").unwrap_or("?");
        d.message.payload().as_ref() == format!("message {seq}").as_bytes()
    });
    ensure!(payloads_ok, "a payload or header arrived changed");
    Ok(observed)
}

async fn batch_reports_each_message(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "batch", &["g"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let mut batch = numbered(&dest, 10);
    batch[3] = Message::new(unique_name("nowhere"), "lost?");
    batch[6] = Message::new(&dest, "bad header").with_header("bad name", "x");
    let results = publisher.publish_batch(&batch).await;
    ensure!(
        results.len() == batch.len(),
        "{} results for {} messages",
        results.len(),
        batch.len()
    );
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (3, Err(e)) => ensure!(
                e.kind() == ErrorKind::Unroutable,
                "message 3: expected unroutable, got {e}"
            ),
            (6, Err(e)) => ensure!(
                e.kind() == ErrorKind::InvalidMessage,
                "message 6: expected invalid, got {e}"
            ),
            (3 | 6, Ok(_)) => return Err(format!("message {i} is bad but was confirmed")),
            (_, Err(e)) => return Err(format!("good message {i} failed: {e}")),
            (_, Ok(_)) => {}
        }
    }
    let collector = Collector::acking();
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(collector.clone()),
    )
    .await?;
    let good: Vec<&MessageId> = batch
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 6)
        .map(|(_, m)| m.id())
        .collect();
    collector
        .wait(f.delivery_timeout, |c| {
            c.ledger().lost(good.iter().copied()) == 0
        })
        .await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    let ledger = collector.ledger();
    ensure!(
        ledger.count(batch[6].id()) == 0,
        "the invalid message was delivered"
    );
    let observed = Observed {
        messages: good.len(),
        lost: ledger.lost(good.iter().copied()),
        duplicated: ledger.duplicated(),
    };
    ensure!(
        observed.lost == 0,
        "{} good messages of the batch were lost",
        observed.lost
    );
    Ok(observed)
}

async fn unroutable_is_an_error(f: Fixture) -> CaseResult {
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let message = Message::new(unique_name("undeclared"), "nobody listens");
    match publisher.publish(&message).await {
        Ok(r) => Err(format!(
            "publish to an undeclared destination was confirmed: {r:?}"
        )),
        Err(e) => {
            ensure!(
                e.kind() == ErrorKind::Unroutable,
                "expected unroutable, got {e}"
            );
            ensure!(
                !e.is_retryable(),
                "an unroutable error must not be retryable as is: {e}"
            );
            Ok(Observed {
                messages: 1,
                ..Observed::default()
            })
        }
    }
}

async fn invalid_message_is_rejected(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "invalid", &["g"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let limit = f
        .broker
        .capabilities()
        .max_message_size
        .ok_or("the adapter declares no message size limit")?;
    let bad = vec![
        Message::new(&dest, vec![0u8; limit + 1]),
        Message::new(&dest, "x").with_header("", "empty name"),
        Message::new(&dest, "x").with_header("h", "new\nline"),
    ];
    for m in &bad {
        match publisher.publish(m).await {
            Ok(_) => return Err(format!("invalid message {m:?} was confirmed")),
            Err(e) => {
                ensure!(
                    e.kind() == ErrorKind::InvalidMessage,
                    "expected invalid message, got {e}"
                );
                ensure!(
                    !e.is_retryable(),
                    "an invalid message is not retryable: {e}"
                );
            }
        }
    }
    let collector = Collector::acking();
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(collector.clone()),
    )
    .await?;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    ensure!(
        collector.is_empty(),
        "an invalid message reached a consumer"
    );
    Ok(Observed {
        messages: bad.len(),
        ..Observed::default()
    })
}

async fn ack_after_process(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "ack", &["g"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let flaky = Message::new(&dest, "flaky");
    let steady = numbered(&dest, 20);
    let flaky_id = flaky.id().clone();
    // Fails twice (an error, then a panic), then succeeds.
    let collector = Collector::with(move |d: &Delivery| {
        if d.message.id() != &flaky_id {
            return Ok(Outcome::Ack);
        }
        match d.attempt {
            1 => Err("transient failure".into()),
            2 => panic!("{DELIBERATE_PANIC}: handler panic on attempt 2"),
            _ => Ok(Outcome::Ack),
        }
    });
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]).retry(fast_retry(5)),
        Arc::new(collector.clone()),
    )
    .await?;
    publisher.publish(&flaky).await.map_err(fail("publish"))?;
    for m in &steady {
        publisher.publish(m).await.map_err(fail("publish"))?;
    }
    let fid = flaky.id().clone();
    collector
        .wait(f.delivery_timeout, |c| c.of(&fid).len() >= 3)
        .await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    let attempts: Vec<u32> = collector.of(flaky.id()).iter().map(|d| d.attempt).collect();
    ensure!(
        attempts == vec![1, 2, 3],
        "the flaky message was seen at attempts {attempts:?}, expected [1, 2, 3] and no delivery after the ack"
    );
    let ledger = collector.ledger();
    let ids: Vec<&MessageId> = steady.iter().map(Message::id).collect();
    let lost = ledger.lost(ids.iter().copied());
    ensure!(lost == 0, "{lost} steady messages lost");
    let dup = ids
        .iter()
        .map(|id| ledger.count(id).saturating_sub(1))
        .sum::<usize>();
    ensure!(dup == 0, "{dup} steady messages delivered twice");
    Ok(Observed {
        messages: steady.len() + 1,
        lost,
        duplicated: dup,
    })
}

async fn crash_before_ack_redelivers(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "crash", &["g"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let message = Message::new(&dest, "work");
    publisher.publish(&message).await.map_err(fail("publish"))?;
    // First consumer: takes the message and never finishes.
    let stuck = Arc::new(StuckHandler::default());
    let handle = subscribe(&f, Subscription::new(&dest, &groups[0]), stuck.clone()).await?;
    let started = wait_until(f.delivery_timeout, || {
        stuck.started.load(Ordering::SeqCst) > 0
    })
    .await;
    ensure!(
        started,
        "the message was never delivered to the first consumer"
    );
    handle.abort();
    // Second consumer: gets it again.
    let collector = Collector::acking();
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(collector.clone()),
    )
    .await?;
    let id = message.id().clone();
    let arrived = collector
        .wait(f.delivery_timeout, |c| !c.of(&id).is_empty())
        .await;
    handle.shutdown().await;
    ensure!(
        arrived,
        "the message a crashed consumer held was not delivered again"
    );
    let attempt = collector.of(&id)[0].attempt;
    ensure!(
        attempt >= 2,
        "the redelivery reports attempt {attempt}, expected at least 2"
    );
    Ok(Observed {
        messages: 1,
        ..Observed::default()
    })
}

/// Takes deliveries and never returns, like a process that hangs or dies mid-work.
#[derive(Default)]
struct StuckHandler {
    started: AtomicU32,
}

#[async_trait::async_trait]
impl Handler for StuckHandler {
    async fn handle(&self, _: &Delivery) -> Result<Outcome, surety_core::HandlerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        futures::future::pending().await
    }
}

async fn attempts_survive_restart(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "attempts", &["g"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let message = Message::new(&dest, "retry me");
    publisher.publish(&message).await.map_err(fail("publish"))?;
    let sub = Subscription::new(&dest, &groups[0])
        .retry(fast_retry(10))
        .concurrency(1);
    let first = Collector::with(|_| Ok(Outcome::retry()));
    let handle = subscribe(&f, sub.clone(), Arc::new(first.clone())).await?;
    let id = message.id().clone();
    let twice = first
        .wait(f.delivery_timeout, |c| c.of(&id).len() >= 2)
        .await;
    handle.shutdown().await;
    ensure!(twice, "the message was not redelivered after a retry");
    let seen_before = first.of(&id).len() as u32;
    let second = Collector::acking();
    let handle = subscribe(&f, sub, Arc::new(second.clone())).await?;
    let arrived = second
        .wait(f.delivery_timeout, |c| !c.of(&id).is_empty())
        .await;
    handle.shutdown().await;
    ensure!(
        arrived,
        "the message did not come back after the consumer restarted"
    );
    let attempt = second.of(&id)[0].attempt;
    ensure!(
        attempt > seen_before,
        "after {seen_before} deliveries the restarted consumer saw attempt {attempt}: the count was reset"
    );
    Ok(Observed {
        messages: 1,
        ..Observed::default()
    })
}

async fn groups_and_competing_consumers(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "groups", &["a", "b"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let messages = numbered(&dest, 100);
    let ids: Vec<&MessageId> = messages.iter().map(Message::id).collect();
    let a1 = Collector::acking();
    let a2 = Collector::acking();
    let b = Collector::acking();
    let h1 = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(a1.clone()),
    )
    .await?;
    let h2 = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(a2.clone()),
    )
    .await?;
    let h3 = subscribe(
        &f,
        Subscription::new(&dest, &groups[1]),
        Arc::new(b.clone()),
    )
    .await?;
    for r in publisher.publish_batch(&messages).await {
        r.map_err(fail("publish"))?;
    }
    let group_a = |_: &Collector| {
        let mut l = a1.ledger();
        for d in a2.deliveries() {
            l.record(d.message.id());
        }
        l
    };
    wait_until(f.delivery_timeout, || {
        group_a(&a1).lost(ids.iter().copied()) == 0 && b.ledger().lost(ids.iter().copied()) == 0
    })
    .await;
    tokio::time::sleep(f.quiet_period).await;
    h1.shutdown().await;
    h2.shutdown().await;
    h3.shutdown().await;
    let la = group_a(&a1);
    let lb = b.ledger();
    let lost = la.lost(ids.iter().copied()) + lb.lost(ids.iter().copied());
    let duplicated = la.duplicated() + lb.duplicated();
    ensure!(lost == 0, "{lost} messages missing from a group");
    ensure!(
        duplicated == 0,
        "{duplicated} messages delivered twice within a group"
    );
    Ok(Observed {
        messages: messages.len(),
        lost,
        duplicated,
    })
}

async fn retry_then_dead_letter(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "poison", &["g"]).await?;
    let group = &groups[0];
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let poison = Message::new(&dest, "poison").with_header("kind", "poison");
    let good = numbered(&dest, 30);
    let collector = Collector::with(|d: &Delivery| {
        if d.message.header("kind") == Some("poison") {
            Err("cannot parse order".into())
        } else {
            Ok(Outcome::Ack)
        }
    });
    let dlq = f.broker.dead_letter_destination(&dest, group);
    let dead = Collector::acking();
    let dl_group = unique_name("dlq-reader");
    let handle = subscribe(
        &f,
        Subscription::new(&dest, group).retry(fast_retry(3)),
        Arc::new(collector.clone()),
    )
    .await?;
    let dl_handle = subscribe(
        &f,
        Subscription::new(&dlq, &dl_group),
        Arc::new(dead.clone()),
    )
    .await?;
    publisher.publish(&poison).await.map_err(fail("publish"))?;
    for m in &good {
        publisher.publish(m).await.map_err(fail("publish"))?;
    }
    let pid = poison.id().clone();
    let ids: Vec<&MessageId> = good.iter().map(Message::id).collect();
    dead.wait(f.delivery_timeout, |c| !c.of(&pid).is_empty())
        .await;
    collector
        .wait(f.delivery_timeout, |c| {
            c.ledger().lost(ids.iter().copied()) == 0
        })
        .await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    dl_handle.shutdown().await;
    let ledger = collector.ledger();
    let lost = ledger.lost(ids.iter().copied());
    ensure!(
        lost == 0,
        "{lost} good messages did not flow past the poison message"
    );
    let tries = collector.of(&pid).len();
    ensure!(
        tries == 3,
        "the poison message was delivered {tries} times, expected max_attempts = 3"
    );
    let dl = dead.of(&pid);
    ensure!(
        dl.len() == 1,
        "the poison message reached the dead-letter destination {} times",
        dl.len()
    );
    let m = &dl[0].message;
    ensure!(
        m.header(headers::DEAD_LETTER_ATTEMPTS) == Some("3"),
        "dead letter attempts header: {:?}",
        m.header(headers::DEAD_LETTER_ATTEMPTS)
    );
    let reason = m.header(headers::DEAD_LETTER_REASON).unwrap_or_default();
    ensure!(
        reason.contains("cannot parse order"),
        "dead letter reason {reason:?} does not carry the handler's error"
    );
    ensure!(
        m.header(headers::ORIGINAL_DESTINATION) == Some(dest.as_str()),
        "dead letter does not name its origin"
    );
    ensure!(
        m.payload() == poison.payload(),
        "dead letter payload changed"
    );
    Ok(Observed {
        messages: good.len() + 1,
        lost,
        duplicated: ledger.duplicated().saturating_sub(tries - 1),
    })
}

async fn reject_dead_letters_at_once(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "reject", &["g"]).await?;
    let group = &groups[0];
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let message = Message::new(&dest, "invalid order");
    let collector = Collector::with(|_| Ok(Outcome::reject("order total is negative")));
    let dead = Collector::acking();
    let dlq = f.broker.dead_letter_destination(&dest, group);
    let handle = subscribe(
        &f,
        Subscription::new(&dest, group).retry(fast_retry(5)),
        Arc::new(collector.clone()),
    )
    .await?;
    let dl_handle = subscribe(
        &f,
        Subscription::new(&dlq, unique_name("dlq-reader")),
        Arc::new(dead.clone()),
    )
    .await?;
    publisher.publish(&message).await.map_err(fail("publish"))?;
    let id = message.id().clone();
    let arrived = dead
        .wait(f.delivery_timeout, |c| !c.of(&id).is_empty())
        .await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    dl_handle.shutdown().await;
    ensure!(
        arrived,
        "the rejected message never reached the dead-letter destination"
    );
    ensure!(
        collector.of(&id).len() == 1,
        "a rejected message was delivered {} times",
        collector.of(&id).len()
    );
    let m = &dead.of(&id)[0].message;
    ensure!(
        m.header(headers::DEAD_LETTER_ATTEMPTS) == Some("1"),
        "attempts header {:?}",
        m.header(headers::DEAD_LETTER_ATTEMPTS)
    );
    let reason = m.header(headers::DEAD_LETTER_REASON).unwrap_or_default();
    ensure!(
        reason.contains("order total is negative"),
        "reason {reason:?}"
    );
    Ok(Observed {
        messages: 1,
        ..Observed::default()
    })
}

async fn dead_letter_unavailable_keeps_message(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "dlq-down", &["g"]).await?;
    let group = &groups[0];
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let message = Message::new(&dest, "poison");
    publisher.publish(&message).await.map_err(fail("publish"))?;
    let missing_dlq = unique_name("missing-dlq");
    let policy = fast_retry(2);
    let sub = Subscription::new(&dest, group)
        .retry(policy.clone())
        .dead_letter_to(&missing_dlq)
        .concurrency(1);
    let collector = Collector::with(|_| Err("always fails".into()));
    let handle = subscribe(&f, sub.clone(), Arc::new(collector.clone())).await?;
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    handle.shutdown().await;
    let tries = collector.len() as u32;
    ensure!(
        tries > policy.max_attempts,
        "after the dead letter failed the message was not kept and retried ({tries} deliveries)"
    );
    // At most one delivery per max_backoff after the attempts ran out, with slack.
    let ceiling =
        policy.max_attempts + (window.as_millis() / policy.max_backoff.as_millis()) as u32 + 2;
    ensure!(
        tries <= ceiling,
        "{tries} deliveries in {window:?}: the message is hot-looping"
    );
    // Once the dead-letter destination exists, the message lands there: it was never lost.
    f.broker
        .declare(&Topology::new(&missing_dlq))
        .await
        .map_err(fail("declare dead-letter destination"))?;
    let dead = Collector::acking();
    let dl_handle = subscribe(
        &f,
        Subscription::new(&missing_dlq, unique_name("dlq-reader")),
        Arc::new(dead.clone()),
    )
    .await?;
    let handle = subscribe(&f, sub, Arc::new(collector.clone())).await?;
    let id = message.id().clone();
    let arrived = dead
        .wait(f.delivery_timeout, |c| !c.of(&id).is_empty())
        .await;
    handle.shutdown().await;
    dl_handle.shutdown().await;
    ensure!(
        arrived,
        "the kept message did not reach the dead-letter destination once it existed"
    );
    Ok(Observed {
        messages: 1,
        ..Observed::default()
    })
}

async fn retry_after_delay(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "delay", &["g"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let delay = Duration::from_millis(1500);
    let collector = Collector::with(move |d: &Delivery| {
        Ok(if d.attempt == 1 {
            Outcome::retry_after(delay)
        } else {
            Outcome::Ack
        })
    });
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]).retry(fast_retry(3)),
        Arc::new(collector.clone()),
    )
    .await?;
    let message = Message::new(&dest, "later");
    publisher.publish(&message).await.map_err(fail("publish"))?;
    let id = message.id().clone();
    let twice = collector
        .wait(f.delivery_timeout, |c| c.of(&id).len() >= 2)
        .await;
    handle.shutdown().await;
    ensure!(
        twice,
        "the message was not redelivered after Retry {{ after }}"
    );
    let timed: Vec<_> = collector
        .timed()
        .into_iter()
        .filter(|(_, d)| d.message.id() == &id)
        .collect();
    let gap = timed[1].0.duration_since(timed[0].0);
    // A little slack for clock granularity; the point is that it was not immediate.
    ensure!(
        gap + Duration::from_millis(100) >= delay,
        "redelivered after {gap:?}, before the requested {delay:?}"
    );
    Ok(Observed {
        messages: 1,
        ..Observed::default()
    })
}

async fn per_key_ordering(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "order", &["g"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let keys = ["k0", "k1", "k2", "k3"];
    let per_key: usize = 25;
    let mut messages = Vec::new();
    for i in 0..per_key {
        for k in keys {
            messages.push(
                Message::new(&dest, format!("{k}:{i}"))
                    .with_key(k)
                    .with_header("seq", i.to_string()),
            );
        }
    }
    for m in &messages {
        publisher.publish(m).await.map_err(fail("publish"))?;
    }
    // Every fifth message fails once: its retry must hold back later messages of its key.
    let processed: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let p = processed.clone();
    let collector = Collector::with(move |d: &Delivery| {
        let seq: u32 = d
            .message
            .header("seq")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if seq.is_multiple_of(5) && d.attempt == 1 {
            return Ok(Outcome::retry());
        }
        p.lock()
            .unwrap()
            .entry(d.message.key().unwrap_or_default().to_owned())
            .or_default()
            .push(seq);
        Ok(Outcome::Ack)
    });
    let sub = Subscription::new(&dest, &groups[0])
        .ordered(true)
        .concurrency(4)
        .retry(fast_retry(5));
    let handle = subscribe(&f, sub, Arc::new(collector.clone())).await?;
    let total = messages.len();
    wait_until(f.delivery_timeout, || {
        processed
            .lock()
            .unwrap()
            .values()
            .map(Vec::len)
            .sum::<usize>()
            >= total
    })
    .await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    let processed = processed.lock().unwrap().clone();
    let mut lost = 0;
    for k in keys {
        let seqs = processed.get(k).cloned().unwrap_or_default();
        lost += per_key.saturating_sub(seqs.len());
        let in_order = seqs.windows(2).all(|w| w[0] < w[1]);
        ensure!(in_order, "key {k} was processed out of order: {seqs:?}");
    }
    ensure!(lost == 0, "{lost} ordered messages were never processed");
    Ok(Observed {
        messages: total,
        lost,
        duplicated: 0,
    })
}

async fn duplicate_detectable_by_id(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "dup", &["g"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let message = Message::new(&dest, "same").with_key("k");
    // A producer retry after a lost confirm looks exactly like this.
    publisher.publish(&message).await.map_err(fail("publish"))?;
    publisher
        .publish(&message)
        .await
        .map_err(fail("publish again"))?;
    let collector = Collector::acking();
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(collector.clone()),
    )
    .await?;
    let id = message.id().clone();
    collector
        .wait(f.delivery_timeout, |c| c.of(&id).len() >= 2)
        .await;
    handle.shutdown().await;
    let copies = collector.of(&id);
    ensure!(
        copies.len() == 2,
        "expected two deliveries of the re-published message, got {}",
        copies.len()
    );
    ensure!(
        copies
            .iter()
            .all(|d| d.message.payload() == message.payload() && d.message.key() == Some("k")),
        "a copy arrived changed"
    );
    Ok(Observed {
        messages: 2,
        lost: 0,
        duplicated: 1,
    })
}

async fn oneway_publish(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "oneway", &["g"]).await?;
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let messages = numbered(&dest, 20);
    for m in &messages {
        publisher
            .publish_oneway(m)
            .await
            .map_err(fail("oneway publish"))?;
    }
    let collector = Collector::acking();
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(collector.clone()),
    )
    .await?;
    let ids: Vec<&MessageId> = messages.iter().map(Message::id).collect();
    collector
        .wait(f.delivery_timeout, |c| {
            c.ledger().lost(ids.iter().copied()) == 0
        })
        .await;
    handle.shutdown().await;
    // Oneway is at-most-once by contract; on a healthy broker nothing should go missing.
    let lost = collector.ledger().lost(ids.iter().copied());
    ensure!(
        lost == 0,
        "{lost} oneway messages missing on a healthy broker"
    );
    Ok(Observed {
        messages: messages.len(),
        lost,
        duplicated: 0,
    })
}

/// A check-back that answers from a shared table, the way an application answers from
/// its database, and counts the questions.
#[derive(Default)]
struct TableCheckBack {
    answers: Mutex<HashMap<MessageId, TxState>>,
    asked: Mutex<HashMap<MessageId, u32>>,
}

impl TableCheckBack {
    fn set(&self, id: &MessageId, state: TxState) {
        self.answers.lock().unwrap().insert(id.clone(), state);
    }

    fn asked(&self, id: &MessageId) -> u32 {
        self.asked.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

#[async_trait::async_trait]
impl CheckBack for TableCheckBack {
    async fn check(&self, message: &Message) -> TxState {
        *self
            .asked
            .lock()
            .unwrap()
            .entry(message.id().clone())
            .or_default() += 1;
        self.answers
            .lock()
            .unwrap()
            .get(message.id())
            .copied()
            .unwrap_or(TxState::Unknown)
    }
}

async fn transactional_commit_and_rollback(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "tx", &["g"]).await?;
    let check = Arc::new(TableCheckBack::default());
    let producer = f
        .broker
        .transactional_publisher(&unique_name("producer"), check.clone())
        .await
        .map_err(fail("transactional publisher"))?;
    let collector = Collector::acking();
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(collector.clone()),
    )
    .await?;
    let commit = Message::new(&dest, "order 1 placed");
    let rollback = Message::new(&dest, "order 2 placed");
    let (cid, rid) = (commit.id().clone(), rollback.id().clone());
    let quiet = f.quiet_period;
    let c = collector.clone();
    let outcome = producer
        .send_in_transaction(
            &commit,
            Box::pin(async move {
                // The half message must stay invisible while the local transaction runs.
                tokio::time::sleep(quiet).await;
                if c.of(&cid).is_empty() {
                    TxState::Commit
                } else {
                    TxState::Rollback
                }
            }),
        )
        .await
        .map_err(fail("send_in_transaction (commit)"))?;
    ensure!(
        matches!(outcome, TxOutcome::Committed(_)),
        "commit outcome {outcome:?}: the half message was visible before the local transaction ended"
    );
    let outcome = producer
        .send_in_transaction(&rollback, Box::pin(async { TxState::Rollback }))
        .await
        .map_err(fail("send_in_transaction (rollback)"))?;
    ensure!(
        outcome == TxOutcome::RolledBack,
        "rollback outcome {outcome:?}"
    );
    let cid = commit.id().clone();
    let arrived = collector
        .wait(f.delivery_timeout, |c| !c.of(&cid).is_empty())
        .await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    ensure!(arrived, "the committed message was never delivered");
    ensure!(
        collector.of(&rid).is_empty(),
        "the rolled-back message was delivered"
    );
    ensure!(
        check.asked(&cid) == 0 && check.asked(&rid) == 0,
        "the check-back was asked about settled transactions"
    );
    Ok(Observed {
        messages: 2,
        lost: 0,
        duplicated: collector.ledger().duplicated(),
    })
}

async fn check_back_resolves_unknown(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "checkback", &["g"]).await?;
    let check = Arc::new(TableCheckBack::default());
    let producer = f
        .broker
        .transactional_publisher(&unique_name("producer"), check.clone())
        .await
        .map_err(fail("transactional publisher"))?;
    let collector = Collector::acking();
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(collector.clone()),
    )
    .await?;
    let to_commit = Message::new(&dest, "committed later");
    let to_rollback = Message::new(&dest, "rolled back later");
    let panicked = Message::new(&dest, "local transaction panicked, then committed");
    for m in [&to_commit, &to_rollback] {
        let outcome = producer
            .send_in_transaction(m, Box::pin(async { TxState::Unknown }))
            .await
            .map_err(fail("send_in_transaction"))?;
        ensure!(
            outcome == TxOutcome::Pending,
            "Unknown gave {outcome:?}, expected Pending"
        );
    }
    let outcome = producer
        .send_in_transaction(
            &panicked,
            Box::pin(async {
                if true {
                    panic!("{DELIBERATE_PANIC}: local transaction crashed");
                }
                TxState::Commit
            }),
        )
        .await
        .map_err(fail("send_in_transaction (panic)"))?;
    ensure!(
        outcome == TxOutcome::Pending,
        "a panicking local transaction gave {outcome:?}, expected Pending"
    );
    // The application's database now knows the answers.
    check.set(to_commit.id(), TxState::Commit);
    check.set(panicked.id(), TxState::Commit);
    check.set(to_rollback.id(), TxState::Rollback);
    let (c, r, p) = (
        to_commit.id().clone(),
        to_rollback.id().clone(),
        panicked.id().clone(),
    );
    let resolved = wait_until(f.check_back_timeout, || {
        check.asked(&r) > 0 && !collector.of(&c).is_empty() && !collector.of(&p).is_empty()
    })
    .await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    ensure!(
        resolved,
        "check-back did not resolve within {:?} (asked: commit {}, rollback {}, panic {})",
        f.check_back_timeout,
        check.asked(&c),
        check.asked(&r),
        check.asked(&p)
    );
    ensure!(
        collector.of(&r).is_empty(),
        "the message whose check-back said rollback was delivered"
    );
    Ok(Observed {
        messages: 3,
        lost: 0,
        duplicated: collector.ledger().duplicated(),
    })
}

async fn check_back_after_producer_dies(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "orphan", &["g"]).await?;
    let producer_group = unique_name("producer");
    let collector = Collector::acking();
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(collector.clone()),
    )
    .await?;
    let to_commit = Message::new(&dest, "committed by the dead producer");
    let to_rollback = Message::new(&dest, "rolled back by the dead producer");
    {
        // The first producer knows nothing and dies while its local transactions hang.
        let first = f
            .broker
            .transactional_publisher(
                &producer_group,
                Arc::new(check_back_fn(|_| async { TxState::Unknown })),
            )
            .await
            .map_err(fail("first producer"))?;
        for m in [&to_commit, &to_rollback] {
            let send = first.send_in_transaction(m, Box::pin(futures::future::pending()));
            let timed_out = tokio::time::timeout(Duration::from_millis(500), send)
                .await
                .is_err();
            ensure!(timed_out, "a local transaction that never ends returned");
        }
    }
    // A new producer of the same group, reading the application's database.
    let check = Arc::new(TableCheckBack::default());
    check.set(to_commit.id(), TxState::Commit);
    check.set(to_rollback.id(), TxState::Rollback);
    let _second = f
        .broker
        .transactional_publisher(&producer_group, check.clone())
        .await
        .map_err(fail("second producer"))?;
    let (c, r) = (to_commit.id().clone(), to_rollback.id().clone());
    let resolved = wait_until(f.check_back_timeout, || {
        check.asked(&r) > 0 && !collector.of(&c).is_empty()
    })
    .await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    ensure!(
        resolved,
        "the new producer's check-back did not resolve the orphans (asked: commit {}, rollback {})",
        check.asked(&c),
        check.asked(&r)
    );
    ensure!(
        collector.of(&r).is_empty(),
        "the orphan whose check-back said rollback was delivered"
    );
    Ok(Observed {
        messages: 2,
        lost: 0,
        duplicated: collector.ledger().duplicated(),
    })
}

async fn broker_transaction_is_atomic(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "brokertx", &["g"]).await?;
    let aborted = numbered(&dest, 3);
    let committed = numbered(&dest, 3);
    let mut tx = f.broker.begin_transaction().await.map_err(fail("begin"))?;
    for m in &aborted {
        tx.publish(m)
            .await
            .map_err(fail("publish in transaction"))?;
    }
    tx.abort().await.map_err(fail("abort"))?;
    let mut tx = f.broker.begin_transaction().await.map_err(fail("begin"))?;
    for m in &committed {
        tx.publish(m)
            .await
            .map_err(fail("publish in transaction"))?;
    }
    tx.commit().await.map_err(fail("commit"))?;
    let collector = Collector::acking();
    let handle = subscribe(
        &f,
        Subscription::new(&dest, &groups[0]),
        Arc::new(collector.clone()),
    )
    .await?;
    let ids: Vec<&MessageId> = committed.iter().map(Message::id).collect();
    collector
        .wait(f.delivery_timeout, |c| {
            c.ledger().lost(ids.iter().copied()) == 0
        })
        .await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    let ledger = collector.ledger();
    let lost = ledger.lost(ids.iter().copied());
    ensure!(lost == 0, "{lost} committed messages missing");
    let leaked = aborted.iter().filter(|m| ledger.count(m.id()) > 0).count();
    ensure!(
        leaked == 0,
        "{leaked} messages of an aborted transaction were delivered"
    );
    Ok(Observed {
        messages: 6,
        lost,
        duplicated: ledger.duplicated(),
    })
}
