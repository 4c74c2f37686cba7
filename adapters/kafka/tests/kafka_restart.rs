//! Restarts Kafka (`scripts/brokers restart kafka`) while confirmed sends run: every
//! confirmed message must be there afterwards. Its own test binary, one test, because a
//! restart disturbs everything on the broker.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_core::{
    Broker, Delivery, Message, MessageId, Outcome, Subscription, Topology, handler_fn,
};
use surety_kafka::{KafkaBroker, KafkaConfig};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/brokers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kafka_restart_during_confirmed_sends_loses_no_confirmed_message() {
    let script = script();
    assert!(
        script.exists(),
        "{} is needed to restart Kafka for this test",
        script.display()
    );
    let config = KafkaConfig::from_env();
    let broker = KafkaBroker::connect(config)
        .await
        .unwrap_or_else(|e| panic!("Kafka must be running (scripts/brokers up): {e}"));
    let topic = format!("surety-kafka-restart-{}", uuid_suffix());
    broker.declare(&Topology::new(&topic)).await.unwrap();
    let publisher = broker.publisher().await.unwrap();

    let restart = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(1));
        std::process::Command::new(&script)
            .args(["restart", "kafka"])
            .status()
    });

    let mut confirmed: Vec<MessageId> = Vec::new();
    let mut failed = 0usize;
    let mut i = 0u64;
    let started = Instant::now();
    // Keep sending until the restart is over and a few more seconds have passed.
    let mut restart_done_at: Option<Instant> = None;
    let mut restart = Some(restart);
    loop {
        if let Some(h) = restart.as_ref()
            && h.is_finished()
        {
            let status = restart.take().unwrap().await.unwrap();
            let status = status.expect("running scripts/brokers");
            assert!(
                status.success(),
                "scripts/brokers restart kafka failed: {status}"
            );
            restart_done_at = Some(Instant::now());
        }
        if restart_done_at.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the restart did not finish in time"
        );
        // Small pipelined batches, each awaited: a confirmed send loop.
        let batch: Vec<Message> = (0..5)
            .map(|j| Message::new(&topic, format!("{i}-{j}")).with_key(format!("k{}", j)))
            .collect();
        i += 1;
        for (m, r) in batch.iter().zip(publisher.publish_batch(&batch).await) {
            match r {
                Ok(_) => confirmed.push(m.id().clone()),
                Err(e) => {
                    assert!(e.is_retryable(), "a restart gave a permanent error: {e}");
                    failed += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        confirmed.len() > 20,
        "too few confirmed sends: {}",
        confirmed.len()
    );

    let seen: Arc<Mutex<HashSet<MessageId>>> = Arc::default();
    let s = seen.clone();
    let handle = broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(
            Subscription::new(&topic, format!("reader-{}", uuid_suffix())),
            Arc::new(handler_fn(move |d: Delivery| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().insert(d.message.id().clone());
                    Ok(Outcome::Ack)
                }
            })),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let missing = {
            let seen = seen.lock().unwrap();
            confirmed.iter().filter(|id| !seen.contains(*id)).count()
        };
        if missing == 0 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    handle.shutdown().await;
    eprintln!(
        "restart test: {} confirmed, {failed} failed (retryable), {missing} confirmed missing",
        confirmed.len()
    );
    assert_eq!(
        missing, 0,
        "{missing} confirmed messages were lost in the restart"
    );
}

fn uuid_suffix() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            & 0xffff_ffff
    )
}
