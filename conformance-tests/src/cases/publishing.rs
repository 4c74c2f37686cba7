//! Publishing with confirm: every confirmed message arrives once and intact, a batch
//! answers per message, and what cannot be delivered (unroutable, invalid) is an error,
//! never a silent success. Oneway publishing and re-publishing one id belong here too.

use surety_core::{ErrorKind, Message, Subscription};

use super::CaseResult;
use super::steps::{
    consume_until, exactly_once, fail, fresh, header, ids, numbered, publish_all, publisher, start,
};
use crate::support::{Collector, unique_name};
use crate::{Fixture, Observed};

pub(super) async fn confirm_then_consume(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "confirm", &["g"]).await?;
    let publisher = publisher(&f).await?;
    let messages = numbered(&dest, 300);
    // Half pipelined in one batch, half one by one.
    for r in publisher.publish_batch(&messages[..150]).await {
        r.map_err(fail("batch publish"))?;
    }
    publish_all(publisher.as_ref(), &messages[150..]).await?;
    let ids = ids(&messages);
    let collector = Collector::acking();
    consume_until(&f, Subscription::new(&dest, &groups[0]), &collector, |c| {
        c.ledger().lost(&ids) == 0
    })
    .await?;
    let observed = exactly_once(&collector, &ids, "confirmed messages")?;
    let intact = collector.deliveries().iter().all(|d| {
        d.message.payload().as_ref() == format!("message {}", header(d, "seq")).as_bytes()
    });
    ensure!(intact, "a payload or header arrived changed");
    Ok(observed)
}

pub(super) async fn batch_reports_each_message(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "batch", &["g"]).await?;
    let publisher = publisher(&f).await?;
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
    let good: Vec<Message> = batch
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 6)
        .map(|(_, m)| m.clone())
        .collect();
    let good = ids(&good);
    let collector = Collector::acking();
    consume_until(&f, Subscription::new(&dest, &groups[0]), &collector, |c| {
        c.ledger().lost(&good) == 0
    })
    .await?;
    ensure!(
        collector.of(batch[6].id()).is_empty(),
        "the invalid message was delivered"
    );
    exactly_once(&collector, &good, "good messages of the batch")
}

pub(super) async fn unroutable_is_an_error(f: Fixture) -> CaseResult {
    let publisher = publisher(&f).await?;
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

pub(super) async fn invalid_message_is_rejected(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "invalid", &["g"]).await?;
    let publisher = publisher(&f).await?;
    let limit = f
        .broker
        .capabilities()
        .max_message_size
        .ok_or("the adapter declares no message size limit")?;
    let bad = [
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
    // Nothing is expected: watch for the quiet period only.
    let handle = start(&f, Subscription::new(&dest, &groups[0]), &collector).await?;
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

pub(super) async fn duplicate_detectable_by_id(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "dup", &["g"]).await?;
    let publisher = publisher(&f).await?;
    let message = Message::new(&dest, "same").with_key("k");
    // A producer retry after a lost confirm looks exactly like this.
    publish_all(publisher.as_ref(), &[message.clone(), message.clone()]).await?;
    let id = message.id().clone();
    let collector = Collector::acking();
    consume_until(&f, Subscription::new(&dest, &groups[0]), &collector, |c| {
        c.of(&id).len() >= 2
    })
    .await?;
    let copies = collector.of(&id);
    ensure!(
        copies.len() == 2,
        "expected two deliveries of the re-published message, got {}",
        copies.len()
    );
    let intact = copies
        .iter()
        .all(|d| d.message.payload() == message.payload() && d.message.key() == Some("k"));
    ensure!(intact, "a copy arrived changed");
    Ok(Observed {
        messages: 2,
        lost: 0,
        duplicated: 1,
    })
}

pub(super) async fn oneway_publish(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "oneway", &["g"]).await?;
    let publisher = publisher(&f).await?;
    let messages = numbered(&dest, 20);
    for m in &messages {
        publisher
            .publish_oneway(m)
            .await
            .map_err(fail("oneway publish"))?;
    }
    let ids = ids(&messages);
    let collector = Collector::acking();
    consume_until(&f, Subscription::new(&dest, &groups[0]), &collector, |c| {
        c.ledger().lost(&ids) == 0
    })
    .await?;
    // Oneway is at-most-once by contract; on a healthy broker nothing should go missing.
    exactly_once(&collector, &ids, "oneway messages")
}
