//! The Kafka adapter against the real broker at `SURETY_KAFKA_BOOTSTRAP`
//! (default 127.0.0.1:9092). The conformance suite covers the shared contracts; these
//! tests cover what is Kafka's own: transactions and exactly-once read-process-write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders, ToBytes};
use rdkafka::producer::{FutureProducer, FutureRecord};
use surety_core::{
    Broker, Delivery, ErrorKind, Message, MessageId, Outcome, RedriveSelection, RetryPolicy,
    Subscription, SubscriptionHandle, Topology, handler_fn,
};
use surety_kafka::{ExactlyOnce, KafkaBroker, KafkaConfig, processor_fn};

fn unique(what: &str) -> String {
    format!("surety-kafka-{what}-{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    n ^ (std::process::id() << 16) ^ COUNTER.fetch_add(7919, Ordering::SeqCst) as u32
}

static COUNTER: AtomicUsize = AtomicUsize::new(1);

async fn broker() -> KafkaBroker {
    let config = KafkaConfig::from_env();
    let servers = config.bootstrap_servers.clone();
    KafkaBroker::connect(config)
        .await
        .unwrap_or_else(|e| panic!("Kafka must be running at {servers} (scripts/brokers up): {e}"))
}

/// A plain rdkafka producer on the test cluster: a producer that is not Surety.
fn foreign_producer(broker: &KafkaBroker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &broker.config().bootstrap_servers)
        .create()
        .unwrap()
}

/// Sends `record` with the foreign producer and waits for the broker's acknowledgement.
async fn send_foreign<K, P>(raw: &FutureProducer, record: FutureRecord<'_, K, P>)
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    raw.send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// A fresh topic named after `what`, declared with a fresh consumer group.
async fn topic_with_group(broker: &KafkaBroker, what: &str) -> (String, String) {
    let (topic, group) = (unique(what), unique(&format!("{what}-group")));
    broker
        .declare(&Topology::new(&topic).group(&group))
        .await
        .unwrap();
    (topic, group)
}

/// Subscribes `group` to `topic` with a handler that records every delivery and answers
/// with `outcome`.
async fn record(
    broker: &KafkaBroker,
    topic: &str,
    group: &str,
    outcome: impl Fn(&Delivery) -> Outcome + Send + Sync + 'static,
) -> (SubscriptionHandle, Arc<Mutex<Vec<Delivery>>>) {
    let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let (sink, outcome) = (seen.clone(), Arc::new(outcome));
    let handle = broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(
            Subscription::new(topic, group),
            Arc::new(handler_fn(move |d: Delivery| {
                let (sink, outcome) = (sink.clone(), outcome.clone());
                async move {
                    let answer = outcome(&d);
                    sink.lock().unwrap().push(d);
                    Ok(answer)
                }
            })),
        )
        .await
        .unwrap();
    (handle, seen)
}

/// Publishes `message` through Surety, confirmed.
async fn publish(broker: &KafkaBroker, message: &Message) {
    broker
        .publisher()
        .await
        .unwrap()
        .publish(message)
        .await
        .unwrap();
}

/// Records every delivery's message, acking all.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Message>>>);

impl Seen {
    fn ids(&self) -> Vec<MessageId> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.id().clone())
            .collect()
    }
    fn messages(&self) -> Vec<Message> {
        self.0.lock().unwrap().clone()
    }
}

async fn read_all(broker: &KafkaBroker, topic: &str, seen: &Seen) -> SubscriptionHandle {
    let seen = seen.clone();
    broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(
            Subscription::new(topic, unique("reader")),
            Arc::new(handler_fn(move |d: Delivery| {
                let seen = seen.clone();
                async move {
                    seen.0.lock().unwrap().push(d.message);
                    Ok(Outcome::Ack)
                }
            })),
        )
        .await
        .unwrap()
}

async fn wait(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aborted_transactions_are_never_seen_by_a_consumer() {
    let broker = broker().await;
    let topic = unique("tx");
    broker.declare(&Topology::new(&topic)).await.unwrap();
    let batch = |tag: &str| -> Vec<Message> {
        (0..5)
            .map(|i| Message::new(&topic, format!("{tag} {i}")).with_key(format!("k{i}")))
            .collect()
    };
    let (aborted1, committed, aborted2) = (batch("aborted"), batch("committed"), batch("aborted"));
    for (messages, commit) in [(&aborted1, false), (&committed, true), (&aborted2, false)] {
        let mut tx = broker.begin_transaction().await.unwrap();
        for m in messages {
            tx.publish(m).await.unwrap();
        }
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.abort().await.unwrap();
        }
    }
    // A plain confirmed publish after the aborted transaction: the reader must get past it.
    let after = Message::new(&topic, "after");
    publish(&broker, &after).await;

    let seen = Seen::default();
    let handle = read_all(&broker, &topic, &seen).await;
    let expected: Vec<MessageId> = committed
        .iter()
        .chain(std::iter::once(&after))
        .map(|m| m.id().clone())
        .collect();
    let all = wait(Duration::from_secs(30), || {
        let ids = seen.ids();
        expected.iter().all(|id| ids.contains(id))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    handle.shutdown().await;
    assert!(all, "committed messages missing: saw {:?}", seen.ids());
    let ids = seen.ids();
    let leaked: Vec<_> = aborted1
        .iter()
        .chain(&aborted2)
        .filter(|m| ids.contains(m.id()))
        .collect();
    assert!(
        leaked.is_empty(),
        "aborted messages were delivered: {leaked:?}"
    );
    assert_eq!(ids.len(), expected.len(), "duplicates: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_process_write_killed_mid_stream_is_exactly_once() {
    let broker = broker().await;
    let (input, output, group) = (unique("in"), unique("out"), unique("eos"));
    broker
        .declare(&Topology::new(&input).group(&group))
        .await
        .unwrap();
    broker.declare(&Topology::new(&output)).await.unwrap();
    let n = 120;
    let inputs: Vec<Message> = (0..n)
        .map(|i| Message::new(&input, format!("{i}")).with_key(format!("k{}", i % 7)))
        .collect();
    for r in broker
        .publisher()
        .await
        .unwrap()
        .publish_batch(&inputs)
        .await
    {
        r.unwrap();
    }

    let processed = Arc::new(AtomicUsize::new(0));
    let spec = ExactlyOnce::new(&input, &group).max_batch(10).retry(
        RetryPolicy::with_max_attempts(3)
            .backoff(Duration::from_millis(10), Duration::from_millis(50)),
    );
    // `stall_at`: the processor stalls on that input, so the kill lands inside an open
    // transaction with outputs already sent into it.
    let start = |processed: Arc<AtomicUsize>, stall_at: Option<usize>| {
        let output = output.clone();
        Arc::new(processor_fn(move |d: Delivery| {
            let (output, processed) = (output.clone(), processed.clone());
            async move {
                let nth = processed.fetch_add(1, Ordering::SeqCst) + 1;
                if Some(nth) == stall_at {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                let body = format!("processed {}", String::from_utf8_lossy(d.message.payload()));
                Ok(vec![
                    Message::new(&output, body)
                        .with_header("input-id", d.message.id().as_str())
                        .with_key(d.message.key().unwrap_or("none")),
                ])
            }
        }))
    };

    // First run: killed (aborted like a crash) mid-stream, inside a transaction.
    let first = broker
        .exactly_once(spec.clone(), start(processed.clone(), Some(45)))
        .await
        .unwrap();
    let got_going = wait(Duration::from_secs(30), || {
        processed.load(Ordering::SeqCst) >= 45
    })
    .await;
    assert!(got_going, "the processor never got going");
    first.abort();
    let at_kill = processed.load(Ordering::SeqCst);

    // Restart with the same group and transactional id: it fences the dead one.
    let again = Arc::new(AtomicUsize::new(0));
    let second = broker
        .exactly_once(spec, start(again.clone(), None))
        .await
        .unwrap();

    let seen = Seen::default();
    let reader = read_all(&broker, &output, &seen).await;
    let complete = wait(Duration::from_secs(60), || {
        let per: HashMap<String, usize> = count(&seen);
        per.len() >= n
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    second.shutdown().await;
    reader.shutdown().await;
    let per = count(&seen);
    assert!(
        complete,
        "only {} of {n} inputs reached the output (processed {at_kill} before the kill, {} after)",
        per.len(),
        again.load(Ordering::SeqCst)
    );
    let twice: Vec<_> = per.iter().filter(|(_, c)| **c != 1).collect();
    assert!(
        twice.is_empty(),
        "inputs reflected more than once: {twice:?}"
    );
    for m in &inputs {
        assert_eq!(
            per.get(m.id().as_str()),
            Some(&1),
            "input {} missing",
            m.id()
        );
    }
    assert!(
        at_kill + again.load(Ordering::SeqCst) > n,
        "the kill should have forced some inputs to be processed twice (and written once)"
    );
}

fn count(seen: &Seen) -> HashMap<String, usize> {
    let mut per = HashMap::new();
    for m in seen.messages() {
        *per.entry(m.header("input-id").unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    per
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_topics_are_unroutable_and_not_created() {
    let broker = broker().await;
    let topic = unique("nowhere");
    let publisher = broker.publisher().await.unwrap();
    let started = Instant::now();
    let e = publisher
        .publish(&Message::new(&topic, "x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // The check did not auto-create it (the broker allows auto-creation).
    let e = publisher
        .publish(&Message::new(&topic, "x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
    // Declaring makes it routable at once.
    broker.declare(&Topology::new(&topic)).await.unwrap();
    publisher.publish(&Message::new(&topic, "x")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_a_clear_error() {
    let mut config = KafkaConfig::new("127.0.0.1:1");
    config.request_timeout = Duration::from_secs(2);
    let e = KafkaBroker::connect(config).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
}

/// Records from a producer that is not Surety, with malformed envelopes (no id, a
/// non-UTF-8 key and header value, Surety headers holding garbage): each is delivered with
/// an id taken from its position, and the consumer goes on to the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_from_a_foreign_producer_never_stop_the_consumer() {
    let broker = broker().await;
    let topic = unique("foreign");
    broker.declare(&Topology::new(&topic)).await.unwrap();
    let raw = foreign_producer(&broker);
    let garbage = OwnedHeaders::new()
        .insert(Header {
            key: "surety-message-id",
            value: Some("has spaces and \u{7f}"),
        })
        .insert(Header {
            key: "surety-attempt",
            value: Some("many"),
        })
        .insert(Header {
            key: "surety-created-at",
            value: Some("yesterday"),
        })
        .insert(Header {
            key: "binary",
            value: Some(&[0xff_u8, 0xfe, 0x00][..]),
        });
    let records: Vec<(Option<&[u8]>, Option<OwnedHeaders>)> =
        vec![(None, None), (Some(&[0xc3, 0x28][..]), Some(garbage))];
    for (key, headers) in records {
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic).payload(&[0x00, 0x9f, 0x92][..]);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        send_foreign(&raw, record).await;
    }
    let valid = Message::new(&topic, "after the strangers");
    publish(&broker, &valid).await;

    let seen = Seen::default();
    let handle = read_all(&broker, &topic, &seen).await;
    let all_there = wait(Duration::from_secs(60), || seen.ids().len() >= 3).await;
    handle.shutdown().await;
    assert!(all_there, "only {} of 3 delivered", seen.ids().len());
    let messages = seen.messages();
    assert!(
        messages.iter().any(|m| m.id() == valid.id()),
        "the valid one after them"
    );
    let strangers: Vec<&Message> = messages.iter().filter(|m| m.id() != valid.id()).collect();
    assert_eq!(strangers.len(), 2);
    for m in &strangers {
        // No usable id: the record's position is its identity, stable across redeliveries.
        assert!(m.id().as_str().starts_with(&topic), "{:?}", m.id());
        assert_eq!(m.payload().as_ref(), &[0x00, 0x9f, 0x92]);
    }
    // Bytes that are not text arrive escaped, never dropped (the value and the key).
    let garbage = strangers
        .iter()
        .find(|m| m.header("surety-attempt").is_some())
        .expect("the record with headers");
    assert_eq!(garbage.header("binary"), Some("\\xff\\xfe\u{0}"));
    assert_eq!(garbage.key(), Some("\\xc3("));
}

/// Surety's retry headers written by someone else on the subscribed topic: a far-future
/// `surety-retry-at`, a `surety-retry-of` naming another place and a huge
/// `surety-attempt`. They are obeyed only on the group's retry topic, which only the
/// adapter writes: here the record is delivered at once, as a first attempt, from the
/// topic it was read from, and the partition moves on to the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_retry_headers_on_the_topic_neither_stall_nor_misroute() {
    let broker = broker().await;
    let (topic, group) = topic_with_group(&broker, "forged").await;
    let raw = foreign_producer(&broker);
    let a_year_on = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 365 * 24 * 3600 * 1000;
    let a_year_on = a_year_on.to_string();
    let forged = OwnedHeaders::new()
        .insert(Header {
            key: "surety-retry-at",
            value: Some(a_year_on.as_str()),
        })
        .insert(Header {
            key: "surety-retry-of",
            value: Some("../../etc/passwd"),
        })
        .insert(Header {
            key: "surety-attempt",
            value: Some("1000"),
        });
    send_foreign(
        &raw,
        FutureRecord::<str, str>::to(&topic)
            .payload("forged")
            .headers(forged),
    )
    .await;
    let after = Message::new(&topic, "after the forgery");
    publish(&broker, &after).await;

    let (handle, seen) = record(&broker, &topic, &group, |_| Outcome::Ack).await;
    // Generous for a group join on a loaded machine; a stalled partition waits a year.
    let both = wait(Duration::from_secs(60), || seen.lock().unwrap().len() >= 2).await;
    handle.shutdown().await;
    let seen = seen.lock().unwrap().clone();
    assert!(both, "the partition stalled: {} of 2 delivered", seen.len());
    let forged = seen
        .iter()
        .find(|d| d.message.payload().as_ref() == b"forged")
        .expect("the forged record was delivered");
    assert_eq!(
        forged.message.destination(),
        topic,
        "not renamed by a header"
    );
    assert_eq!(
        forged.attempt, 1,
        "a first delivery, whatever the header says"
    );
    assert_eq!(
        forged.message.header("surety-retry-of"),
        Some("../../etc/passwd"),
        "a foreign header reaches the handler as a plain header"
    );
    assert!(seen.iter().any(|d| d.message.id() == after.id()));
}

/// A foreign record whose 20 KiB header no Surety message may carry, rejected by the
/// handler: its dead letter lands without that header (which the dead letter names with
/// its size), the partition moves on to the next message, and the dead letter can be
/// re-driven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_with_an_oversized_header_is_dead_lettered() {
    let broker = broker().await;
    let (topic, group) = topic_with_group(&broker, "bigheader").await;
    let raw = foreign_producer(&broker);
    let big = "b".repeat(20 * 1024);
    send_foreign(
        &raw,
        FutureRecord::<str, str>::to(&topic)
            .payload("poison")
            .headers(OwnedHeaders::new().insert(Header {
                key: "big",
                value: Some(big.as_str()),
            })),
    )
    .await;
    let after = Message::new(&topic, "after the poison");
    publish(&broker, &after).await;

    let is_poison = |d: &Delivery| d.message.payload().as_ref() == b"poison";
    let (handle, seen) = record(&broker, &topic, &group, move |d| {
        if is_poison(d) {
            Outcome::reject("poison")
        } else {
            Outcome::Ack
        }
    })
    .await;
    let moved_on = wait(Duration::from_secs(60), || {
        seen.lock().unwrap().iter().any(|d| !is_poison(d))
    })
    .await;
    handle.shutdown().await;
    assert!(
        moved_on,
        "the partition never reached the message after the poison"
    );
    assert_eq!(
        seen.lock().unwrap().iter().filter(|d| is_poison(d)).count(),
        1,
        "rejected once, then dead"
    );
    let letters = broker.dead_letters().await.unwrap();
    let dead = letters.list(&topic, &group, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let letter = &dead[0].message;
    assert_eq!(letter.payload().as_ref(), b"poison");
    assert_eq!(letter.header("big"), None);
    let removed = letter
        .header("surety-dead-letter-removed")
        .unwrap_or_default();
    assert!(removed.contains("big (20480 bytes)"), "{removed}");
    // And the dead letter can be re-driven: every Surety publish is held to the 8 KiB
    // header limit, so one that kept the header could never leave the dead-letter topic.
    let report = letters
        .redrive(&topic, &group, &RedriveSelection::All)
        .await
        .expect("the dead letter is re-driven");
    assert_eq!(report.redriven.len(), 1, "{report:?}");
}
