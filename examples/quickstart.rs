//! Quickstart: a transactional producer with check-back and an ack-after-process consumer,
//! on the in-memory broker. Runs with no server:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! The "orders database" is a map standing in for the producer's own database; the
//! check-back answers from it, as a real service answers from its tables.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety::memory::{MemoryBroker, MemoryConfig};
use surety::{
    Broker, Delivery, Message, Outcome, RetryPolicy, Subscription, Topology, TxState,
    check_back_fn, handler_fn,
};

#[tokio::main]
async fn main() -> surety::Result<()> {
    let broker = MemoryBroker::with_config(MemoryConfig {
        // Ask the check-back quickly so the demo finishes in a second or two.
        transaction_timeout: Duration::from_millis(300),
        check_interval: Duration::from_millis(100),
        ..MemoryConfig::default()
    });
    broker
        .declare(&Topology::new("orders").group("cart-service"))
        .await?;

    // The producer's database: order id -> committed?
    let orders_db: Arc<Mutex<HashMap<String, bool>>> = Arc::default();

    // The check-back: "did the local transaction that sent this message commit?"
    let db = orders_db.clone();
    let check_back = check_back_fn(move |message: Message| {
        let db = db.clone();
        async move {
            let order = message.header("order-id").unwrap_or_default().to_owned();
            let state = match db.lock().unwrap().get(&order) {
                Some(true) => TxState::Commit,
                Some(false) | None => TxState::Rollback,
            };
            println!("[producer] check-back asked about {order}: {state:?}");
            state
        }
    });
    let producer = broker
        .transactional_publisher("order-service", Arc::new(check_back))
        .await?;

    // The consumer: the cart service fails on its first try of order-1 and succeeds when
    // the broker delivers it again. It acks only after its work is done.
    let handled = Arc::new(AtomicUsize::new(0));
    let seen = handled.clone();
    let cart = handler_fn(move |delivery: Delivery| {
        let seen = seen.clone();
        async move {
            let order = delivery
                .message
                .header("order-id")
                .unwrap_or_default()
                .to_owned();
            if order == "order-1" && delivery.attempt == 1 {
                println!("[cart] {order}: attempt 1 failed (database busy), will be redelivered");
                return Err("database busy".into());
            }
            println!(
                "[cart] {order}: cart cleared on attempt {}",
                delivery.attempt
            );
            seen.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome::Ack)
        }
    });
    let subscription = Subscription::new("orders", "cart-service").retry(
        RetryPolicy::with_max_attempts(5)
            .backoff(Duration::from_millis(200), Duration::from_secs(2)),
    );
    let consumer = broker
        .subscriber()
        .await?
        .subscribe(subscription, Arc::new(cart))
        .await?;

    // order-1: the local transaction commits, so the message is delivered.
    // order-2: the local transaction rolls back, so the message is never delivered.
    // order-3: the process "crashes" after committing but before reporting: the broker
    //          asks the check-back, which finds the committed order and delivers it.
    for (order, local) in [
        ("order-1", TxState::Commit),
        ("order-2", TxState::Rollback),
        ("order-3", TxState::Unknown),
    ] {
        let message =
            Message::new("orders", format!("{order} placed")).with_header("order-id", order);
        let db = orders_db.clone();
        let outcome = producer
            .send_in_transaction(
                &message,
                Box::pin(async move {
                    // The business change, in the producer's own database.
                    let committed = local != TxState::Rollback;
                    db.lock().unwrap().insert(order.to_owned(), committed);
                    local
                }),
            )
            .await?;
        println!(
            "[producer] {order}: local transaction said {local:?}; send_in_transaction -> {outcome:?}"
        );
    }

    // Wait for order-1 (after its retry) and order-3 (after the check-back).
    for _ in 0..100 {
        if handled.load(Ordering::SeqCst) >= 2 && broker.prepared_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    consumer.shutdown().await;

    println!(
        "[summary] carts cleared: {} (order-1 after one redelivery, order-3 via check-back); order-2 never delivered; half messages still prepared: {}",
        handled.load(Ordering::SeqCst),
        broker.prepared_count()
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        2,
        "exactly order-1 and order-3"
    );
    Ok(())
}
