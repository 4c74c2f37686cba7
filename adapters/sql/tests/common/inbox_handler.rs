//! The inbox as a handler decorator ([`Inbox::handler`]), on every database.

use std::sync::Arc;
use std::time::Duration;

use surety_core::{Delivery, Error, Handler, Message, Outcome, Subscription};
use surety_sql::{Inbox, InboxOutcome};

use super::*;

fn delivery(message: &Message, attempt: u32) -> Delivery {
    Delivery {
        message: message.clone(),
        attempt,
        group: GROUP.into(),
    }
}

/// A duplicate delivery applies the effect once (counted in
/// `surety_inbox_duplicates_total`), also when both copies race; an effect error rolls
/// back the effect's writes and the key, so the retry applies it; an `InvalidMessage`
/// error rejects the delivery and records nothing; the observer sees each settled
/// outcome; through a real subscription a message delivered twice is applied once.
pub async fn applies_once_and_retries_after_an_error<DB: TestDb>() {
    let f = Fixture::<DB>::new().await;
    let consumer = format!("cart-{}", f.prefix);
    let insert = format!("INSERT INTO {}_effects (message_id) VALUES ($1)", f.prefix);
    let fail_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));

    let (fail, observed) = (fail_next.clone(), seen.clone());
    let handler = Inbox::handler(&f.store, &consumer, move |delivery: &Delivery, tx| {
        let (insert, fail) = (insert.clone(), fail.clone());
        Box::pin(async move {
            if delivery.message.header("poison").is_some() {
                return Err(Error::invalid("not an order"));
            }
            // The effect writes first, so a failure after it shows the write rolled back.
            let id = delivery.message.id().as_str().to_owned();
            DB::exec_on(tx, insert, Some(id))
                .await
                .map_err(|e| Error::new(ErrorKind::Storage, "effect").with_source(e))?;
            if fail.swap(false, Ordering::SeqCst) {
                return Err(Error::new(
                    ErrorKind::Storage,
                    "the effect failed after writing",
                ));
            }
            Ok(delivery.attempt)
        })
    })
    .unwrap()
    .on_outcome(move |delivery, outcome: &InboxOutcome<u32>| {
        let id = delivery.message.id().clone();
        observed.lock().unwrap().push((id, outcome.clone()));
    });
    let effects = |m: &Message| {
        format!(
            "SELECT COUNT(*) FROM {}_effects WHERE message_id = '{}'",
            f.prefix,
            m.id()
        )
    };
    let keys = |m: &Message| {
        format!(
            "SELECT COUNT(*) FROM {}_inbox WHERE consumer_name = '{consumer}' AND message_id = '{}'",
            f.prefix,
            m.id()
        )
    };

    // Delivered twice: applied once, the second acked as a duplicate and counted.
    let a = order(1);
    let before = inbox_duplicates(&consumer);
    assert_eq!(
        handler.handle(&delivery(&a, 1)).await.unwrap(),
        Outcome::Ack
    );
    assert_eq!(
        handler.handle(&delivery(&a, 2)).await.unwrap(),
        Outcome::Ack
    );
    assert_eq!(f.scalar(effects(&a)).await, 1, "the effect applied once");
    assert_eq!(
        inbox_duplicates(&consumer) - before,
        1,
        "the duplicate counted"
    );

    // The effect fails after writing: its write and the key roll back, the delivery is a
    // failure (retried), and the retry applies it once.
    let b = order(2);
    fail_next.store(true, Ordering::SeqCst);
    let e = handler.handle(&delivery(&b, 1)).await.unwrap_err();
    assert!(e.to_string().contains("failed after writing"), "{e}");
    assert_eq!(
        f.scalar(effects(&b)).await,
        0,
        "the effect's write rolled back"
    );
    assert_eq!(f.scalar(keys(&b)).await, 0, "the key rolled back");
    assert_eq!(
        handler.handle(&delivery(&b, 2)).await.unwrap(),
        Outcome::Ack
    );
    assert_eq!(f.scalar(effects(&b)).await, 1, "the retry applied it");
    assert_eq!(f.scalar(keys(&b)).await, 1);
    assert_eq!(
        handler.handle(&delivery(&b, 3)).await.unwrap(),
        Outcome::Ack
    );
    assert_eq!(f.scalar(effects(&b)).await, 1, "and only once");

    // A message no retry can fix is rejected, and leaves no key (a re-drive applies it).
    let poison = order(3).with_header("poison", "yes");
    let outcome = handler.handle(&delivery(&poison, 1)).await.unwrap();
    assert!(
        matches!(&outcome, Outcome::Reject { reason } if reason.contains("not an order")),
        "{outcome:?}"
    );
    assert_eq!(f.scalar(keys(&poison)).await, 0);

    // Two copies racing: one applies, the other is the duplicate.
    let c = order(4);
    let (first, second) = (delivery(&c, 1), delivery(&c, 1));
    let (x, y) = tokio::join!(handler.handle(&first), handler.handle(&second));
    assert_eq!((x.unwrap(), y.unwrap()), (Outcome::Ack, Outcome::Ack));
    assert_eq!(f.scalar(effects(&c)).await, 1, "racing copies applied once");

    // The observer saw every settled delivery, and nothing for the failed or rejected one.
    let seen_now: Vec<_> = seen.lock().unwrap().drain(..).collect();
    let expected_before_race = [
        (a.id().clone(), InboxOutcome::Applied(1)),
        (a.id().clone(), InboxOutcome::Duplicate),
        (b.id().clone(), InboxOutcome::Applied(2)),
        (b.id().clone(), InboxOutcome::Duplicate),
    ];
    assert_eq!(seen_now[..4], expected_before_race);
    let mut race: Vec<_> = seen_now[4..].iter().map(|(_, o)| o.clone()).collect();
    race.sort_by_key(|o| o.is_duplicate());
    assert_eq!(race, [InboxOutcome::Applied(1), InboxOutcome::Duplicate]);

    // Through a subscription: the broker delivers one message twice, the effect runs once.
    let (settled, mut settling) = tokio::sync::mpsc::unbounded_channel();
    let handler = handler.on_outcome(move |_, outcome: &InboxOutcome<u32>| {
        let _ = settled.send(outcome.clone());
    });
    let subscription = f
        .broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(Subscription::new(DEST, GROUP), Arc::new(handler))
        .await
        .unwrap();
    let d = order(5);
    for _ in 0..2 {
        f.publisher.publish(&d).await.unwrap();
    }
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let next = tokio::time::timeout(Duration::from_secs(30), settling.recv())
            .await
            .expect("the subscription settled both deliveries");
        outcomes.push(next.expect("the handler is alive"));
    }
    subscription.shutdown().await;
    // The two copies may be handled concurrently: which one applies is not fixed.
    outcomes.sort_by_key(|o| o.is_duplicate());
    assert_eq!(
        outcomes,
        [InboxOutcome::Applied(1), InboxOutcome::Duplicate]
    );
    assert_eq!(f.scalar(effects(&d)).await, 1);
    f.cleanup().await;
}
