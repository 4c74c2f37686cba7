//! Scenario 6: poison messages mixed into a stream.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use surety_core::{Delivery, Message, MessageId, Outcome, Subscription};

use super::{FaultRow, declare, fail, fast_retry, publish_confirmed, stop, subscribe};
use crate::Fixture;
use crate::support::{Collector, unique_name, wait_until};

/// Publishes `n` messages of which every `every`-th is poison (alternately rejected by
/// the handler and failing until its attempts are used up). Poison messages must reach
/// the dead-letter destination; every other one must be applied; none lost.
pub async fn poison_stream(
    broker: &str,
    f: &Fixture,
    n: usize,
    every: usize,
) -> Result<FaultRow, String> {
    let mut row = FaultRow::new("poison-messages-in-a-stream", broker);
    row.messages = n;
    let (dest, group) = declare(f, "fault-poison").await?;
    let messages: Vec<Message> = (0..n)
        .map(|i| {
            let kind = if i % every == every - 1 {
                if (i / every).is_multiple_of(2) {
                    "reject"
                } else {
                    "fail"
                }
            } else {
                "good"
            };
            Message::new(&dest, format!("poison stream {i}")).with_header("kind", kind)
        })
        .collect();
    let kind = |m: &Message| m.header("kind").unwrap_or_default().to_owned();
    let good: Vec<MessageId> = messages
        .iter()
        .filter(|m| kind(m) == "good")
        .map(|m| m.id().clone())
        .collect();
    let poison: Vec<MessageId> = messages
        .iter()
        .filter(|m| kind(m) != "good")
        .map(|m| m.id().clone())
        .collect();

    let applied = Collector::with(|d: &Delivery| match d.message.header("kind") {
        Some("reject") => Ok(Outcome::reject("poison: the order is invalid")),
        Some("fail") => Err("poison: cannot parse the order".into()),
        _ => Ok(Outcome::Ack),
    });
    let dead = Collector::acking();
    let handles = vec![
        subscribe(
            f,
            Subscription::new(&dest, &group)
                .retry(fast_retry(3))
                .concurrency(8),
            Arc::new(applied.clone()),
        )
        .await?,
        subscribe(
            f,
            Subscription::new(
                f.broker.dead_letter_destination(&dest, &group),
                unique_name("dlq-reader"),
            ),
            Arc::new(dead.clone()),
        )
        .await?,
    ];
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    let (confirmed, problems) = publish_confirmed(
        publisher.as_ref(),
        &messages,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    row.failures = problems;
    let confirmed: HashSet<MessageId> = confirmed.into_iter().collect();
    let good: Vec<MessageId> = good
        .into_iter()
        .filter(|id| confirmed.contains(id))
        .collect();
    let poison: Vec<MessageId> = poison
        .into_iter()
        .filter(|id| confirmed.contains(id))
        .collect();

    wait_until(f.delivery_timeout, || {
        applied.ledger().lost(&good) == 0 && dead.ledger().lost(&poison) == 0
    })
    .await;
    tokio::time::sleep(f.quiet_period).await;
    for h in handles {
        if let Err(why) = stop(h).await {
            row.failures.push(why);
        }
    }
    let applied = applied.ledger();
    let dead = dead.ledger();
    row.lost = applied.lost(&good) + dead.lost(&poison);
    row.dead_lettered = poison.len() - dead.lost(&poison);
    row.delivered_twice = applied.duplicated_among(&good) + dead.duplicated_among(&poison);
    let good_dead = good.iter().filter(|id| dead.count(id) > 0).count();
    if good_dead > 0 {
        row.failures
            .push(format!("{good_dead} good messages were dead-lettered"));
    }
    row.note = format!("{} poison of {n}", poison.len());
    Ok(row)
}
