//! The RabbitMQ adapter against the real broker (`SURETY_RABBITMQ_URL`). A broker that
//! does not answer fails these tests; nothing is skipped.

use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_conformance::FaultProxy;
use surety_core::{
    Broker, Delivery, ErrorKind, Message, Outcome, RetryPolicy, Subscription, Topology, handler_fn,
    headers,
};
use surety_rabbitmq::{DEAD_LETTER_GROUP, QueueType, RabbitBroker, RabbitConfig};

fn name(what: &str) -> String {
    format!("surety-test-{what}-{:08x}", rand::random::<u32>())
}

fn config() -> RabbitConfig {
    RabbitConfig::from_env().expect("SURETY_RABBITMQ_URL")
}

async fn connect_with(config: RabbitConfig) -> RabbitBroker {
    let url = config.redacted_url();
    RabbitBroker::connect(config)
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ at {url} must be running for these tests: {e}"))
}

async fn connect() -> RabbitBroker {
    connect_with(config()).await
}

/// The test broker's URL with other credentials (as written: percent-encode what a URL
/// cannot hold raw).
fn with_credentials(user: &str, password: &str) -> RabbitConfig {
    let url = config().url;
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let host_and_vhost = after_scheme
        .rsplit_once('@')
        .map_or(after_scheme, |(_, host)| host);
    RabbitConfig {
        url: format!("amqp://{user}:{password}@{host_and_vhost}"),
        connect_timeout: Duration::from_secs(5),
        ..config()
    }
}

/// A wrong password and an unknown user are refused logins: one typed error that says a
/// retry will not help (not `Unavailable`, which a retry loop would spin on), within the
/// connect timeout, and the password appears nowhere in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_an_authentication_error_without_the_password() {
    // The password n0t/the:p@ss%word, percent-encoded as a URL must carry it.
    let encoded = "n0t%2Fthe%3Ap%40ss%25word";
    for user in ["guest", "surety-no-such-user"] {
        let config = with_credentials(user, encoded);
        let timeout = config.connect_timeout;
        let started = Instant::now();
        let Err(e) = RabbitBroker::connect(config).await else {
            panic!("the broker must refuse these credentials ({user})");
        };
        assert!(started.elapsed() <= timeout, "{:?}", started.elapsed());
        assert_eq!(e.kind(), ErrorKind::Authentication, "{user}: {e:?}");
        assert!(!e.is_retryable(), "{e:?}");
        let printed = format!("{e} {e:?}");
        for part in [encoded, "n0t/the", "p@ss%word", "n0t"] {
            assert!(!printed.contains(part), "{part} in {printed}");
        }
    }
}

type Seen = Arc<Mutex<Vec<Delivery>>>;

/// Subscribes a handler that records deliveries and answers with `outcome`.
async fn collect(
    broker: &RabbitBroker,
    subscription: Subscription,
    outcome: impl Fn(&Delivery) -> Outcome + Send + Sync + 'static,
) -> (surety_core::SubscriptionHandle, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let outcome = Arc::new(outcome);
    let handler = handler_fn(move |d: Delivery| {
        let (s, outcome) = (s.clone(), outcome.clone());
        async move {
            let answer = outcome(&d);
            s.lock().unwrap().push(d);
            Ok(answer)
        }
    });
    let handle = broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(subscription, Arc::new(handler))
        .await
        .expect("subscribe");
    (handle, seen)
}

async fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

#[tokio::test]
async fn publishing_to_a_destination_without_binding_is_unroutable() {
    let broker = connect().await;
    let publisher = broker.publisher().await.unwrap();

    // Declared, but no group: the exchange exists and no queue is bound to it.
    let lonely = name("nobinding");
    broker.declare(&Topology::new(&lonely)).await.unwrap();
    let e = publisher
        .publish(&Message::new(&lonely, "nobody listens"))
        .await
        .expect_err("a publish that reached no queue was confirmed");
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
    assert!(!e.is_retryable(), "{e}");

    // Never declared at all: same answer, and the channel survives it.
    let e = publisher
        .publish(&Message::new(name("undeclared"), "x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");

    let dest = name("routable");
    broker
        .declare(&Topology::new(&dest).group("g"))
        .await
        .unwrap();
    publisher
        .publish(&Message::new(&dest, "fine"))
        .await
        .expect("the same publisher publishes after unroutable messages");
}

#[tokio::test]
async fn unroutable_message_in_a_pipelined_batch_fails_alone() {
    let broker = connect().await;
    let dest = name("batch");
    broker
        .declare(&Topology::new(&dest).group("g"))
        .await
        .unwrap();
    let mut batch: Vec<Message> = (0..200)
        .map(|i| Message::new(&dest, format!("m{i}")))
        .collect();
    for i in [17, 101, 150] {
        batch[i] = Message::new(name("nowhere"), "lost?");
    }
    let results = broker
        .publisher()
        .await
        .unwrap()
        .publish_batch(&batch)
        .await;
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (17 | 101 | 150, Err(e)) => assert_eq!(e.kind(), ErrorKind::Unroutable, "{i}: {e}"),
            (17 | 101 | 150, Ok(_)) => panic!("unroutable message {i} was confirmed"),
            (_, Err(e)) => panic!("good message {i} failed: {e}"),
            (_, Ok(r)) => assert_eq!(&r.message_id, batch[i].id()),
        }
    }
}

#[tokio::test]
async fn declare_is_idempotent_and_a_mismatch_is_a_configuration_error() {
    let broker = connect().await;
    let dest = name("mismatch");
    let topology = Topology::new(&dest).group("g");
    broker.declare(&topology).await.unwrap();
    broker
        .declare(&topology)
        .await
        .expect("declaring twice is fine");

    let classic = connect_with(config().queue_type(QueueType::Classic)).await;
    let e = classic
        .declare(&topology)
        .await
        .expect_err("a quorum queue was re-declared as classic");
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
    assert!(!e.is_retryable());

    // The broker object still works after the refusal.
    broker.declare(&topology).await.unwrap();
    let e = broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(
            Subscription::new(name("undeclared"), "g"),
            Arc::new(handler_fn(|_d: Delivery| async { Ok(Outcome::Ack) })),
        )
        .await
        .err()
        .expect("subscribing to an undeclared destination must fail");
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
}

#[tokio::test]
async fn ordered_subscriptions_are_unsupported_not_silently_unordered() {
    let broker = connect().await;
    let dest = name("ordered");
    broker
        .declare(&Topology::new(&dest).group("g"))
        .await
        .unwrap();
    let e = broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(
            Subscription::new(&dest, "g").ordered(true),
            Arc::new(handler_fn(|_d: Delivery| async { Ok(Outcome::Ack) })),
        )
        .await
        .err()
        .expect("ordered subscription accepted");
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(!broker.capabilities().ordering_per_key);
    assert!(!broker.capabilities().half_messages);
}

#[tokio::test]
async fn repeated_crashes_keep_counting_attempts_then_dead_letter() {
    let broker = connect().await;
    let dest = name("crashes");
    broker
        .declare(&Topology::new(&dest).group("g"))
        .await
        .unwrap();
    let message = Message::new(&dest, "crashes the consumer");
    broker
        .publisher()
        .await
        .unwrap()
        .publish(&message)
        .await
        .unwrap();
    let policy = RetryPolicy::with_max_attempts(3);
    // Three consumers die holding the message, without ever settling it.
    let mut attempts = Vec::new();
    for _ in 0..3 {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let handler = handler_fn(move |d: Delivery| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(d);
                futures::future::pending::<()>().await;
                Ok(Outcome::Ack)
            }
        });
        let handle = broker
            .subscriber()
            .await
            .unwrap()
            .subscribe(
                Subscription::new(&dest, "g").retry(policy.clone()),
                Arc::new(handler),
            )
            .await
            .unwrap();
        assert!(wait_for(Duration::from_secs(10), || !seen.lock().unwrap().is_empty()).await);
        attempts.push(seen.lock().unwrap()[0].attempt);
        handle.abort();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        attempts,
        [1, 2, 3],
        "x-delivery-count must make attempts grow"
    );

    // The fourth delivery is past max_attempts: dead-lettered without the handler.
    let (handle, seen) = collect(&broker, Subscription::new(&dest, "g").retry(policy), |_| {
        Outcome::Ack
    })
    .await;
    let dl = broker.dead_letter_destination(&dest, "g");
    let (dl_handle, dead) = collect(&broker, Subscription::new(&dl, DEAD_LETTER_GROUP), |_| {
        Outcome::Ack
    })
    .await;
    assert!(
        wait_for(Duration::from_secs(10), || !dead.lock().unwrap().is_empty()).await,
        "the crash-looping message never reached the dead-letter queue"
    );
    handle.shutdown().await;
    dl_handle.shutdown().await;
    assert!(seen.lock().unwrap().is_empty(), "the handler saw it again");
    let d = &dead.lock().unwrap()[0];
    assert_eq!(d.message.id(), message.id());
    assert_eq!(d.message.header(headers::DEAD_LETTER_ATTEMPTS), Some("3"));
    assert_eq!(d.attempt, 1, "a dead letter starts its own count");
}

#[tokio::test]
async fn dead_letters_are_kept_until_read() {
    let broker = connect().await;
    let dest = name("kept");
    broker
        .declare(&Topology::new(&dest).group("g"))
        .await
        .unwrap();
    let message = Message::new(&dest, "bad order").with_key("customer-1");
    broker
        .publisher()
        .await
        .unwrap()
        .publish(&message)
        .await
        .unwrap();
    let (handle, _) = collect(&broker, Subscription::new(&dest, "g"), |_| {
        Outcome::reject("total is negative")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    handle.shutdown().await;
    // Nobody read the dead letters while it was rejected; they were kept.
    let dl = broker.dead_letter_destination(&dest, "g");
    let (handle, dead) = collect(&broker, Subscription::new(&dl, DEAD_LETTER_GROUP), |_| {
        Outcome::Ack
    })
    .await;
    assert!(wait_for(Duration::from_secs(10), || !dead.lock().unwrap().is_empty()).await);
    handle.shutdown().await;
    let d = &dead.lock().unwrap()[0];
    assert_eq!(d.message.id(), message.id());
    assert_eq!(d.message.key(), Some("customer-1"));
    assert!(
        d.message
            .header(headers::DEAD_LETTER_REASON)
            .unwrap()
            .contains("total is negative")
    );
    assert_eq!(d.message.header(headers::CONSUMER_GROUP), Some("g"));
    assert_eq!(
        d.message.header(headers::ORIGINAL_DESTINATION),
        Some(dest.as_str())
    );
}

#[tokio::test]
async fn a_short_retry_is_not_stuck_behind_a_long_one() {
    let broker = connect().await;
    let dest = name("delays");
    broker
        .declare(&Topology::new(&dest).group("g"))
        .await
        .unwrap();
    let slow = Message::new(&dest, "slow").with_header("delay", "5000");
    let fast = Message::new(&dest, "fast").with_header("delay", "200");
    let publisher = broker.publisher().await.unwrap();
    let (handle, seen) = collect(&broker, Subscription::new(&dest, "g"), |d| {
        if d.attempt == 1 {
            let ms = d.message.header("delay").unwrap().parse().unwrap();
            Outcome::retry_after(Duration::from_millis(ms))
        } else {
            Outcome::Ack
        }
    })
    .await;
    let start = Instant::now();
    publisher.publish(&slow).await.unwrap();
    publisher.publish(&fast).await.unwrap();
    let fid = fast.id().clone();
    let back = wait_for(Duration::from_secs(4), || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|d| d.message.id() == &fid && d.attempt == 2)
    })
    .await;
    handle.shutdown().await;
    assert!(back, "the 200 ms retry waited behind the 5 s one");
    assert!(start.elapsed() >= Duration::from_millis(200));
}

/// What a RabbitMQ transaction commits when a message cannot be routed: a destination
/// nobody declared is refused before the message joins the transaction (the rest commits
/// cleanly); one declared without any queue is returned at commit, which then says so and
/// how many others were committed. Fails if an unroutable message is accepted silently,
/// or if the error misstates what was committed.
#[tokio::test]
async fn broker_transaction_refuses_or_reports_unroutable_messages() {
    let broker = connect().await;
    let dest = name("tx");
    broker
        .declare(&Topology::new(&dest).group("g"))
        .await
        .unwrap();
    let queueless = name("tx-noqueue");
    broker.declare(&Topology::new(&queueless)).await.unwrap();
    let (handle, seen) = collect(&broker, Subscription::new(&dest, "g"), |_| Outcome::Ack).await;

    // Undeclared: refused by publish, the transaction goes on and commits the rest.
    let mut tx = broker.begin_transaction().await.unwrap();
    let first = Message::new(&dest, "first");
    tx.publish(&first).await.unwrap();
    let e = tx
        .publish(&Message::new(name("nowhere"), "x"))
        .await
        .expect_err("an undeclared destination joined the transaction");
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
    tx.commit().await.expect("the rest commits");

    // Declared without a queue: returned at commit; the error counts what committed.
    let mut tx = broker.begin_transaction().await.unwrap();
    let second = Message::new(&dest, "second");
    let lost = Message::new(&queueless, "x");
    tx.publish(&second).await.unwrap();
    tx.publish(&lost).await.unwrap();
    let e = tx
        .commit()
        .await
        .expect_err("a returned message was committed silently");
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
    assert!(e.message().contains(lost.id().as_str()), "{e}");
    assert_eq!(e.context_value("committed"), Some("1"), "{e}");

    let both = wait_for(Duration::from_secs(5), || seen.lock().unwrap().len() == 2).await;
    handle.shutdown().await;
    let ids: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.message.id().clone())
        .collect();
    assert!(both, "delivered: {ids:?}");
    assert!(
        ids.contains(first.id()) && ids.contains(second.id()),
        "{ids:?}"
    );
}

/// A connection cut while many confirms are pending: every publish reports either a
/// confirm or a retryable error, and every confirmed message is there afterwards.
#[tokio::test]
async fn a_cut_connection_fails_pending_confirms_as_unknown_never_as_success() {
    let base = config();
    let uri = base.url.clone();
    let host_port = uri
        .split('@')
        .next_back()
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let upstream = host_port
        .to_socket_addrs()
        .unwrap()
        .next()
        .expect("RabbitMQ address");
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let proxied = uri.replacen(&host_port, &proxy.addr().to_string(), 1);
    let through_proxy = connect_with(RabbitConfig {
        url: proxied,
        ..base
    })
    .await;
    let direct = connect().await;
    let dest = name("cut");
    direct
        .declare(&Topology::new(&dest).group("g"))
        .await
        .unwrap();

    let publisher = through_proxy.publisher().await.unwrap();
    let messages: Vec<Message> = (0..2000)
        .map(|i| Message::new(&dest, vec![b'x'; 2048]).with_header("i", i.to_string()))
        .collect();
    // All publishes pipelined on one channel; the cut comes once the first confirms are
    // back, so that most of them are still in flight (not after a fixed sleep, which on
    // a busy machine may come before the channel is even open).
    let acked = Arc::new(AtomicUsize::new(0));
    let (p, batch, a) = (publisher.clone(), messages.clone(), acked.clone());
    let running = tokio::spawn(async move {
        futures::future::join_all(batch.iter().map(|m| async {
            let r = p.publish(m).await;
            if r.is_ok() {
                a.fetch_add(1, Ordering::SeqCst);
            }
            r
        }))
        .await
    });
    assert!(
        wait_for(Duration::from_secs(30), || acked.load(Ordering::SeqCst)
            >= 20)
        .await,
        "no publish was confirmed through the proxy"
    );
    proxy.cut_all();
    let results = running.await.unwrap();
    let mut confirmed = Vec::new();
    let mut failed = 0;
    for (m, r) in messages.iter().zip(&results) {
        match r {
            Ok(_) => confirmed.push(m.id().clone()),
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                assert!(
                    matches!(e.kind(), ErrorKind::OutcomeUnknown | ErrorKind::Unavailable),
                    "{e}"
                );
                failed += 1;
            }
        }
    }
    eprintln!(
        "cut: {} confirmed, {failed} failed with a retryable error",
        confirmed.len()
    );
    assert!(failed > 0, "the cut did not hit any publish in flight");

    // The same publisher works again (a new connection through the proxy).
    let after = Message::new(&dest, "after the cut");
    publisher
        .publish(&after)
        .await
        .expect("publisher recovered");
    confirmed.push(after.id().clone());

    let (handle, seen) = collect(&direct, Subscription::new(&dest, "g"), |_| Outcome::Ack).await;
    let all = wait_for(Duration::from_secs(20), || {
        let seen = seen.lock().unwrap();
        confirmed
            .iter()
            .all(|id| seen.iter().any(|d| d.message.id() == id))
    })
    .await;
    handle.shutdown().await;
    assert!(
        all,
        "a confirmed message was lost ({} confirmed, {failed} failed)",
        confirmed.len()
    );
}

/// RabbitMQ coalesces confirms into multiple acks, and lapin hands a returned message to
/// whichever publish of that ack it completes first. Interleaved routable and unroutable
/// publishes, all in flight at once: each must get its own verdict, never a success for
/// a returned message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_are_matched_to_their_own_publish_under_multiple_acks() {
    // Classic queues confirm in fsync batches: many multiple acks.
    let broker = connect_with(config().queue_type(QueueType::Classic)).await;
    let dest = name("multiack");
    broker
        .declare(&Topology::new(&dest).group("g").dead_letter(false))
        .await
        .unwrap();
    let nowhere = name("multiack-nowhere");
    let batch: Vec<Message> = (0..3000)
        .map(|i| {
            if i % 3 == 1 {
                Message::new(&nowhere, format!("u{i}"))
            } else {
                Message::new(&dest, format!("r{i}"))
            }
        })
        .collect();
    let results = broker
        .publisher()
        .await
        .unwrap()
        .publish_batch(&batch)
        .await;
    let mut wrong = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let unroutable = i % 3 == 1;
        match r {
            Ok(_) if !unroutable => {}
            Err(e) if unroutable && e.kind() == ErrorKind::Unroutable => {}
            other => wrong.push(format!("{i} (unroutable: {unroutable}): {other:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} publishes got another one's verdict, e.g. {:?}",
        wrong.len(),
        batch.len(),
        &wrong[..wrong.len().min(5)]
    );
}

// ---------------------------------------------------------------------------------------
// Dead letters: list and re-drive (`Broker::dead_letters`)

/// A re-drive whose publish fails leaves the dead letter where it was; listing an
/// undeclared group is a configuration error.
#[tokio::test]
async fn a_failed_redrive_keeps_the_dead_letter() {
    use surety_core::RedriveSelection;
    use surety_core::raw::dead_letter_message;

    let broker = connect().await;
    let dest = name("dlqfail");
    broker
        .declare(&Topology::new(&dest).group("g"))
        .await
        .unwrap();
    // A dead letter whose origin no longer exists (its destination was never declared).
    let gone = name("gone");
    let dl = broker.dead_letter_destination(&dest, "g");
    let dead_letter = dead_letter_message(&Message::new(&gone, "orphan"), &dl, "g", "boom", 4);
    broker
        .publisher()
        .await
        .unwrap()
        .publish(&dead_letter)
        .await
        .unwrap();
    let dead = broker.dead_letters().await.unwrap();
    let e = dead
        .redrive(&dest, "g", &RedriveSelection::All)
        .await
        .expect_err("the origin is unroutable");
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
    let still = dead.list(&dest, "g", 10).await.unwrap();
    assert_eq!(still.len(), 1, "{still:?}");
    assert_eq!(still[0].message.id(), dead_letter.id());
    assert_eq!(still[0].reason.as_deref(), Some("boom"));
    assert_eq!(still[0].attempts, Some(4));
    assert_eq!(
        still[0].original_destination.as_deref(),
        Some(gone.as_str())
    );

    let e = dead.list(&dest, "nobody", 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Configuration, "{e}");
}

/// Messages from a publisher that is not Surety, with malformed envelopes (no id, Surety
/// headers holding garbage or the wrong AMQP types, a nested table, bytes that are not
/// UTF-8): each reaches the handler with an id, and the consumer goes on to the next one.
#[tokio::test]
async fn malformed_messages_from_a_foreign_publisher_never_stop_the_consumer() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable, LongString};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let config = config();
    let broker = connect_with(config.clone()).await;
    let dest = name("foreign");
    let group = name("g");
    broker
        .declare(&Topology::new(&dest).group(&group))
        .await
        .unwrap();

    let raw = Connection::connect(&config.url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = raw.create_channel().await.unwrap();
    let mut garbage = FieldTable::default();
    let long = |b: &[u8]| AMQPValue::LongString(LongString::from(b.to_vec()));
    garbage.insert("surety-message-id".into(), long(b"has spaces"));
    garbage.insert("surety-attempt".into(), long(b"many"));
    garbage.insert("surety-created-at".into(), AMQPValue::Boolean(true));
    garbage.insert("binary".into(), long(&[0xff, 0xfe, 0x00]));
    garbage.insert(
        "nested".into(),
        AMQPValue::FieldTable(FieldTable::default()),
    );
    let envelopes = [
        BasicProperties::default(),
        BasicProperties::default().with_headers(garbage),
    ];
    for properties in envelopes {
        channel
            .basic_publish(
                config.router_exchange.as_str().into(),
                dest.as_str().into(),
                BasicPublishOptions::default(),
                &[0x00, 0x9f, 0x92],
                properties,
            )
            .await
            .unwrap();
    }
    let valid = Message::new(&dest, "after the strangers");
    broker
        .publisher()
        .await
        .unwrap()
        .publish(&valid)
        .await
        .unwrap();

    let (handle, seen) = collect(&broker, Subscription::new(&dest, &group), |_| Outcome::Ack).await;
    let all_there = wait_for(Duration::from_secs(30), || seen.lock().unwrap().len() >= 3).await;
    handle.shutdown().await;
    let _ = raw.close(200, "OK".into()).await;
    let deliveries = seen.lock().unwrap().clone();
    assert!(all_there, "only {} of 3 delivered", deliveries.len());
    assert!(
        deliveries.iter().any(|d| d.message.id() == valid.id()),
        "the valid message after them"
    );
    for d in deliveries.iter().filter(|d| d.message.id() != valid.id()) {
        assert_eq!(
            d.attempt, 1,
            "garbage in surety-attempt counts as a first delivery"
        );
        assert_eq!(d.message.payload().as_ref(), &[0x00, 0x9f, 0x92]);
        assert!(!d.message.id().as_str().contains(' '));
    }
}
