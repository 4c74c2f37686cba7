//! Restarts the real RabbitMQ (`scripts/brokers restart rabbitmq`) while messages are
//! published with confirms and consumed. Its own test binary, since a restart affects
//! everything on the broker; one test only, so nothing runs beside it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_core::{
    Broker, Delivery, Message, MessageId, Outcome, Subscription, Topology, handler_fn,
};
use surety_rabbitmq::{RabbitBroker, RabbitConfig};

fn restart_rabbitmq() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/brokers");
    let status = std::process::Command::new(&script)
        .args(["restart", "rabbitmq"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        status.success(),
        "scripts/brokers restart rabbitmq failed: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_a_broker_restart_and_clients_resume() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "surety_rabbitmq=info".into()),
        )
        .with_test_writer()
        .try_init();
    let config = RabbitConfig::from_env().expect("SURETY_RABBITMQ_URL");
    let url = config.redacted_url();
    let broker = RabbitBroker::connect(config)
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ at {url} must be running for this test: {e}"));
    let dest = format!("surety-test-restart-{:08x}", rand::random::<u32>());
    broker
        .declare(&Topology::new(&dest).group("g"))
        .await
        .unwrap();

    let consumed: Arc<Mutex<HashSet<MessageId>>> = Arc::default();
    let c = consumed.clone();
    let handler = handler_fn(move |d: Delivery| {
        let c = c.clone();
        async move {
            c.lock().unwrap().insert(d.message.id().clone());
            Ok(Outcome::Ack)
        }
    });
    let subscription = broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(
            Subscription::new(&dest, "g").concurrency(16),
            Arc::new(handler),
        )
        .await
        .unwrap();

    // One publisher object for the whole test. A failed publish is retried with the
    // same message (same id) until confirmed; the failures are counted.
    let publisher = broker.publisher().await.unwrap();
    const TOTAL: usize = 600;
    let confirmed: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let (conf, fails, p, d) = (
        confirmed.clone(),
        failures.clone(),
        publisher.clone(),
        dest.clone(),
    );
    let producing = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(180);
        for i in 0..TOTAL {
            let message = Message::new(&d, format!("order {i}"));
            loop {
                match p.publish(&message).await {
                    Ok(_) => {
                        conf.lock().unwrap().push(message.id().clone());
                        break;
                    }
                    Err(e) => {
                        assert!(e.is_retryable(), "a publish failed for good: {e}");
                        assert!(
                            Instant::now() < deadline,
                            "the publisher never came back: {e}"
                        );
                        fails.lock().unwrap().push(e.kind().to_string());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    // Restart once a good part is through, while publishing and consuming go on.
    while confirmed.lock().unwrap().len() < 150 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_restart = confirmed.lock().unwrap().len();
    tokio::task::spawn_blocking(restart_rabbitmq).await.unwrap();
    let after_restart = confirmed.lock().unwrap().len();
    producing.await.expect("producer");
    let confirmed = confirmed.lock().unwrap().clone();
    assert_eq!(confirmed.len(), TOTAL);

    let deadline = Instant::now() + Duration::from_secs(120);
    let lost = loop {
        let seen = consumed.lock().unwrap().clone();
        let lost: Vec<_> = confirmed.iter().filter(|id| !seen.contains(*id)).collect();
        if lost.is_empty() || Instant::now() > deadline {
            break lost.len();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    subscription.shutdown().await;
    let failures = failures.lock().unwrap().clone();
    eprintln!(
        "restart: {TOTAL} confirmed ({before_restart} before the restart began, {after_restart} when it returned), \
         {} failed publishes retried ({:?}), {lost} lost",
        failures.len(),
        failures.iter().fold(
            std::collections::BTreeMap::<&str, usize>::new(),
            |mut m, k| {
                *m.entry(k.as_str()).or_default() += 1;
                m
            }
        )
    );
    assert_eq!(
        lost, 0,
        "{lost} confirmed messages were never consumed after the restart"
    );
    assert!(
        !failures.is_empty(),
        "no publish failed: the restart did not interrupt anything, so the test proved nothing"
    );
    // The same publisher object works after the restart.
    publisher
        .publish(&Message::new(&dest, "after"))
        .await
        .expect("the publisher works again after the restart");
}
