//! Consuming: a message is acked only after its handler succeeded, comes back when a
//! consumer fails or dies, keeps its attempt count across restarts; groups each get every
//! message and share it among their consumers; delays and per-key order are honoured.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety_core::{Delivery, Handler, HandlerError, Message, Outcome, Subscription};

use super::CaseResult;
use super::steps::{
    consume_until, exactly_once, fail, fast_retry, fresh, header, ids, numbered, publish_all,
    publisher, settle, start, subscribe,
};
use crate::support::{Collector, wait_until};
use crate::{DELIBERATE_PANIC, Fixture, Observed};

pub(super) async fn ack_after_process(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "ack", &["g"]).await?;
    let publisher = publisher(&f).await?;
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
    let handle = start(
        &f,
        Subscription::new(&dest, &groups[0]).retry(fast_retry(5)),
        &collector,
    )
    .await?;
    publish_all(publisher.as_ref(), std::slice::from_ref(&flaky)).await?;
    publish_all(publisher.as_ref(), &steady).await?;
    let fid = flaky.id().clone();
    settle(&f, vec![handle], || collector.of(&fid).len() >= 3).await;
    let attempts: Vec<u32> = collector.of(&fid).iter().map(|d| d.attempt).collect();
    ensure!(
        attempts == [1, 2, 3],
        "the flaky message was seen at attempts {attempts:?}, expected [1, 2, 3] and nothing after the ack"
    );
    let observed = exactly_once(&collector, &ids(&steady), "steady messages")?;
    Ok(Observed {
        messages: observed.messages + 1,
        ..observed
    })
}

/// Takes deliveries and never returns, like a process that hangs or dies mid-work.
#[derive(Default)]
struct StuckHandler {
    started: AtomicU32,
}

#[async_trait::async_trait]
impl Handler for StuckHandler {
    async fn handle(&self, _: &Delivery) -> Result<Outcome, HandlerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        futures::future::pending().await
    }
}

pub(super) async fn crash_before_ack_redelivers(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "crash", &["g"]).await?;
    let message = Message::new(&dest, "work");
    publish_all(
        publisher(&f).await?.as_ref(),
        std::slice::from_ref(&message),
    )
    .await?;
    // First consumer: takes the message and never finishes, then dies.
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
    let id = message.id().clone();
    let collector = Collector::acking();
    let arrived = consume_until(&f, Subscription::new(&dest, &groups[0]), &collector, |c| {
        !c.of(&id).is_empty()
    })
    .await?;
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

pub(super) async fn attempts_survive_restart(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "attempts", &["g"]).await?;
    let message = Message::new(&dest, "retry me");
    publish_all(
        publisher(&f).await?.as_ref(),
        std::slice::from_ref(&message),
    )
    .await?;
    let id = message.id().clone();
    let sub = Subscription::new(&dest, &groups[0])
        .retry(fast_retry(10))
        .concurrency(1);
    let first = Collector::with(|_| Ok(Outcome::retry()));
    let twice = consume_until(&f, sub.clone(), &first, |c| c.of(&id).len() >= 2).await?;
    ensure!(twice, "the message was not redelivered after a retry");
    let seen_before = first.of(&id).len() as u32;
    let second = Collector::acking();
    let arrived = consume_until(&f, sub, &second, |c| !c.of(&id).is_empty()).await?;
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

pub(super) async fn groups_and_competing_consumers(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "groups", &["a", "b"]).await?;
    let messages = numbered(&dest, 100);
    let ids = ids(&messages);
    let (a1, a2, b) = (
        Collector::acking(),
        Collector::acking(),
        Collector::acking(),
    );
    let handles = vec![
        start(&f, Subscription::new(&dest, &groups[0]), &a1).await?,
        start(&f, Subscription::new(&dest, &groups[0]), &a2).await?,
        start(&f, Subscription::new(&dest, &groups[1]), &b).await?,
    ];
    for r in publisher(&f).await?.publish_batch(&messages).await {
        r.map_err(fail("publish"))?;
    }
    let group_a = || a1.ledger().merge(&a2.ledger());
    settle(&f, handles, || {
        group_a().lost(&ids) == 0 && b.ledger().lost(&ids) == 0
    })
    .await;
    let (la, lb) = (group_a(), b.ledger());
    let lost = la.lost(&ids) + lb.lost(&ids);
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

pub(super) async fn retry_after_delay(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "delay", &["g"]).await?;
    let delay = Duration::from_millis(1500);
    let collector = Collector::with(move |d: &Delivery| {
        Ok(if d.attempt == 1 {
            Outcome::retry_after(delay)
        } else {
            Outcome::Ack
        })
    });
    let handle = start(
        &f,
        Subscription::new(&dest, &groups[0]).retry(fast_retry(3)),
        &collector,
    )
    .await?;
    let message = Message::new(&dest, "later");
    publish_all(
        publisher(&f).await?.as_ref(),
        std::slice::from_ref(&message),
    )
    .await?;
    let id = message.id().clone();
    let twice = settle(&f, vec![handle], || collector.of(&id).len() >= 2).await;
    ensure!(
        twice,
        "the message was not redelivered after Retry {{ after }}"
    );
    let times: Vec<_> = collector
        .timed()
        .into_iter()
        .filter(|(_, d)| d.message.id() == &id)
        .map(|(t, _)| t)
        .collect();
    let gap = times[1].duration_since(times[0]);
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

pub(super) async fn per_key_ordering(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "order", &["g"]).await?;
    let keys = ["k0", "k1", "k2", "k3"];
    let per_key: usize = 25;
    let messages: Vec<Message> = (0..per_key)
        .flat_map(|i| {
            keys.map(|k| {
                Message::new(&dest, format!("{k}:{i}"))
                    .with_key(k)
                    .with_header("seq", i.to_string())
            })
        })
        .collect();
    publish_all(publisher(&f).await?.as_ref(), &messages).await?;
    // Every fifth message fails once: its retry must hold back later messages of its key.
    let processed: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let p = processed.clone();
    let collector = Collector::with(move |d: &Delivery| {
        let seq: u32 = header(d, "seq").parse().unwrap_or(0);
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
    let total = messages.len();
    let done = |_: &Collector| {
        processed
            .lock()
            .unwrap()
            .values()
            .map(Vec::len)
            .sum::<usize>()
            >= total
    };
    consume_until(&f, sub, &collector, done).await?;
    let processed = processed.lock().unwrap().clone();
    let mut lost = 0;
    for k in keys {
        let seqs = processed.get(k).cloned().unwrap_or_default();
        lost += per_key.saturating_sub(seqs.len());
        ensure!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {k} was processed out of order: {seqs:?}"
        );
    }
    ensure!(lost == 0, "{lost} ordered messages were never processed");
    Ok(Observed {
        messages: total,
        lost,
        duplicated: 0,
    })
}
