//! Restarts the RocketMQ broker (`scripts/brokers restart rocketmq`) while confirmed sends
//! run, then checks that every confirmed message can be consumed. Own test binary, one
//! test: a restart affects everything on the broker.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_core::{Broker, Message, MessageId, Outcome, Subscription, Topology, handler_fn};
use surety_rocketmq::{RocketMqBroker, RocketMqConfig};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/brokers")
}

fn suffix() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_during_confirmed_sends_loses_no_confirmed_message() {
    let config = RocketMqConfig::from_env();
    let namesrv = config.namesrv.clone();
    let broker = RocketMqBroker::connect(config)
        .await
        .unwrap_or_else(|e| panic!("RocketMQ is not reachable at {namesrv}: {e}"));
    let topic = format!("surety-restart-{:08x}", suffix());
    let group = format!("surety-restart-g-{:08x}", suffix());
    broker
        .declare(&Topology::new(&topic).group(&group))
        .await
        .expect("declare");
    let publisher = broker.publisher().await.unwrap();

    let confirmed: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let failed = Arc::new(Mutex::new(0usize));
    let restarted = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Sender: confirmed sends until 200 were confirmed after the restart finished.
    let sender = {
        let (publisher, confirmed, failed, restarted, topic) = (
            publisher.clone(),
            confirmed.clone(),
            failed.clone(),
            restarted.clone(),
            topic.clone(),
        );
        tokio::spawn(async move {
            let mut after_restart = 0;
            let deadline = Instant::now() + Duration::from_secs(240);
            let mut i = 0u64;
            while after_restart < 200 && Instant::now() < deadline {
                i += 1;
                let m = Message::new(&topic, format!("m{i}")).with_key(format!("k{}", i % 7));
                match publisher.publish(&m).await {
                    Ok(_) => {
                        confirmed.lock().unwrap().push(m.id().clone());
                        if restarted.load(std::sync::atomic::Ordering::SeqCst) {
                            after_restart += 1;
                        }
                    }
                    Err(_) => {
                        *failed.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            after_restart
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = confirmed.lock().unwrap().len();
    assert!(before > 0, "no send was confirmed before the restart");
    let status = tokio::process::Command::new(script())
        .args(["restart", "rocketmq"])
        .status()
        .await
        .expect("run scripts/brokers restart rocketmq");
    assert!(
        status.success(),
        "scripts/brokers restart rocketmq failed: {status}"
    );
    restarted.store(true, std::sync::atomic::Ordering::SeqCst);
    let after_restart = sender.await.unwrap();
    assert!(
        after_restart >= 200,
        "the publisher did not recover after the restart ({after_restart} confirmed since)"
    );
    let ids: HashSet<MessageId> = confirmed.lock().unwrap().iter().cloned().collect();
    eprintln!(
        "restart: {} confirmed ({} before the restart), {} failed sends",
        ids.len(),
        before,
        failed.lock().unwrap()
    );

    let seen: Arc<Mutex<HashSet<MessageId>>> = Arc::default();
    let s = seen.clone();
    let handle = broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(
            Subscription::new(&topic, &group).concurrency(16),
            Arc::new(handler_fn(move |d: surety_core::Delivery| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().insert(d.message.id().clone());
                    Ok(Outcome::Ack)
                }
            })),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let missing = ids
            .iter()
            .filter(|id| !seen.lock().unwrap().contains(*id))
            .count();
        if missing == 0 {
            break;
        }
        if Instant::now() >= deadline {
            handle.shutdown().await;
            panic!(
                "{missing} of {} confirmed messages were lost across the restart",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    handle.shutdown().await;
}
