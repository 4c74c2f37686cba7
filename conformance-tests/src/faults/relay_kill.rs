//! Scenario 3: the relay killed mid-batch, then a second relay taking over. The first
//! relay is a child process ([`child_relay`]) that is SIGKILLed; on an in-process broker,
//! which dies with its process, it is a task of this process, aborted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use surety_core::{Message, MessageId, Publisher, Receipt};
use surety_sql::{EntryState, Relay, RelayConfig};

use super::children::{CHILD_ADAPTER, CHILD_PREFIX, child_env, kill_child, spawn_child};
use super::harness::{RELAY_BATCH, RELAY_KILL, RELAY_MESSAGES};
use super::pg::{PgInboxEffects, count_rows, store_for};
use super::{
    DyingConsumer, EffectStore, FaultAdapter, FaultRow, declare, faults_wait, setup, stop,
    stop_quietly, subscribe_inbox,
};
use crate::Fixture;
use crate::harness::runtime;

/// A publisher that holds every confirmed batch for a moment before reporting it: the
/// relay's window between the broker's confirm and marking the rows `SENT` becomes
/// wide enough that a kill lands in it.
struct SlowConfirm(Arc<dyn Publisher>);

const CONFIRM_HOLD: Duration = Duration::from_millis(150);

#[async_trait::async_trait]
impl Publisher for SlowConfirm {
    async fn publish(&self, message: &Message) -> surety_core::Result<Receipt> {
        let result = self.0.publish(message).await;
        tokio::time::sleep(CONFIRM_HOLD).await;
        result
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<surety_core::Result<Receipt>> {
        let results = self.0.publish_batch(messages).await;
        tokio::time::sleep(CONFIRM_HOLD).await;
        results
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: RELAY_BATCH,
        // Short, so that the second relay takes the dead relay's rows over in seconds.
        lease: Duration::from_secs(3),
        poll_interval: Duration::from_millis(50),
        ..RelayConfig::default()
    }
}

/// Child: a relay on the scenario's outbox, publishing through the adapter, forever.
pub(super) fn child_relay(
    build: &dyn Fn(&str) -> Result<FaultAdapter, String>,
) -> Result<(), String> {
    let adapter = child_env(CHILD_ADAPTER)?;
    let prefix = child_env(CHILD_PREFIX)?;
    let f = build(&adapter)?.fixture;
    runtime().block_on(async {
        let store = store_for(&prefix).await?;
        let publisher = setup("publisher", f.broker.publisher()).await?;
        let relay = Relay::new(store, Arc::new(SlowConfirm(publisher)), relay_config());
        // As an application runs it: the background loop, which also leases a batch
        // ahead, so the kill leaves that batch leased too.
        let _worker = relay.spawn();
        std::future::pending::<Result<(), String>>().await
    })
}

pub(super) async fn run_relay_kill(
    adapter: &str,
    target: &FaultAdapter,
) -> Result<FaultRow, String> {
    let effects = Arc::new(PgInboxEffects::create().await?);
    let row = relay_kill(adapter, target.in_process, &target.fixture, effects.clone()).await;
    effects.drop_tables().await;
    row
}

async fn relay_kill(
    adapter: &str,
    in_process: bool,
    f: &Fixture,
    effects: Arc<PgInboxEffects>,
) -> Result<FaultRow, String> {
    let mut row = FaultRow::not_run(RELAY_KILL, adapter, "");
    row.ran = true;
    row.messages = RELAY_MESSAGES;
    let store = effects.store.clone();
    let pool = effects.pool().clone();
    let outbox_table = store.config().tables.outbox.clone();
    let (dest, group) = declare(f, "fault-relay").await?;
    let consumer = Arc::new(DyingConsumer::inbox(effects.clone(), &group));
    let handle = subscribe_inbox(f, &dest, &group, consumer.clone()).await?;

    let messages: Vec<Message> = (0..RELAY_MESSAGES)
        .map(|i| Message::new(&dest, format!("outbox {i}")))
        .collect();
    let mut tx = pool.begin().await.map_err(|e| format!("begin: {e}"))?;
    for m in &messages {
        store
            .outbox()
            .enqueue(&mut *tx, m)
            .await
            .map_err(|e| format!("enqueue: {e}"))?;
    }
    tx.commit().await.map_err(|e| format!("commit: {e}"))?;

    let sent = || async {
        store
            .counts()
            .await
            .map(|c| c.get(&EntryState::Sent).copied().unwrap_or(0) as usize)
            .map_err(|e| format!("outbox counts: {e}"))
    };
    let kill_at = RELAY_MESSAGES * 3 / 10;
    let publisher = setup("publisher", f.broker.publisher()).await?;
    // The first relay: a child process (an in-process task on an in-process broker, which
    // lives in this process), killed once 30 % of the rows are sent.
    let mut child = None;
    let mut worker = None;
    if in_process {
        let relay = Relay::new(
            store.clone(),
            Arc::new(SlowConfirm(publisher.clone())),
            relay_config(),
        );
        worker = Some(relay.spawn());
    } else {
        child = Some(spawn_child(
            "relay",
            &[(CHILD_ADAPTER, adapter), (CHILD_PREFIX, &effects.prefix)],
        )?);
    }
    let leased_sql = format!(
        "SELECT COUNT(*) FROM {outbox_table} WHERE state = 'PENDING' AND lease_owner IS NOT NULL"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reached = false;
    while Instant::now() < deadline {
        // Kill mid-batch: enough rows sent, and a batch leased but not yet marked sent
        // (between two batches nothing is in flight and the kill would prove less).
        if sent().await? >= kill_at && count_rows(&pool, leased_sql.clone()).await? > 0 {
            reached = true;
            break;
        }
        if let Some(c) = child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            return Err(format!("the relay child exited by itself ({status})"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(mut c) = child {
        kill_child(&mut c);
    }
    if let Some(w) = worker {
        w.abort();
    }
    let killed_at = Instant::now();
    if !reached {
        stop_quietly(handle).await;
        return Err(format!(
            "the first relay sent only {} of {kill_at} rows within 60 s",
            sent().await?
        ));
    }
    let sent_at_kill = sent().await?;
    let leased_at_kill = count_rows(&pool, leased_sql).await?;

    // The second relay (in this process) takes over, including the dead relay's leased
    // rows once their lease expires.
    let relay = Relay::new(store.clone(), publisher, relay_config());
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut all_sent = false;
    while Instant::now() < deadline {
        if let Err(e) = relay.run_once().await {
            row.failures.push(format!("second relay: {e}"));
            break;
        }
        if sent().await? == RELAY_MESSAGES {
            all_sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<MessageId> = messages.iter().map(|m| m.id().clone()).collect();
    let all_applied = faults_wait(f.delivery_timeout, || {
        ids.iter().all(|id| consumer.has_seen(id))
    })
    .await;
    row.recovery = all_applied.then(|| killed_at.elapsed());
    tokio::time::sleep(f.quiet_period).await;
    if let Err(why) = stop(handle).await {
        row.failures.push(why);
    }

    let counts = effects.applied().await?;
    row.tally_effects(&ids, &counts);
    row.delivered_twice = consumer.duplicates();
    if !all_sent {
        let c = store.counts().await.map_err(|e| format!("counts: {e}"))?;
        row.failures
            .push(format!("not every row is SENT at the end: {c:?}"));
    }
    if leased_at_kill == 0 {
        row.failures.push(
            "no row was leased and unsent at the kill: the kill did not land mid-batch".into(),
        );
    }
    row.note = format!(
        "{} with {sent_at_kill} rows sent and {leased_at_kill} leased in flight; relay batches of {RELAY_BATCH}",
        if in_process {
            "in-process relay task aborted"
        } else {
            "relay process SIGKILLed"
        }
    );
    Ok(row)
}
