//! Kafka exactly-once read-process-write: a pricing service reads orders and writes
//! priced orders; the outputs and the consumed offsets commit in one Kafka transaction.
//!
//! Pricing order 7 fails on its first attempt and is retried in place; outputs and
//! offsets commit only in Kafka transactions, so nothing of the failed attempt is seen.
//! A read-committed reader of the priced orders sees each order priced exactly once.
//! (A crashed instance is recovered the same way: the next instance with the same
//! transactional id aborts its open transaction; `adapters/kafka/tests` kills one
//! mid-stream.)
//!
//! This needs a real Kafka (the mechanism is Kafka's):
//! `cargo run --example kafka_exactly_once [-- --broker kafka://127.0.0.1:9092]`
//! (default: `SURETY_KAFKA_BOOTSTRAP` or 127.0.0.1:9092).

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use support::RunIds;
use surety::kafka::{ExactlyOnce, KafkaBroker, KafkaConfig, processor_fn};
use surety::{Broker, Delivery, Message, MessageId, Outcome, Subscription, Topology, handler_fn};

const ORDERS: &str = "surety-demo-eos-orders";
const PRICED: &str = "surety-demo-eos-priced";
const PRICING: &str = "surety-demo-eos-pricing";
const READER: &str = "surety-demo-eos-reader";
const ORDER_COUNT: usize = 10;
/// Pricing this order fails on its first attempt.
const FAIL_ONCE: &str = "7";

/// Starts the pricing processor; `failed` records that order [`FAIL_ONCE`] failed once.
async fn start_pricing(
    kafka: &KafkaBroker,
    failed: Arc<AtomicBool>,
) -> surety::Result<surety::SubscriptionHandle> {
    let processor = processor_fn(move |d: Delivery| {
        let failed = failed.clone();
        async move {
            let n = d.message.header("n").unwrap_or_default().to_owned();
            if n == FAIL_ONCE && !failed.swap(true, Ordering::SeqCst) {
                return Err("price service timed out".into());
            }
            let priced = Message::new(PRICED, format!("order {n}: 42.00 EUR"))
                .with_header("order-id", d.message.id().as_str())
                .with_header("n", n);
            Ok(vec![priced])
        }
    });
    kafka
        .exactly_once(
            // A stable transactional id: a restarted instance fences a dead one.
            ExactlyOnce::new(ORDERS, PRICING)
                .transactional_id("surety-demo-eos-pricing-1")
                .max_batch(4),
            Arc::new(processor),
        )
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = support::arg("--broker").unwrap_or_else(|| {
        let bootstrap =
            std::env::var(surety::kafka::BOOTSTRAP_ENV).unwrap_or_else(|_| "127.0.0.1:9092".into());
        format!("kafka://{bootstrap}")
    });
    let kafka = KafkaBroker::connect(KafkaConfig::from_url(&url)?).await?;
    kafka.declare(&Topology::new(ORDERS).group(PRICING)).await?;
    kafka.declare(&Topology::new(PRICED).group(READER)).await?;

    // The reader of priced orders (read committed, like every Surety consumer).
    let run = RunIds::default();
    let priced: Arc<Mutex<HashMap<MessageId, usize>>> = Arc::default();
    let (ids, seen) = (run.clone(), priced.clone());
    let reader = kafka
        .subscriber()
        .await?
        .subscribe(
            Subscription::new(PRICED, READER),
            Arc::new(handler_fn(move |d: Delivery| {
                let (ids, seen) = (ids.clone(), seen.clone());
                async move {
                    let order = d.message.header("order-id").unwrap_or_default();
                    if let Ok(order) = MessageId::parse(order)
                        && ids.contains(&order)
                    {
                        *seen.lock().unwrap().entry(order).or_default() += 1;
                    }
                    Ok::<_, surety::HandlerError>(Outcome::Ack)
                }
            })),
        )
        .await?;

    let publisher = kafka.publisher().await?;
    for n in 1..=ORDER_COUNT {
        let order = Message::new(ORDERS, format!("order {n}")).with_header("n", n.to_string());
        run.add(order.id());
        publisher.publish(&order).await?;
    }
    println!("published {ORDER_COUNT} orders");

    let failed = Arc::new(AtomicBool::new(false));
    let pricing = start_pricing(&kafka, failed.clone()).await?;
    let all = support::wait_until(|| priced.lock().unwrap().len() >= ORDER_COUNT).await;
    // Keep reading a moment: a duplicate would show up now.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    pricing.shutdown().await;
    reader.shutdown().await;

    let counts = priced.lock().unwrap().clone();
    let twice = counts.values().filter(|&&c| c > 1).count();
    println!(
        "priced orders read: {} distinct of {ORDER_COUNT}, {twice} seen more than once",
        counts.len()
    );
    if all && counts.len() == ORDER_COUNT && twice == 0 && failed.load(Ordering::SeqCst) {
        println!("ok: every order priced exactly once despite a failed attempt");
        Ok(())
    } else {
        Err("some order was not priced exactly once".into())
    }
}
