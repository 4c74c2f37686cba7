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
    let mut slowest_batch = Duration::ZERO;
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
        let sent_at = Instant::now();
        let results = publisher.publish_batch(&batch).await;
        slowest_batch = slowest_batch.max(sent_at.elapsed());
        for (m, r) in batch.iter().zip(results) {
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
    let send_phase = started.elapsed();
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
    // After a restart the group coordinator may need a while to load its state on a busy
    // machine: the wait is generous, it ends as soon as everything is seen.
    let reading_from = Instant::now();
    let deadline = reading_from + Duration::from_secs(150);
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
    let read_phase = reading_from.elapsed();
    let seen_count = seen.lock().unwrap().len();
    handle.shutdown().await;
    eprintln!(
        "restart test: {} confirmed, {failed} failed (retryable), {missing} confirmed missing; \
         {seen_count} read in {read_phase:.1?}; sending took {send_phase:.1?} \
         (slowest batch {slowest_batch:.1?})",
        confirmed.len()
    );
    if missing > 0 {
        // Tell a slow reader from a real loss: how many records does the log hold?
        eprintln!(
            "restart test: the topic holds {} records for {} confirmed",
            records_in(&topic),
            confirmed.len()
        );
    }
    assert_eq!(
        missing, 0,
        "{missing} confirmed messages were not read back after the restart"
    );
}

/// Records in `topic` (sum over partitions of high minus low watermark), read with the raw
/// client so the count does not depend on the adapter under test.
fn records_in(topic: &str) -> String {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = match ClientConfig::new()
        .set(
            "bootstrap.servers",
            &KafkaConfig::from_env().bootstrap_servers,
        )
        .create()
    {
        Ok(c) => c,
        Err(e) => return format!("unknown ({e})"),
    };
    let timeout = Duration::from_secs(10);
    let partitions = match consumer.fetch_metadata(Some(topic), timeout) {
        Ok(m) => m.topics().first().map_or(0, |t| t.partitions().len()),
        Err(e) => return format!("unknown ({e})"),
    };
    let mut total = 0i64;
    for p in 0..partitions as i32 {
        match consumer.fetch_watermarks(topic, p, timeout) {
            Ok((low, high)) => total += high - low,
            Err(e) => return format!("unknown ({e})"),
        }
    }
    total.to_string()
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
