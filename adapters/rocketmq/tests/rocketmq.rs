//! Adapter-specific behaviour against the real RocketMQ (name server from
//! `SURETY_ROCKETMQ_NAMESRV`, default 127.0.0.1:9876). The shared behaviour is in the
//! conformance suite (`SURETY_ADAPTERS=rocketmq cargo test -p surety-conformance`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety_core::{
    Broker, ErrorKind, Message, MessageId, Outcome, Subscription, SubscriptionHandle, Topology,
    TxState, check_back_fn, handler_fn,
};
use surety_rocketmq::{RocketMqBroker, RocketMqConfig};

fn name(what: &str) -> String {
    format!("surety-rmq-{what}-{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now()) as u32
}

async fn broker() -> RocketMqBroker {
    let config = RocketMqConfig::from_env();
    let namesrv = config.namesrv.clone();
    match RocketMqBroker::connect(config).await {
        Ok(b) => b,
        Err(e) => {
            panic!("RocketMQ is not reachable at {namesrv} (start it with scripts/brokers up): {e}")
        }
    }
}

/// Subscribes `group` to `topic` with a handler that acks and keeps every message.
async fn collect(
    broker: &RocketMqBroker,
    topic: &str,
    group: &str,
) -> (SubscriptionHandle, Arc<Mutex<Vec<Message>>>) {
    let seen: Arc<Mutex<Vec<Message>>> = Arc::default();
    let s = seen.clone();
    let handle = broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(
            Subscription::new(topic, group),
            Arc::new(handler_fn(move |d: surety_core::Delivery| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().push(d.message);
                    Ok(Outcome::Ack)
                }
            })),
        )
        .await
        .unwrap();
    (handle, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undeclared_topic_is_unroutable_and_not_auto_created() {
    let broker = broker().await;
    let publisher = broker.publisher().await.unwrap();
    let topic = name("undeclared");
    for _ in 0..2 {
        // Twice: the first attempt must not have created the topic on the way.
        let e = publisher
            .publish(&Message::new(&topic, "x"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
        assert!(!e.is_retryable());
    }
    let e = publisher
        .publish_oneway(&Message::new(&topic, "x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topic_names_with_dots_are_invalid() {
    let broker = broker().await;
    let publisher = broker.publisher().await.unwrap();
    let e = publisher
        .publish(&Message::new("orders.v1", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{e}");
    let e = publisher
        .publish(&Message::new(name("t"), "x").with_header("KEYS", "reserved"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callback_mode_reports_the_confirm_and_the_message_arrives() {
    let broker = broker().await;
    let topic = name("callback");
    let group = name("g");
    broker
        .declare(&Topology::new(&topic).group(&group))
        .await
        .unwrap();
    let message = Message::new(&topic, "async")
        .with_key("k")
        .with_header("h", "v");
    let (tx, rx) = tokio::sync::oneshot::channel();
    broker
        .rocketmq_publisher()
        .publish_with_callback(&message, move |r| {
            let _ = tx.send(r);
        })
        .await
        .unwrap();
    let receipt = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("callback within 10 s")
        .expect("callback called")
        .expect("confirmed");
    assert_eq!(&receipt.message_id, message.id());

    let (handle, seen) = collect(&broker, &topic, &group).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    handle.shutdown().await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "expected the message once");
    let got = &seen[0];
    assert_eq!(got.id(), message.id());
    assert_eq!(got.key(), Some("k"));
    assert_eq!(got.header("h"), Some("v"));
    assert_eq!(got.payload(), message.payload());
    assert_eq!(got.destination(), topic);
    // Bookkeeping properties are not shown as headers; RocketMQ's own neither.
    assert!(
        got.headers().keys().all(|k| k == "h"),
        "{:?}",
        got.headers()
    );
}

/// What the child producer process needs: `topic;producer group;message id`.
const CHILD_ENV: &str = "SURETY_RMQ_CHILD_PRODUCER";
/// The child's line announcing that the broker holds its half message.
const HALF_STORED: &str = "SURETY-HALF-STORED ";

/// Run only as a child of `check_back_after_the_producer_process_is_killed`: sends one
/// half message whose local transaction never ends, says so on stdout, and waits to be
/// killed. One child per half message: two producer processes of the group die.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "child process of check_back_after_the_producer_process_is_killed"]
async fn child_producer_hangs_after_half_message() {
    let spec = std::env::var(CHILD_ENV).expect("started by the parent test");
    let parts: Vec<&str> = spec.split(';').collect();
    let [topic, group, id] = parts[..] else {
        panic!("bad {CHILD_ENV}: {spec}");
    };
    let broker = broker().await;
    // This producer knows nothing: its check-back answers Unknown.
    let producer = broker
        .transactional_publisher(
            group,
            Arc::new(check_back_fn(|_| async { TxState::Unknown })),
        )
        .await
        .unwrap();
    let message = Message::new(topic, format!("half {id}")).with_id(MessageId::parse(id).unwrap());
    let announce = id.to_owned();
    let local = Box::pin(async move {
        // Runs only once the broker stored the half message.
        println!("{HALF_STORED}{announce}");
        futures::future::pending::<TxState>().await
    });
    // Never returns on its own: the parent kills this process.
    let result = producer.send_in_transaction(&message, local).await;
    eprintln!("child: send_in_transaction returned {result:?}");
}

fn spawn_child_producer(spec: String) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_producer_hangs_after_half_message",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, spec)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start a child producer")
}

/// Issue 6: the producer *process* dies (SIGKILL, no clean shutdown) after the broker
/// stored its half messages; a new producer of the same group answers the check-back:
/// commit → delivered, rollback → never delivered. The conformance case
/// `check_back_after_producer_dies` drops the producer in-process (a clean shutdown that
/// unregisters it); this one kills the process, so the broker only sees the connection
/// drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_back_after_the_producer_process_is_killed() {
    let broker = broker().await;
    let topic = name("orphan");
    let group = name("g");
    let producer_group = name("producer");
    broker
        .declare(&Topology::new(&topic).group(&group))
        .await
        .unwrap();
    let commit_id = Message::new(&topic, "").id().clone();
    let rollback_id = Message::new(&topic, "").id().clone();

    let mut children: Vec<std::process::Child> = [&commit_id, &rollback_id]
        .iter()
        .map(|id| spawn_child_producer(format!("{topic};{producer_group};{id}")))
        .collect();
    let (stored_tx, mut stored_rx) = tokio::sync::mpsc::unbounded_channel();
    for child in &mut children {
        let stdout = child.stdout.take().unwrap();
        let stored_tx = stored_tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
            {
                // Not a prefix: libtest's "test <name> ... " may start the same line.
                if let Some(at) = line.find(HALF_STORED) {
                    let _ = stored_tx.send(line[at + HALF_STORED.len()..].trim().to_owned());
                }
            }
        });
    }
    let mut stored = Vec::new();
    while stored.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(60), stored_rx.recv()).await {
            Ok(Some(id)) => stored.push(id),
            _ => {
                for child in &mut children {
                    let _ = child.kill();
                }
                panic!("the child producers did not store both half messages ({stored:?})");
            }
        }
    }
    // SIGKILL: no shutdown, no unregistering; the broker only sees the connections drop.
    for child in &mut children {
        child.kill().expect("kill a child producer");
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child was killed, not finished");
    }

    let asked: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let (a, c, r) = (asked.clone(), commit_id.clone(), rollback_id.clone());
    let _second = broker
        .transactional_publisher(
            &producer_group,
            Arc::new(check_back_fn(move |m: Message| {
                a.lock().unwrap().push(m.id().clone());
                let state = if *m.id() == c {
                    TxState::Commit
                } else if *m.id() == r {
                    TxState::Rollback
                } else {
                    TxState::Unknown
                };
                async move { state }
            })),
        )
        .await
        .unwrap();

    let (handle, seen) = collect(&broker, &topic, &group).await;
    let ids = |seen: &Mutex<Vec<Message>>| -> Vec<MessageId> {
        seen.lock()
            .unwrap()
            .iter()
            .map(|m| m.id().clone())
            .collect()
    };
    // Safety net only: the broker checks every 3 s (transactionCheckInterval).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let resolved =
        || ids(&seen).contains(&commit_id) && asked.lock().unwrap().contains(&rollback_id);
    while !resolved() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Watch a little longer for a delivery of the rolled-back message.
    tokio::time::sleep(Duration::from_secs(3)).await;
    handle.shutdown().await;
    let seen = ids(&seen);
    let asked = asked.lock().unwrap().clone();
    assert!(
        seen.contains(&commit_id),
        "the committed orphan was not delivered (asked: {asked:?})"
    );
    assert!(
        asked.contains(&rollback_id),
        "the new producer was never asked about the rolled-back orphan"
    );
    assert!(
        !seen.contains(&rollback_id),
        "the orphan whose check-back said rollback was delivered"
    );
    // At least once, not exactly once: the broker may check a half message again before
    // it sees the first answer, and commits once per commit answer (docs/rocketmq-interop.md).
    // Never more copies than commit answers; the id lets the consumer drop a copy.
    let copies = seen.iter().filter(|id| **id == commit_id).count();
    let asks = asked.iter().filter(|id| **id == commit_id).count();
    assert!(
        copies <= asks,
        "the committed orphan was delivered {copies} times after {asks} check-backs"
    );
}

/// The dead-letter topic Surety declares is readable on every queue: `surety dlq` pulls
/// from it to list and re-drive.
#[tokio::test]
async fn the_declared_dead_letter_topic_is_readable() {
    let broker = broker().await;
    let (topic, group) = (name("dlqperm"), name("g"));
    broker
        .declare(&Topology::new(&topic).group(&group))
        .await
        .unwrap();
    let dlq_topic = broker.dead_letter_destination(&topic, &group);
    let perms = broker.topic_permissions(&dlq_topic).await.unwrap();
    assert!(
        perms
            .as_ref()
            .is_some_and(|p| !p.is_empty() && p.iter().all(|p| p & 4 != 0)),
        "{dlq_topic}: permissions {perms:?}, want readable (4) on every queue"
    );
}

/// Messages from a producer that is not Surety: one with no Surety properties and one
/// whose `surety-message-id` is not a valid id both reach the handler under the broker's
/// own id of the message (`UNIQ_KEY`); the consumer goes on to the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_envelopes_from_a_foreign_producer_never_stop_the_consumer() {
    use cheetah_string::CheetahString;
    use rocketmq_client_rust::{
        ClientConfig, ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, TelemetryHandle,
    };
    use rocketmq_model::common::message::MessageTrait;
    use rocketmq_model::common::message::message_single::Message as RmqMessage;
    use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
    use std::time::Instant;

    let broker = broker().await;
    let (topic, group) = (name("foreign"), name("g"));
    broker
        .declare(&Topology::new(&topic).group(&group))
        .await
        .unwrap();

    // The raw client wants its runtime built off the async context, and kept alive.
    let runtime = std::thread::spawn(|| {
        let owner = RuntimeOwner::plan(RuntimeConfig::for_parallelism("surety-foreign", 2))
            .unwrap()
            .build()
            .unwrap();
        let runtime = ClientRuntime::try_new(
            owner.root_context().component("client"),
            ClientRuntimeConfig::default(),
            TelemetryHandle::noop(),
        )
        .unwrap();
        std::mem::forget(owner);
        runtime
    })
    .join()
    .unwrap();
    let namesrv = RocketMqConfig::from_env().namesrv;
    let mut client = ClientConfig::new();
    client.set_namesrv_addr(CheetahString::from(namesrv.as_str()));
    client.set_instance_name(CheetahString::from(format!("foreign-{}", rand_u32())));
    client.set_vip_channel_enabled(false);
    let mut producer = DefaultMQProducer::builder(runtime)
        .client_config(client)
        .producer_group(name("foreign-producer"))
        .name_server_addr(namesrv.as_str())
        .build();
    producer.start().await.unwrap();
    let plain = RmqMessage::builder()
        .topic(topic.as_str())
        .body(vec![0x00_u8, 0x9f, 0x92])
        .build_unchecked();
    let mut malformed = RmqMessage::builder()
        .topic(topic.as_str())
        .body(vec![0x01_u8])
        .build_unchecked();
    malformed.put_property(
        CheetahString::from_static_str("surety-message-id"),
        CheetahString::from_static_str("has spaces"),
    );
    let mut broker_ids = Vec::new();
    for m in [plain, malformed] {
        let sent = producer.send(m).await.unwrap().expect("a send result");
        broker_ids.push(
            sent.msg_id
                .clone()
                .expect("the client's unique key")
                .to_string(),
        );
    }
    let valid = Message::new(&topic, "after the strangers");
    broker
        .publisher()
        .await
        .unwrap()
        .publish(&valid)
        .await
        .unwrap();

    let (handle, seen) = collect(&broker, &topic, &group).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    handle.shutdown().await;
    let delivered = seen.lock().unwrap().clone();
    assert!(
        delivered.iter().any(|m| m.id() == valid.id()),
        "the valid message after the strangers: {delivered:?}"
    );
    for (payload, broker_id) in [
        (&[0x00_u8, 0x9f, 0x92][..], &broker_ids[0]),
        (&[0x01][..], &broker_ids[1]),
    ] {
        assert!(
            delivered
                .iter()
                .any(|m| m.payload().as_ref() == payload && m.id().as_str() == broker_id),
            "the foreign message {payload:?} under its broker id {broker_id}: {delivered:?}"
        );
    }
    let dead = broker
        .dead_letters()
        .await
        .unwrap()
        .list(&topic, &group, 10)
        .await
        .unwrap();
    assert!(dead.is_empty(), "nothing was dead-lettered: {dead:?}");
}
