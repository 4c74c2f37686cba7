//! Transactions: half messages (`send_in_transaction`) are invisible until their local
//! transaction commits, an unknown outcome is resolved by the check-back, also after the
//! producer died; a broker-native transaction delivers all of its messages or none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety_core::{
    CheckBack, Message, MessageId, Subscription, SubscriptionHandle, TxOutcome, TxState,
    check_back_fn,
};

use super::CaseResult;
use super::steps::{
    consume_until, exactly_once, fail, fresh, ids, numbered, settle, start, transactional,
};
use crate::support::{Collector, unique_name, wait_until};
use crate::{DELIBERATE_PANIC, Fixture, Observed};

/// A check-back that answers from a shared table, the way an application answers from
/// its database, and counts the questions.
#[derive(Default)]
struct TableCheckBack {
    answers: Mutex<HashMap<MessageId, TxState>>,
    asked: Mutex<HashMap<MessageId, u32>>,
}

impl TableCheckBack {
    fn set(&self, id: &MessageId, state: TxState) {
        self.answers.lock().unwrap().insert(id.clone(), state);
    }

    fn asked(&self, id: &MessageId) -> u32 {
        self.asked.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

#[async_trait::async_trait]
impl CheckBack for TableCheckBack {
    async fn check(&self, message: &Message) -> TxState {
        *self
            .asked
            .lock()
            .unwrap()
            .entry(message.id().clone())
            .or_default() += 1;
        self.answers
            .lock()
            .unwrap()
            .get(message.id())
            .copied()
            .unwrap_or(TxState::Unknown)
    }
}

/// Waits up to the check-back timeout for `done`, then watches for the quiet period.
async fn settle_check_back(
    f: &Fixture,
    handle: SubscriptionHandle,
    done: impl FnMut() -> bool,
) -> bool {
    let held = wait_until(f.check_back_timeout, done).await;
    tokio::time::sleep(f.quiet_period).await;
    handle.shutdown().await;
    held
}

pub(super) async fn transactional_commit_and_rollback(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "tx", &["g"]).await?;
    let check = Arc::new(TableCheckBack::default());
    let producer = transactional(&f, &unique_name("producer"), check.clone()).await?;
    let collector = Collector::acking();
    let handle = start(&f, Subscription::new(&dest, &groups[0]), &collector).await?;
    let commit = Message::new(&dest, "order 1 placed");
    let rollback = Message::new(&dest, "order 2 placed");
    let (cid, rid) = (commit.id().clone(), rollback.id().clone());
    let (quiet, seen, id, table) = (
        f.quiet_period,
        collector.clone(),
        cid.clone(),
        check.clone(),
    );
    let local = Box::pin(async move {
        // The half message must stay invisible while the local transaction runs.
        tokio::time::sleep(quiet).await;
        // Recorded as the application's own transaction would record it, so a check-back
        // gets the same answer.
        let state = if seen.of(&id).is_empty() {
            TxState::Commit
        } else {
            TxState::Rollback
        };
        table.set(&id, state);
        state
    });
    let outcome = producer
        .send_in_transaction(&commit, local)
        .await
        .map_err(fail("send_in_transaction (commit)"))?;
    ensure!(
        matches!(outcome, TxOutcome::Committed(_)),
        "commit outcome {outcome:?}: the half message was visible before the local transaction ended"
    );
    let (table, id) = (check.clone(), rid.clone());
    let local = Box::pin(async move {
        table.set(&id, TxState::Rollback);
        TxState::Rollback
    });
    let outcome = producer
        .send_in_transaction(&rollback, local)
        .await
        .map_err(fail("send_in_transaction (rollback)"))?;
    ensure!(
        outcome == TxOutcome::RolledBack,
        "rollback outcome {outcome:?}"
    );
    let arrived = settle(&f, vec![handle], || !collector.of(&cid).is_empty()).await;
    ensure!(arrived, "the committed message was never delivered");
    ensure!(
        collector.of(&rid).is_empty(),
        "the rolled-back message was delivered"
    );
    let asked = check.asked(&cid) + check.asked(&rid);
    ensure!(
        asked == 0 || f.settled_check_backs,
        "the check-back was asked {asked} times about settled transactions"
    );
    Ok(Observed {
        messages: 2,
        lost: 0,
        duplicated: collector.ledger().duplicated(),
    })
}

pub(super) async fn check_back_resolves_unknown(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "checkback", &["g"]).await?;
    let check = Arc::new(TableCheckBack::default());
    let producer = transactional(&f, &unique_name("producer"), check.clone()).await?;
    let collector = Collector::acking();
    let handle = start(&f, Subscription::new(&dest, &groups[0]), &collector).await?;
    let to_commit = Message::new(&dest, "committed later");
    let to_rollback = Message::new(&dest, "rolled back later");
    let panicked = Message::new(&dest, "local transaction panicked, then committed");
    for m in [&to_commit, &to_rollback] {
        let outcome = producer
            .send_in_transaction(m, Box::pin(async { TxState::Unknown }))
            .await
            .map_err(fail("send_in_transaction"))?;
        ensure!(
            outcome == TxOutcome::Pending,
            "Unknown gave {outcome:?}, expected Pending"
        );
    }
    let crash = Box::pin(async {
        if true {
            panic!("{DELIBERATE_PANIC}: local transaction crashed");
        }
        TxState::Commit
    });
    let outcome = producer
        .send_in_transaction(&panicked, crash)
        .await
        .map_err(fail("send_in_transaction (panic)"))?;
    ensure!(
        outcome == TxOutcome::Pending,
        "a panicking local transaction gave {outcome:?}, expected Pending"
    );
    // The application's database now knows the answers.
    check.set(to_commit.id(), TxState::Commit);
    check.set(panicked.id(), TxState::Commit);
    check.set(to_rollback.id(), TxState::Rollback);
    let (c, r, p) = (
        to_commit.id().clone(),
        to_rollback.id().clone(),
        panicked.id().clone(),
    );
    let resolved = settle_check_back(&f, handle, || {
        check.asked(&r) > 0 && !collector.of(&c).is_empty() && !collector.of(&p).is_empty()
    })
    .await;
    ensure!(
        resolved,
        "check-back did not resolve within {:?} (asked: commit {}, rollback {}, panic {})",
        f.check_back_timeout,
        check.asked(&c),
        check.asked(&r),
        check.asked(&p)
    );
    ensure!(
        collector.of(&r).is_empty(),
        "the message whose check-back said rollback was delivered"
    );
    Ok(Observed {
        messages: 3,
        lost: 0,
        duplicated: collector.ledger().duplicated(),
    })
}

pub(super) async fn check_back_after_producer_dies(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "orphan", &["g"]).await?;
    let producer_group = unique_name("producer");
    let collector = Collector::acking();
    let handle = start(&f, Subscription::new(&dest, &groups[0]), &collector).await?;
    let to_commit = Message::new(&dest, "committed by the dead producer");
    let to_rollback = Message::new(&dest, "rolled back by the dead producer");
    {
        // The first producer knows nothing and dies while its local transactions hang.
        let first = transactional(
            &f,
            &producer_group,
            Arc::new(check_back_fn(|_| async { TxState::Unknown })),
        )
        .await?;
        for m in [&to_commit, &to_rollback] {
            let send = first.send_in_transaction(m, Box::pin(futures::future::pending()));
            let hung = tokio::time::timeout(Duration::from_millis(500), send)
                .await
                .is_err();
            ensure!(hung, "a local transaction that never ends returned");
        }
    }
    // A new producer of the same group, reading the application's database.
    let check = Arc::new(TableCheckBack::default());
    check.set(to_commit.id(), TxState::Commit);
    check.set(to_rollback.id(), TxState::Rollback);
    let _second = transactional(&f, &producer_group, check.clone()).await?;
    let (c, r) = (to_commit.id().clone(), to_rollback.id().clone());
    let resolved = settle_check_back(&f, handle, || {
        check.asked(&r) > 0 && !collector.of(&c).is_empty()
    })
    .await;
    ensure!(
        resolved,
        "the new producer's check-back did not resolve the orphans (asked: commit {}, rollback {})",
        check.asked(&c),
        check.asked(&r)
    );
    ensure!(
        collector.of(&r).is_empty(),
        "the orphan whose check-back said rollback was delivered"
    );
    Ok(Observed {
        messages: 2,
        lost: 0,
        duplicated: collector.ledger().duplicated(),
    })
}

// ---------------------------------------------------------------------------------------
// Broker-native transactions.

pub(super) async fn broker_transaction_is_atomic(f: Fixture) -> CaseResult {
    let (dest, groups) = fresh(&f, "brokertx", &["g"]).await?;
    let aborted = numbered(&dest, 3);
    let committed = numbered(&dest, 3);
    for (messages, commit) in [(&aborted, false), (&committed, true)] {
        let mut tx = f.broker.begin_transaction().await.map_err(fail("begin"))?;
        for m in messages {
            tx.publish(m)
                .await
                .map_err(fail("publish in transaction"))?;
        }
        if commit {
            tx.commit().await.map_err(fail("commit"))?;
        } else {
            tx.abort().await.map_err(fail("abort"))?;
        }
    }
    let ids = ids(&committed);
    let collector = Collector::acking();
    consume_until(&f, Subscription::new(&dest, &groups[0]), &collector, |c| {
        c.ledger().lost(&ids) == 0
    })
    .await?;
    let leaked = aborted
        .iter()
        .filter(|m| !collector.of(m.id()).is_empty())
        .count();
    ensure!(
        leaked == 0,
        "{leaked} messages of an aborted transaction were delivered"
    );
    exactly_once(&collector, &ids, "committed messages")
}
