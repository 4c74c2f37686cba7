//! Consumer retries and dead letters: ack after process, bounded redelivery, and a
//! dead-letter destination that says why a message was given up.
//!
//! Four messages go to a billing consumer allowed 3 attempts:
//! - `good` is acked on its first delivery;
//! - `flaky` fails twice (a "database busy" error) and succeeds on the third delivery;
//! - `poison` fails every time and is dead-lettered after the third attempt;
//! - `invalid` is rejected at once (`Outcome::Reject`): a business error no retry fixes.
//!
//! A second consumer reads the dead-letter destination and prints each dead letter's
//! reason and attempt count.
//!
//! Run: `cargo run --example retries_dead_letters [-- --broker <url>]` (default: the
//! in-memory broker).

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::RunIds;
use surety::headers;
use surety::{Delivery, Message, Outcome, RetryPolicy, Subscription, Topology, handler_fn};

const INVOICES: &str = "surety-demo-invoices";
const BILLING: &str = "surety-demo-billing";
const DLQ_READER: &str = "surety-demo-billing-dlq-reader";

type Log = Arc<Mutex<HashMap<String, Vec<String>>>>;

fn note(log: &Log, kind: &str, what: String) {
    println!("[{kind}] {what}");
    log.lock()
        .unwrap()
        .entry(kind.into())
        .or_default()
        .push(what);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let broker = surety::connect(&support::broker_url()).await?;
    println!("broker: {}", broker.name());
    // Declares the destination, the group's queue/cursor and its dead-letter destination.
    broker
        .declare(&Topology::new(INVOICES).group(BILLING))
        .await?;
    let dead_letters = broker.dead_letter_destination(INVOICES, BILLING);
    println!("dead letters of {BILLING} go to {dead_letters}");

    let run = RunIds::default();
    let log: Log = Arc::default();

    // The billing consumer.
    let (ids, seen) = (run.clone(), log.clone());
    let billing = handler_fn(move |d: Delivery| {
        let (ids, seen) = (ids.clone(), seen.clone());
        async move {
            if !ids.contains(d.message.id()) {
                return Ok(Outcome::Ack); // left over from an earlier run
            }
            let kind = d.message.header("kind").unwrap_or_default().to_owned();
            match (kind.as_str(), d.attempt) {
                ("flaky", 1 | 2) => {
                    println!("[billing] flaky: attempt {} failed", d.attempt);
                    Err("database busy".into())
                }
                ("poison", n) => {
                    println!("[billing] poison: attempt {n} failed");
                    Err("cannot parse the invoice".into())
                }
                ("invalid", _) => Ok(Outcome::Reject {
                    reason: "invoice total is negative".into(),
                }),
                (_, n) => {
                    note(&seen, "billed", format!("{kind} on attempt {n}"));
                    Ok::<_, surety::HandlerError>(Outcome::Ack)
                }
            }
        }
    });
    let policy = RetryPolicy::with_max_attempts(3)
        .backoff(Duration::from_millis(200), Duration::from_secs(1));
    let consumer = broker
        .subscriber()
        .await?
        .subscribe(
            Subscription::new(INVOICES, BILLING).retry(policy),
            Arc::new(billing),
        )
        .await?;

    // The dead-letter reader: an ordinary consumer of the dead-letter destination.
    let (ids, seen) = (run.clone(), log.clone());
    let reader = broker
        .subscriber()
        .await?
        .subscribe(
            Subscription::new(&dead_letters, DLQ_READER),
            Arc::new(handler_fn(move |d: Delivery| {
                let (ids, seen) = (ids.clone(), seen.clone());
                async move {
                    if ids.contains(d.message.id()) {
                        let m = &d.message;
                        note(
                            &seen,
                            "dead",
                            format!(
                                "{}: reason {:?}, attempts {}, from {}",
                                m.header("kind").unwrap_or_default(),
                                m.header(headers::DEAD_LETTER_REASON).unwrap_or_default(),
                                m.header(headers::DEAD_LETTER_ATTEMPTS).unwrap_or_default(),
                                m.header(headers::ORIGINAL_DESTINATION).unwrap_or_default(),
                            ),
                        );
                    }
                    Ok::<_, surety::HandlerError>(Outcome::Ack)
                }
            })),
        )
        .await?;

    let publisher = broker.publisher().await?;
    for kind in ["good", "flaky", "poison", "invalid"] {
        let message = Message::new(INVOICES, format!("{kind} invoice")).with_header("kind", kind);
        run.add(message.id());
        publisher.publish(&message).await?;
    }

    let count = |kind: &str| log.lock().unwrap().get(kind).map_or(0, Vec::len);
    let settled = support::wait_until(|| count("billed") >= 2 && count("dead") >= 2).await;
    // A little longer, to show nothing else arrives (no third dead letter, no rebill).
    tokio::time::sleep(Duration::from_millis(500)).await;
    consumer.shutdown().await;
    reader.shutdown().await;

    let (billed, dead) = (count("billed"), count("dead"));
    println!("[summary] billed {billed} (good, flaky), dead-lettered {dead} (poison, invalid)");
    if settled && billed == 2 && dead == 2 {
        println!("ok: retried the flaky one, dead-lettered the poison and the invalid one");
        Ok(())
    } else {
        Err(format!("unexpected: billed {billed}, dead-lettered {dead}").into())
    }
}
