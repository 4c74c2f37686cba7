//! Send with confirm: `publish` returns only after the broker took responsibility, and
//! an error says whether sending again can help.
//!
//! 1. One message, confirmed: the receipt names where the broker put it.
//! 2. A pipelined batch: one result per message, confirms in flight together.
//! 3. A destination nobody declared: an `Unroutable` error, not a silent loss.
//! 4. A retry loop that resends the *same* message (same id) on retryable errors, so a
//!    consumer can drop the duplicate a lost confirm may cause.
//! 5. A consumer receives every confirmed message.
//!
//! Run: `cargo run --example send_confirm [-- --broker <url>]` (default: the in-memory
//! broker; `amqp://…`, `kafka://…`, `rocketmq://…` as in `surety::connect`).

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::RunIds;
use surety::{
    Delivery, ErrorKind, Message, Outcome, Publisher, Receipt, Subscription, Topology, handler_fn,
};

const ORDERS: &str = "surety-demo-confirm";
const GROUP: &str = "surety-demo-confirm-reader";

/// Publishes `message` until the broker confirms it or the error is not worth retrying.
/// The message (and so its id) is the same on every attempt.
async fn publish_with_retry(
    publisher: &dyn Publisher,
    message: &Message,
) -> surety::Result<Receipt> {
    let mut attempt = 1;
    loop {
        match publisher.publish(message).await {
            Ok(receipt) => return Ok(receipt),
            Err(e) if e.is_retryable() && attempt < 5 => {
                // OutcomeUnknown: the broker may hold it already; the id absorbs a duplicate.
                println!("attempt {attempt} failed ({}), retrying", e.kind().as_str());
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let broker = surety::connect(&support::broker_url()).await?;
    println!("broker: {}", broker.name());
    broker.declare(&Topology::new(ORDERS).group(GROUP)).await?;

    // The consumer, started first so a real broker's group sees everything.
    let run = RunIds::default();
    let received = Arc::new(AtomicUsize::new(0));
    let (ids, count) = (run.clone(), received.clone());
    let reader = broker
        .subscriber()
        .await?
        .subscribe(
            Subscription::new(ORDERS, GROUP),
            Arc::new(handler_fn(move |d: Delivery| {
                let (ids, count) = (ids.clone(), count.clone());
                async move {
                    if ids.contains(d.message.id()) {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok::<_, surety::HandlerError>(Outcome::Ack)
                }
            })),
        )
        .await?;
    let publisher = broker.publisher().await?;

    // 1. One confirmed message.
    let first = Message::new(ORDERS, "order 1").with_key("customer-7");
    run.add(first.id());
    let receipt = publish_with_retry(publisher.as_ref(), &first).await?;
    println!(
        "confirmed {} on {} at {}",
        receipt.message_id,
        receipt.destination,
        receipt
            .position
            .as_deref()
            .unwrap_or("(position not reported)")
    );

    // 2. A batch: the confirms are awaited together, each result stands alone.
    let batch: Vec<Message> = (2..=50)
        .map(|i| Message::new(ORDERS, format!("order {i}")))
        .collect();
    batch.iter().for_each(|m| run.add(m.id()));
    let results = publisher.publish_batch(&batch).await;
    let confirmed = results.iter().filter(|r| r.is_ok()).count();
    println!("batch: {confirmed} of {} confirmed", batch.len());
    for (message, result) in batch.iter().zip(&results) {
        if let Err(e) = result {
            // A real application resends the failed ones (same messages, same ids).
            println!("{} failed: {e}", message.id());
        }
    }

    // 3. Nobody declared this destination: the broker cannot route it.
    let stray = Message::new("surety-demo-nobody-declared-this", "lost?");
    match publisher.publish(&stray).await {
        Err(e) if e.kind() == ErrorKind::Unroutable => println!(
            "undeclared destination: {} (retryable: {})",
            e.kind().as_str(),
            e.is_retryable()
        ),
        other => println!("undeclared destination: unexpected {other:?}"),
    }

    // 5. Everything confirmed arrives.
    let expected = 1 + confirmed;
    let all = support::wait_until(|| received.load(Ordering::SeqCst) >= expected).await;
    reader.shutdown().await;
    let got = received.load(Ordering::SeqCst);
    println!("consumer received {got} of {expected} confirmed messages");
    if all {
        println!("ok: every confirmed message was delivered");
        Ok(())
    } else {
        Err(format!("only {got} of {expected} confirmed messages arrived").into())
    }
}
