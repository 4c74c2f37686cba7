//! The behaviour every database must show.

use std::sync::Arc;
use std::time::Duration;

use surety_core::{Delivery, Handler, Outcome};
use surety_core::{
    ErrorKind, LocalTransaction, Message, Publisher, TransactionalPublisher, TxOutcome, TxState,
    check_back_fn,
};
use surety_sql::{
    CheckExhausted, Checker, CheckerConfig, EntryState, InboxOutcome, Relay, RelayConfig, SqlStore,
    SqlTransactionalPublisher, StoreConfig, TableNames,
};
use surety_sql::{Failure, ReceiptHandler, ReceiptOutcome, receipt_message};

use super::*;

fn relay<DB: TestDb>(f: &Fixture<DB>, retry: RetryPolicy) -> Relay<DB> {
    Relay::new(
        f.store.clone(),
        f.publisher(),
        RelayConfig {
            batch_size: 50,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(20),
            retry,
            owner: None,
        },
    )
}

/// Commit → published exactly once; rollback → never published; the fast path publishes
/// at once and the loop does not publish again.
pub async fn commit_and_rollback<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let committed: Vec<Message> = (0..20).map(order).collect();
    let rolled_back: Vec<Message> = (100..110).map(order).collect();
    f.place_orders(&committed, true).await;
    f.place_orders(&rolled_back, false).await;
    for m in &rolled_back {
        assert!(f.state_of(m.id()).await.is_none(), "rolled-back row exists");
    }

    let relay = relay(&f, RetryPolicy::default());
    // Fast path for the first message, then the loop for the rest.
    let fast = relay
        .publish_now(&[committed[0].id().clone()])
        .await
        .unwrap();
    assert_eq!(fast.sent, 1);
    let stats = relay.drain().await.unwrap();
    assert_eq!(stats.sent, 19, "{stats:?}");
    assert_eq!(relay.drain().await.unwrap().claimed, 0);

    for m in &committed {
        assert_eq!(
            f.publisher.count(m.id()),
            1,
            "committed message published once"
        );
        let entry = f.state_of(m.id()).await.unwrap();
        assert_eq!(entry.state, EntryState::Sent);
        assert_eq!(entry.attempts, 1);
    }
    for m in &rolled_back {
        assert_eq!(
            f.publisher.count(m.id()),
            0,
            "rolled-back message published"
        );
    }
    assert_eq!(f.broker.backlog(DEST, GROUP), 20);
    let counts = f.store.counts().await.unwrap();
    assert_eq!(counts.get(&EntryState::Sent), Some(&20));

    // Retention: the default week keeps sent rows; a zero window deletes them in batches.
    assert_eq!(f.store.cleanup().await.unwrap().outbox_rows, 0);
    let impatient = f
        .reopen_with(StoreConfig {
            cleanup_batch: 7,
            ..StoreConfig::default().retention(Duration::ZERO, Duration::from_secs(3600))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cleaned = impatient.cleanup().await.unwrap();
    assert_eq!(cleaned.outbox_rows, 20, "{cleaned:?}");
    assert!(f.state_of(committed[0].id()).await.is_none());
    impatient.close().await;
    f.cleanup().await;
}

/// Oversized and invalid messages are refused at enqueue with a typed error; nothing is
/// written. Table names outside the whitelist are refused before any SQL.
pub async fn bad_input<DB: TestDb>() {
    let f = Fixture::<DB>::with_config(|c| c.max_message_size(1024)).await;
    let big = Message::new(DEST, vec![7u8; 2048]);
    let bad_dest = Message::new("no spaces allowed", "x");
    let mut tx = f.store.pool().begin().await.unwrap();
    let e = f.store.outbox().enqueue(&mut tx, &big).await.unwrap_err();
    let e2 = f
        .store
        .outbox()
        .enqueue(&mut tx, &bad_dest)
        .await
        .unwrap_err();
    assert_eq!(e2.kind(), ErrorKind::InvalidMessage);
    tx.commit().await.unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidMessage);
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("over the limit"), "{e}");
    assert!(f.state_of(big.id()).await.is_none());

    // The same id twice is refused too (the id is the deduplication key).
    let m = order(1);
    f.place_orders(std::slice::from_ref(&m), true).await;
    let mut tx = f.store.pool().begin().await.unwrap();
    let dup = f.store.outbox().enqueue(&mut tx, &m).await.unwrap_err();
    drop(tx);
    assert_eq!(dup.kind(), ErrorKind::InvalidMessage, "{dup}");

    for bad in ["x; DROP TABLE y", "Upper", "a.b", "1x", "quote\"d"] {
        let config = StoreConfig::default().tables(TableNames {
            outbox: bad.into(),
            ..TableNames::default()
        });
        let url = match f.dialect() {
            Dialect::Postgres => postgres_url(),
            Dialect::Sqlite => "sqlite::memory:".into(),
        };
        let e = SqlStore::<DB>::connect(&url, config).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Configuration, "{bad}: {e}");
    }
    f.cleanup().await;
}

/// The relay dies between lease and mark-sent (its publish never confirms and the task is
/// aborted): after the lease expires a new relay publishes the row, once.
pub async fn relay_killed_between_lease_and_mark_sent<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let messages: Vec<Message> = (0..5).map(order).collect();
    f.place_orders(&messages, true).await;

    let hanging = Arc::new(Hanging {
        entered: tokio::sync::Notify::new(),
    });
    let doomed = Relay::new(
        f.store.clone(),
        hanging.clone(),
        RelayConfig {
            lease: Duration::from_secs(1),
            ..RelayConfig::default()
        },
    );
    let worker = doomed.spawn();
    tokio::time::timeout(Duration::from_secs(20), hanging.entered.notified())
        .await
        .expect("the doomed relay leased and started publishing");
    worker.abort();
    for m in &messages {
        let entry = f.state_of(m.id()).await.unwrap();
        assert_eq!(entry.state, EntryState::Pending, "not marked sent");
        assert_eq!(entry.attempts, 1, "the leased attempt counts");
    }

    let restarted = relay(&f, RetryPolicy::default());
    let worker = restarted.spawn();
    eventually(Duration::from_secs(30), "publish after restart", || async {
        f.publisher.distinct() == messages.len()
    })
    .await;
    worker.shutdown().await;
    for m in &messages {
        assert_eq!(f.publisher.count(m.id()), 1);
        let entry = f.state_of(m.id()).await.unwrap();
        assert_eq!(entry.state, EntryState::Sent);
        assert_eq!(entry.attempts, 2, "crashed attempt + successful one");
    }

    // A row whose relays keep dying (here: five expired leases already counted) is not
    // leased forever: past max_attempts it is dead, unpublished, with the reason.
    let poison = order(50);
    f.place_orders(std::slice::from_ref(&poison), true).await;
    f.execute(format!(
        "UPDATE {}_outbox SET attempts = 5 WHERE state = 'PENDING'",
        f.prefix
    ))
    .await;
    let s = relay(&f, RetryPolicy::with_max_attempts(5))
        .drain()
        .await
        .unwrap();
    assert_eq!((s.claimed, s.sent, s.dead), (1, 0, 1), "{s:?}");
    let entry = f.state_of(poison.id()).await.unwrap();
    assert_eq!(entry.state, EntryState::Dead);
    assert!(
        entry
            .last_error
            .unwrap()
            .contains("without a publish outcome")
    );
    assert_eq!(f.publisher.count(poison.id()), 0);
    f.cleanup().await;
}

/// A publisher whose confirms wait for a gate: holds the relay inside a batch.
struct Gated {
    inner: Arc<dyn Publisher>,
    entered: tokio::sync::Notify,
    open: tokio::sync::watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl Publisher for Gated {
    async fn publish(&self, message: &Message) -> surety_core::Result<surety_core::Receipt> {
        self.entered.notify_one();
        let mut open = self.open.clone();
        open.wait_for(|open| *open).await.expect("gate kept");
        self.inner.publish(message).await
    }
}

/// A running relay leases the next batch while one publishes; shut down, it hands the
/// batch leased ahead back (lease and attempt undone) instead of sitting on it until the
/// lease expires. Nothing is lost or published twice.
pub async fn relay_shut_down_hands_back_the_batch_leased_ahead<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let messages: Vec<Message> = (0..30).map(order).collect();
    f.place_orders(&messages, true).await;
    let (gate, open) = tokio::sync::watch::channel(false);
    let gated = Arc::new(Gated {
        inner: f.publisher(),
        entered: tokio::sync::Notify::new(),
        open,
    });
    let worker = Relay::new(
        f.store.clone(),
        gated.clone(),
        RelayConfig {
            batch_size: 10,
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_millis(20),
            ..RelayConfig::default()
        },
    )
    .spawn();
    tokio::time::timeout(Duration::from_secs(20), gated.entered.notified())
        .await
        .expect("the relay leased a batch and started publishing");
    let leased = format!(
        "SELECT COUNT(*) FROM {}_outbox WHERE lease_owner IS NOT NULL",
        f.prefix
    );
    eventually(
        Duration::from_secs(20),
        "the next batch leased ahead",
        || async { f.scalar(leased.clone()).await == 20 },
    )
    .await;
    assert_eq!(
        f.publisher.total(),
        0,
        "the first batch still waits for its confirms"
    );

    let stopping = tokio::spawn(worker.shutdown());
    gate.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the relay stopped after its batch")
        .unwrap();

    assert_eq!(
        f.publisher.total(),
        10,
        "only the batch in flight was published"
    );
    assert_eq!(
        f.scalar(leased).await,
        0,
        "no row stays leased by a stopped relay"
    );
    let counts = f.store.counts().await.unwrap();
    assert_eq!(counts.get(&EntryState::Sent), Some(&10), "{counts:?}");
    assert_eq!(counts.get(&EntryState::Pending), Some(&20), "{counts:?}");
    for m in &messages {
        let entry = f.state_of(m.id()).await.unwrap();
        if entry.state == EntryState::Pending {
            assert_eq!(
                entry.attempts, 0,
                "the attempt of the handed-back lease is undone"
            );
        }
    }

    let rest = relay(&f, RetryPolicy::default()).drain().await.unwrap();
    assert_eq!(rest.sent, 20, "{rest:?}");
    for m in &messages {
        assert_eq!(f.publisher.count(m.id()), 1, "published once: {}", m.id());
    }
    f.cleanup().await;
}

/// A refused destination: attempts up to the maximum (counted in the table and surviving
/// a relay restart), backoff honoured, then DEAD with the last error; re-drive publishes.
pub async fn refused_destination_dead_and_redrive<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let m = Message::new("not-declared-yet", "payload");
    let ok = order(1);
    f.place_orders(&[m.clone(), ok.clone()], true).await;

    // First relay: a long backoff, to see the row scheduled and not retried at once.
    let slow = relay(
        &f,
        RetryPolicy::with_max_attempts(4)
            .backoff(Duration::from_secs(3600), Duration::from_secs(3600))
            .jitter(0.0),
    );
    let s = slow.run_once().await.unwrap();
    assert_eq!(
        (s.claimed, s.sent, s.retried, s.dead),
        (2, 1, 1, 0),
        "{s:?}"
    );
    let entry = f.state_of(m.id()).await.unwrap();
    assert_eq!(entry.state, EntryState::Pending);
    assert_eq!(entry.attempts, 1);
    assert!(
        entry.last_error.as_deref().unwrap().contains("unroutable"),
        "{entry:?}"
    );
    assert!(entry.due_at > std::time::SystemTime::now() + Duration::from_secs(3000));
    assert_eq!(
        slow.run_once().await.unwrap().claimed,
        0,
        "backoff honoured"
    );
    drop(slow);

    // Let the hour pass, then a new relay (a restart) with no backoff.
    f.execute(format!(
        "UPDATE {}_outbox SET due_at = 0 WHERE state = 'PENDING'",
        f.prefix
    ))
    .await;
    let second = relay(&f, fast_retry(4));
    let s = second.run_once().await.unwrap();
    assert_eq!((s.retried, s.dead), (1, 0));
    assert_eq!(f.state_of(m.id()).await.unwrap().attempts, 2);
    drop(second);

    let third = relay(&f, fast_retry(4));
    let s = third.run_once().await.unwrap();
    assert_eq!((s.retried, s.dead), (1, 0));
    let s = third.run_once().await.unwrap();
    assert_eq!((s.retried, s.dead), (0, 1), "the 4th attempt is the last");
    assert_eq!(third.run_once().await.unwrap().claimed, 0);

    let entry = f.state_of(m.id()).await.unwrap();
    assert_eq!(entry.state, EntryState::Dead);
    assert_eq!(
        entry.attempts, 4,
        "attempt counts survived two relay restarts"
    );
    let dead = f.store.outbox().dead(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id(), m.id());
    let stored = &dead[0].message;
    assert_eq!(
        (
            stored.destination(),
            stored.key(),
            stored.headers(),
            stored.payload(),
            stored.created_at_millis()
        ),
        (
            m.destination(),
            m.key(),
            m.headers(),
            m.payload(),
            m.created_at_millis()
        ),
        "the stored message round-trips"
    );
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("not-declared-yet")
    );
    assert_eq!(f.publisher.count(m.id()), 0);

    // Fix the topology, re-drive.
    f.broker
        .declare(&Topology::new("not-declared-yet").group(GROUP))
        .await
        .unwrap();
    assert!(f.store.outbox().redrive(m.id()).await.unwrap());
    assert!(
        !f.store.outbox().redrive(m.id()).await.unwrap(),
        "no longer dead"
    );
    let s = third.drain().await.unwrap();
    assert_eq!(s.sent, 1);
    assert_eq!(f.publisher.count(m.id()), 1);
    assert_eq!(f.publisher.count(ok.id()), 1);
    let entry = f.state_of(m.id()).await.unwrap();
    assert_eq!(entry.state, EntryState::Sent);
    assert_eq!(entry.attempts, 1, "re-drive resets attempts");
    assert_eq!(entry.last_error, None);
    f.cleanup().await;
}

/// Each message delivered twice (also concurrently) applies its effect once; an effect
/// that fails rolls its key back; old keys are cleaned up.
pub async fn inbox_applies_each_effect_once<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let messages: Vec<Message> = (0..40).map(order).collect();
    let insert = format!("INSERT INTO {}_effects (message_id) VALUES ($1)", f.prefix);
    let inbox = f.store.inbox();

    let mut applied = 0;
    let mut duplicates = 0;
    for m in &messages {
        let one = |m: Message| {
            let inbox = inbox.clone();
            let insert = insert.clone();
            async move {
                inbox
                    .process(GROUP, &m, |tx| {
                        let id = m.id().as_str().to_owned();
                        Box::pin(async move {
                            DB::exec_on(tx, insert, Some(id)).await.map_err(|e| {
                                surety_core::Error::new(ErrorKind::Storage, "effect").with_source(e)
                            })?;
                            Ok(7)
                        })
                    })
                    .await
                    .unwrap()
            }
        };
        // Two deliveries of one message racing each other.
        let (a, b) = tokio::join!(one(m.clone()), one(m.clone()));
        for outcome in [a, b] {
            match outcome {
                InboxOutcome::Applied(7) => applied += 1,
                InboxOutcome::Duplicate => duplicates += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    // A failing effect leaves no key: the redelivery applies it.
    let m = order(999);
    let failed = inbox
        .process(GROUP, &m, |_tx| {
            Box::pin(async { Err::<(), _>(surety_core::Error::new(ErrorKind::Storage, "boom")) })
        })
        .await
        .unwrap_err();
    assert_eq!(failed.message(), "boom");
    let again = inbox
        .process(GROUP, &m, |_tx| Box::pin(async { Ok(()) }))
        .await
        .unwrap();
    assert_eq!(again, InboxOutcome::Applied(()));
    // Another consumer has its own keys.
    let other = inbox
        .process("audit", &messages[0], |_tx| Box::pin(async { Ok(()) }))
        .await
        .unwrap();
    assert_eq!(other, InboxOutcome::Applied(()));
    assert_eq!(applied, 40);
    assert_eq!(duplicates, 40);
    let effects = f
        .scalar(format!("SELECT COUNT(*) FROM {}_effects", f.prefix))
        .await;
    assert_eq!(effects, 40, "each effect applied once");

    // Retention: a zero window expires every key older than now.
    let store = f
        .reopen_with(StoreConfig::default().retention(Duration::from_secs(3600), Duration::ZERO))
        .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cleaned = store.cleanup().await.unwrap();
    assert_eq!(cleaned.inbox_keys, 42, "{cleaned:?}");
    store.close().await;
    f.cleanup().await;
}

/// Half messages through the store: commit publishes, rollback never does, Unknown is
/// resolved by the checker, an unanswered row is rolled back or dead after max checks.
pub async fn prepared_messages_and_check_back<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let committed_ids = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let answers = committed_ids.clone();
    let check_back = Arc::new(check_back_fn(move |m: Message| {
        let answers = answers.clone();
        async move {
            if m.header("undecided").is_some() {
                TxState::Unknown
            } else if answers.lock().unwrap().contains(m.id()) {
                TxState::Commit
            } else {
                TxState::Rollback
            }
        }
    }));
    let checker_config = CheckerConfig {
        check_timeout: Duration::ZERO,
        check_interval: Duration::ZERO,
        max_checks: 3,
        on_exhausted: CheckExhausted::Dead,
        ..CheckerConfig::default()
    };
    let tp = SqlTransactionalPublisher::new(
        f.store.clone(),
        f.publisher(),
        "orders-producer",
        check_back.clone(),
        CheckerConfig {
            check_timeout: Duration::from_secs(3600),
            ..checker_config.clone()
        },
        RelayConfig::default(),
    )
    .unwrap();

    // Commit: published once through the fast path.
    let a = order(1);
    let local: LocalTransaction<'_> = Box::pin(async { TxState::Commit });
    let out = tp.send_in_transaction(&a, local).await.unwrap();
    assert!(matches!(out, TxOutcome::Committed(_)), "{out:?}");
    assert_eq!(f.publisher.count(a.id()), 1);
    assert_eq!(f.state_of(a.id()).await.unwrap().state, EntryState::Sent);

    // Rollback: gone, never published.
    let b = order(2);
    let out = tp
        .send_in_transaction(&b, Box::pin(async { TxState::Rollback }))
        .await
        .unwrap();
    assert_eq!(out, TxOutcome::RolledBack);
    assert!(f.state_of(b.id()).await.is_none());

    // Unknown, and a panicking local transaction: prepared, invisible to the relay.
    let c = order(3);
    let d = order(4);
    assert_eq!(
        tp.send_in_transaction(&c, Box::pin(async { TxState::Unknown }))
            .await
            .unwrap(),
        TxOutcome::Pending
    );
    assert_eq!(
        tp.send_in_transaction(&d, Box::pin(async { panic!("local transaction crashed") }))
            .await
            .unwrap(),
        TxOutcome::Pending
    );
    assert_eq!(
        tp.relay().drain().await.unwrap().claimed,
        0,
        "prepared rows are not due"
    );
    assert_eq!(
        f.state_of(c.id()).await.unwrap().state,
        EntryState::Prepared
    );
    // The publisher's own checker waits for its check timeout (an hour here).
    assert_eq!(tp.checker().run_once().await.unwrap(), Default::default());

    // An hour later (the publisher process is gone), another process's checker asks:
    // c committed, d rolled back.
    f.execute(format!(
        "UPDATE {}_outbox SET due_at = 0 WHERE state = 'PREPARED'",
        f.prefix
    ))
    .await;
    committed_ids.lock().unwrap().insert(c.id().clone());
    let checker = Checker::new(
        f.store.clone(),
        "orders-producer",
        check_back.clone(),
        checker_config.clone(),
    )
    .unwrap();
    let s = checker.run_once().await.unwrap();
    assert_eq!((s.checked, s.committed, s.rolled_back), (2, 1, 1), "{s:?}");
    assert!(f.state_of(d.id()).await.is_none());
    let relay = relay(&f, RetryPolicy::default());
    assert_eq!(relay.drain().await.unwrap().sent, 1);
    assert_eq!(f.publisher.count(c.id()), 1);
    assert_eq!(f.publisher.count(d.id()), 0);

    // Never answered: three checks, then dead (as configured), listed for an operator.
    let e = order(5).with_header("undecided", "yes");
    let prepared = f.store.prepared();
    prepared
        .prepare("orders-producer", &e, Duration::ZERO)
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(checker.run_once().await.unwrap().unknown, 1);
    }
    let s = checker.run_once().await.unwrap();
    assert_eq!((s.checked, s.exhausted), (0, 1));
    let entry = f.state_of(e.id()).await.unwrap();
    assert_eq!(entry.state, EntryState::Dead);
    assert_eq!(entry.checks, 4);
    assert!(entry.last_error.unwrap().contains("no check-back answer"));
    // Other groups' checkers do not see it; rollback-on-exhaustion deletes.
    let g = order(6).with_header("undecided", "yes");
    prepared
        .prepare("orders-producer", &g, Duration::ZERO)
        .await
        .unwrap();
    let other_group = Checker::new(
        f.store.clone(),
        "someone-else",
        check_back.clone(),
        checker_config.clone(),
    )
    .unwrap();
    assert_eq!(other_group.run_once().await.unwrap(), Default::default());
    let rollbacker = Checker::new(
        f.store.clone(),
        "orders-producer",
        check_back,
        CheckerConfig {
            max_checks: 1,
            on_exhausted: CheckExhausted::Rollback,
            ..checker_config
        },
    )
    .unwrap();
    rollbacker.run_once().await.unwrap();
    assert_eq!(rollbacker.run_once().await.unwrap().exhausted, 1);
    assert!(f.state_of(g.id()).await.is_none());
    assert_eq!(f.publisher.count(g.id()), 0);

    // Explicit prepare / commit / rollback.
    let h = order(7);
    let id = prepared
        .prepare("orders-producer", &h, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(prepared.commit(id).await.unwrap());
    assert!(!prepared.rollback(id).await.unwrap(), "already committed");
    assert_eq!(relay.drain().await.unwrap().sent, 1);
    assert_eq!(f.publisher.count(h.id()), 1);
    f.cleanup().await;
}

/// A check-back that never answers is `Unknown` after the checker's check-back timeout
/// and does not hold up the row behind it, which commits in the same pass. Without the
/// bound the pass never ends (the test's 10 s limit fails it).
pub async fn a_hung_check_back_is_unknown_within_its_timeout<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let check_back = Arc::new(check_back_fn(|m: Message| async move {
        if m.header("hang").is_some() {
            std::future::pending::<()>().await;
        }
        TxState::Commit
    }));
    let checker = Checker::new(
        f.store.clone(),
        "orders-producer",
        check_back,
        CheckerConfig {
            check_timeout: Duration::ZERO,
            check_interval: Duration::ZERO,
            check_back_timeout: Duration::from_millis(200),
            ..CheckerConfig::default()
        },
    )
    .unwrap();
    let prepared = f.store.prepared();
    let (hung, fine) = (order(1).with_header("hang", "yes"), order(2));
    for m in [&hung, &fine] {
        prepared
            .prepare("orders-producer", m, Duration::ZERO)
            .await
            .unwrap();
    }
    let pass = tokio::time::timeout(Duration::from_secs(10), checker.run_once())
        .await
        .expect("a hung check-back held the checker's pass")
        .unwrap();
    assert_eq!(
        (pass.checked, pass.unknown, pass.committed),
        (2, 1, 1),
        "{pass:?}"
    );
    assert_eq!(
        f.state_of(hung.id()).await.unwrap().state,
        EntryState::Prepared
    );
    assert_ne!(
        f.state_of(fine.id()).await.unwrap().state,
        EntryState::Prepared
    );
    f.cleanup().await;
}

/// The database is gone: typed errors, nothing marked sent.
pub async fn database_down<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let m = order(1);
    f.place_orders(std::slice::from_ref(&m), true).await;
    let relay = relay(&f, RetryPolicy::default());
    let pool_closed = f.store.clone();
    pool_closed.close().await;
    let e = relay.run_once().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert_eq!(f.publisher.count(m.id()), 0);

    if let Some(url) = DB::unreachable_url() {
        let e = SqlStore::<DB>::connect(url, StoreConfig::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable());
        assert!(!e.to_string().contains("secret-password"), "{e}");
        assert!(!format!("{e:?}").contains("secret-password"), "{e:?}");
    }
    // Reopen to clean up.
    let mut f = f;
    f.store = f.reopen().await;
    f.cleanup().await;
}

/// A read-only database (a standby after a failover, a disk remounted read-only): enqueue
/// and the relay fail with a typed, retryable error, nothing is published or marked sent,
/// and once the database takes writes again the relay publishes every row once.
pub async fn database_read_only<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let committed: Vec<Message> = (0..5).map(order).collect();
    f.place_orders(&committed, true).await;
    let read_only = f.read_only().await;

    let late = order(99);
    let mut tx = read_only.pool().begin().await.unwrap();
    let e = read_only
        .outbox()
        .enqueue(&mut tx, &late)
        .await
        .unwrap_err();
    drop(tx);
    assert_eq!(e.kind(), ErrorKind::Storage, "{e}");
    assert!(
        e.is_retryable(),
        "a read-only database may become writable: {e}"
    );

    let e = relay_on(&read_only, &f, RetryPolicy::default())
        .run_once()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Storage, "{e}");
    assert!(e.is_retryable(), "{e}");
    read_only.close().await;
    for m in &committed {
        assert_eq!(
            f.publisher.count(m.id()),
            0,
            "published from a read-only pass"
        );
        let entry = f.state_of(m.id()).await.unwrap();
        assert_eq!(entry.state, EntryState::Pending);
        assert_eq!(entry.attempts, 0, "a failed lease counted an attempt");
    }
    assert!(f.state_of(late.id()).await.is_none());

    let stats = relay(&f, RetryPolicy::default()).drain().await.unwrap();
    assert_eq!(stats.sent, 5, "{stats:?}");
    for m in &committed {
        assert_eq!(f.publisher.count(m.id()), 1);
    }
    f.cleanup().await;
}

/// The database goes away after the broker confirmed a batch and before the relay marked it
/// sent: the relay reports the error, and a relay started later publishes the batch again
/// (at least once; the consumer's inbox absorbs the repeat). Nothing is lost.
pub async fn database_lost_between_confirm_and_mark_sent<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let committed: Vec<Message> = (0..4).map(order).collect();
    f.place_orders(&committed, true).await;

    // A store of its own, closed by the publisher right after the broker's confirm.
    let doomed = f.reopen().await;
    let closing = Arc::new(CloseAfterConfirm {
        inner: f.publisher(),
        store: doomed.clone(),
    });
    let first = Relay::new(
        doomed.clone(),
        closing,
        RelayConfig {
            batch_size: 50,
            lease: Duration::from_millis(300),
            poll_interval: Duration::from_millis(20),
            retry: RetryPolicy::default(),
            owner: None,
        },
    );
    let e = first.run_once().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    for m in &committed {
        assert_eq!(f.publisher.count(m.id()), 1, "confirmed once");
        let entry = f.state_of(m.id()).await.unwrap();
        assert_eq!(
            entry.state,
            EntryState::Pending,
            "marked sent without a database"
        );
    }

    // After the lease runs out, a restarted relay publishes the batch again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stats = relay(&f, RetryPolicy::default()).drain().await.unwrap();
    assert_eq!(stats.sent, 4, "{stats:?}");
    for m in &committed {
        assert_eq!(
            f.publisher.count(m.id()),
            2,
            "published again after the restart"
        );
        assert_eq!(f.state_of(m.id()).await.unwrap().state, EntryState::Sent);
    }
    f.cleanup().await;
}

fn relay_on<DB: TestDb>(store: &SqlStore<DB>, f: &Fixture<DB>, retry: RetryPolicy) -> Relay<DB> {
    Relay::new(
        store.clone(),
        f.publisher(),
        RelayConfig {
            batch_size: 50,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(20),
            retry,
            owner: None,
        },
    )
}

/// Publishes through `inner`, then closes `store`'s pool: the database is gone between the
/// broker's confirm and the relay's bookkeeping.
struct CloseAfterConfirm<DB: TestDb> {
    inner: Arc<dyn Publisher>,
    store: SqlStore<DB>,
}

#[async_trait::async_trait]
impl<DB: TestDb> Publisher for CloseAfterConfirm<DB> {
    async fn publish(&self, message: &Message) -> surety_core::Result<surety_core::Receipt> {
        let receipt = self.inner.publish(message).await?;
        self.store.close().await;
        Ok(receipt)
    }
}

/// Receipts: `completed` makes the row COMPLETED (a repeat changes nothing); a business
/// failure runs the compensation once however often its receipt arrives; a row without a
/// receipt is published again after the timeout; a stranger on the receipt destination is
/// rejected; completed and failed rows are cleaned up after the retention.
pub async fn receipts<DB: TestDb>() {
    let f = Fixture::<DB>::with_config(|c| {
        c.receipts(Duration::from_millis(300))
            .retention(Duration::from_millis(200), Duration::from_secs(3600))
    })
    .await;
    let messages: Vec<Message> = (0..3).map(order).collect();
    f.place_orders(&messages, true).await;
    let relay = relay(&f, RetryPolicy::default());
    assert_eq!(relay.drain().await.unwrap().sent, 3);

    let receipts = f.store.receipts();
    assert!(receipts.complete(messages[0].id()).await.unwrap());
    assert!(
        !receipts.complete(messages[0].id()).await.unwrap(),
        "a repeat"
    );
    let unknown = order(1000);
    assert!(!receipts.complete(unknown.id()).await.unwrap());
    assert_eq!(
        f.state_of(messages[0].id()).await.unwrap().state,
        EntryState::Completed
    );

    // The compensation writes one row per failed message into the business table.
    let compensation = format!("INSERT INTO {}_effects (message_id) VALUES ($1)", f.prefix);
    let failed = receipt_message(
        &messages[1],
        "orders.receipts",
        &ReceiptOutcome::Failed {
            reason: "out of stock".into(),
        },
    );
    let delivery = Delivery {
        message: failed,
        attempt: 1,
        group: "orders-producer".into(),
    };
    let stranger = Delivery {
        message: Message::new("orders.receipts", "hello"),
        attempt: 1,
        group: "orders-producer".into(),
    };
    let handler = ReceiptHandler::new(&f.store, move |conn, failure: Failure| {
        let (sql, id) = (
            compensation.clone(),
            failure.entry.message.id().as_str().to_owned(),
        );
        Box::pin(async move {
            DB::exec_on(conn, sql, Some(id)).await.map_err(|e| {
                surety_core::Error::new(ErrorKind::Storage, "compensate").with_source(e)
            })
        })
    });
    let mut outcomes = Vec::new();
    for d in [&delivery, &delivery, &stranger] {
        outcomes.push(handler.handle(d).await.unwrap());
    }
    assert_eq!(outcomes[0], Outcome::Ack);
    assert_eq!(outcomes[1], Outcome::Ack);
    assert!(
        matches!(&outcomes[2], Outcome::Reject { reason } if reason.contains("not a receipt")),
        "{:?}",
        outcomes[2]
    );
    let compensations = f
        .scalar(format!(
            "SELECT COUNT(*) FROM {}_effects WHERE message_id = '{}'",
            f.prefix,
            messages[1].id()
        ))
        .await;
    assert_eq!(compensations, 1, "compensated once for two receipts");
    let entry = f.state_of(messages[1].id()).await.unwrap();
    assert_eq!(entry.state, EntryState::Failed);
    assert_eq!(entry.last_error.as_deref(), Some("out of stock"));

    // No receipt for the third: the relay publishes it again after the timeout, and only it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(relay.drain().await.unwrap().sent, 1);
    assert_eq!(f.publisher.count(messages[2].id()), 2);
    assert_eq!(f.publisher.count(messages[0].id()), 1);
    assert_eq!(f.publisher.count(messages[1].id()), 1);
    assert!(receipts.complete(messages[2].id()).await.unwrap());

    tokio::time::sleep(Duration::from_millis(300)).await;
    let cleaned = f.store.cleanup().await.unwrap();
    assert_eq!(cleaned.outbox_rows, 3, "{cleaned:?}");
    for m in &messages {
        assert!(f.state_of(m.id()).await.is_none());
    }

    // A running relay sweeps receipts in a loop of its own: a row without a receipt is
    // published again with nobody calling `drain`.
    let late = order(4);
    f.place_orders(std::slice::from_ref(&late), true).await;
    let worker = relay.spawn();
    eventually(
        Duration::from_secs(30),
        "the running relay to publish a row without a receipt again",
        || async { f.publisher.count(late.id()) >= 2 },
    )
    .await;
    worker.shutdown().await;
    assert!(receipts.complete(late.id()).await.unwrap());
    f.cleanup().await;
}

// Keep the trait in scope for `publish` on the counting publisher in callers.
#[allow(unused)]
fn _publisher_in_scope(p: &dyn Publisher) {}
