//! Scenario 5: the producer killed between its half messages and their commit. The
//! producer is a child process ([`child_producer`]); a new producer of the same group must
//! resolve what it left behind through its check-back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_core::{Broker, Capability, Message, MessageId, TxState, check_back_fn};
use surety_sql::PgStore;
use surety_sql::sqlx::{self, AssertSqlSafe};

use super::children::{
    CHILD_ADAPTER, CHILD_COUNT, CHILD_DEST, CHILD_GROUP, CHILD_PREFIX, child_env, kill_child,
    spawn_child,
};
use super::harness::{PRODUCER_KILL, PRODUCER_MESSAGES};
use super::pg::{PgInboxEffects, count_rows, store_for};
use super::{
    DyingConsumer, EffectStore, FaultAdapter, FaultRow, declare, faults_wait, setup, stop,
    stop_quietly, subscribe_inbox,
};
use crate::Fixture;
use crate::harness::runtime;
use crate::runner::with_sql_half_messages;
use crate::support::unique_name;

/// The broker a producer of half messages uses: its own half messages when it has them
/// (RocketMQ), otherwise the SQL prepared store (RabbitMQ and Kafka, as the conformance
/// runner builds them).
fn half_message_broker(inner: Arc<dyn Broker>, store: PgStore) -> Arc<dyn Broker> {
    if inner.capabilities().supports(Capability::HalfMessages) {
        inner
    } else {
        with_sql_half_messages(inner, store)
    }
}

/// Child: sends half messages whose local transactions commit (a row in the business
/// table) or roll back, record that they ran, then never return, until the parent kills
/// the process. Its own check-back knows nothing (`Unknown`).
pub(super) fn child_producer(
    build: &dyn Fn(&str) -> Result<FaultAdapter, String>,
) -> Result<(), String> {
    let adapter = child_env(CHILD_ADAPTER)?;
    let prefix = child_env(CHILD_PREFIX)?;
    let dest = child_env(CHILD_DEST)?;
    let group = child_env(CHILD_GROUP)?;
    let count: usize = child_env(CHILD_COUNT)?
        .parse()
        .map_err(|e| format!("{CHILD_COUNT}: {e}"))?;
    let f = build(&adapter)?.fixture;
    runtime().block_on(async move {
        let store = store_for(&prefix).await?;
        let pool = store.pool().clone();
        let broker = half_message_broker(f.broker.clone(), store);
        let unknown = Arc::new(check_back_fn(|_m: Message| async { TxState::Unknown }));
        let publisher = setup(
            "transactional publisher",
            broker.transactional_publisher(&group, unknown),
        )
        .await?;
        for i in 0..count {
            let (publisher, pool, prefix) = (publisher.clone(), pool.clone(), prefix.clone());
            let message =
                Message::new(&dest, format!("half {i}")).with_header("seq", i.to_string());
            tokio::spawn(async move {
                let id = message.id().as_str().to_owned();
                let local = Box::pin(async move {
                    if i % 2 == 0 {
                        let _ = sqlx::query(AssertSqlSafe(format!(
                            "INSERT INTO {prefix}_business (message_id) VALUES ($1)"
                        )))
                        .bind(&id)
                        .execute(&pool)
                        .await;
                    }
                    let _ = sqlx::query(AssertSqlSafe(format!(
                        "INSERT INTO {prefix}_started (message_id) VALUES ($1)"
                    )))
                    .bind(&id)
                    .execute(&pool)
                    .await;
                    // Killed here: after the local transaction, before Surety's commit.
                    futures::future::pending::<TxState>().await
                });
                let _ = publisher.send_in_transaction(&message, local).await;
            });
        }
        futures::future::pending::<Result<(), String>>().await
    })
}

pub(super) async fn run_producer_kill(
    adapter: &str,
    target: &FaultAdapter,
) -> Result<FaultRow, String> {
    if target.in_process {
        return Ok(FaultRow::not_run(
            PRODUCER_KILL,
            adapter,
            "in-process broker: killing the producer's process kills the broker and its half messages with it",
        ));
    }
    let effects = Arc::new(PgInboxEffects::create().await?);
    let row = producer_kill(adapter, &target.fixture, effects.clone()).await;
    effects.drop_tables().await;
    row
}

async fn producer_kill(
    adapter: &str,
    f: &Fixture,
    effects: Arc<PgInboxEffects>,
) -> Result<FaultRow, String> {
    let mut row = FaultRow::not_run(PRODUCER_KILL, adapter, "");
    row.ran = true;
    row.messages = PRODUCER_MESSAGES;
    let pool = effects.pool().clone();
    let prefix = effects.prefix.clone();
    for table in ["business", "started"] {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {prefix}_{table} (message_id TEXT PRIMARY KEY)"
        )))
        .execute(&pool)
        .await
        .map_err(|e| format!("create the {table} table: {e}"))?;
    }
    let (dest, group) = declare(f, "fault-half").await?;
    let producer_group = unique_name("pg");
    let consumer = Arc::new(DyingConsumer::inbox(effects.clone(), &group));
    let handle = subscribe_inbox(f, &dest, &group, consumer.clone()).await?;

    let count = PRODUCER_MESSAGES.to_string();
    let mut child = spawn_child(
        "producer",
        &[
            (CHILD_ADAPTER, adapter),
            (CHILD_PREFIX, &prefix),
            (CHILD_DEST, &dest),
            (CHILD_GROUP, &producer_group),
            (CHILD_COUNT, &count),
        ],
    )?;
    let started_sql = format!("SELECT COUNT(*) FROM {prefix}_started");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut started = 0;
    while Instant::now() < deadline {
        started = count_rows(&pool, started_sql.clone()).await?;
        if started as usize >= PRODUCER_MESSAGES {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            stop_quietly(handle).await;
            return Err(format!("the producer child exited by itself ({status})"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill_child(&mut child);
    let killed_at = Instant::now();
    if started == 0 {
        stop_quietly(handle).await;
        return Err("no local transaction ran in the producer child within 60 s".into());
    }
    let committed: HashSet<String> = sqlx::query_scalar::<_, String>(AssertSqlSafe(format!(
        "SELECT message_id FROM {prefix}_business"
    )))
    .fetch_all(&pool)
    .await
    .map_err(|e| format!("read the business table: {e}"))?
    .into_iter()
    .collect();
    let sql_store = !f.broker.capabilities().supports(Capability::HalfMessages);
    let outbox_table = effects.store.config().tables.outbox.clone();
    let prepared_at_kill = if sql_store {
        count_rows(
            &pool,
            format!("SELECT COUNT(*) FROM {outbox_table} WHERE state = 'PREPARED'"),
        )
        .await?
    } else {
        -1
    };

    // A new producer of the same group: its check-back answers from the business table,
    // and counts its commit answers per message.
    let business = format!("{prefix}_business");
    let check_pool = pool.clone();
    let commits: Arc<Mutex<HashMap<MessageId, usize>>> = Arc::default();
    let counted = commits.clone();
    let check_back = Arc::new(check_back_fn(move |m: Message| {
        let (pool, business, counted) = (check_pool.clone(), business.clone(), counted.clone());
        async move {
            let state = match sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {business} WHERE message_id = $1"
            )))
            .bind(m.id().as_str())
            .fetch_one(&pool)
            .await
            {
                Ok(0) => TxState::Rollback,
                Ok(_) => TxState::Commit,
                Err(_) => TxState::Unknown,
            };
            if state == TxState::Commit {
                *counted.lock().unwrap().entry(m.id().clone()).or_default() += 1;
            }
            state
        }
    }));
    let broker = half_message_broker(f.broker.clone(), effects.store.clone());
    let publisher = setup(
        "transactional publisher",
        broker.transactional_publisher(&producer_group, check_back),
    )
    .await?;
    let committed_ids: Vec<MessageId> = committed
        .iter()
        .filter_map(|id| MessageId::parse(id.clone()).ok())
        .collect();
    let resolved = faults_wait(f.check_back_timeout + f.delivery_timeout, || {
        committed_ids.iter().all(|id| consumer.has_seen(id))
    })
    .await;
    row.recovery = resolved.then(|| killed_at.elapsed());
    // Rolled-back half messages are resolved in the same check-back passes: a few more
    // seconds show any that was delivered after all.
    tokio::time::sleep(f.quiet_period.max(Duration::from_secs(5))).await;
    let mut unresolved = 0;
    if sql_store {
        let prepared_sql = format!("SELECT COUNT(*) FROM {outbox_table} WHERE state = 'PREPARED'");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            unresolved = count_rows(&pool, prepared_sql.clone()).await?;
            if unresolved == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop(publisher);
    if let Err(why) = stop(handle).await {
        row.failures.push(why);
    }

    let counts = effects.applied().await?;
    row.tally_effects(&committed_ids, &counts);
    row.delivered_twice = consumer.duplicates();
    // A committed orphan may be delivered once per commit answer, never more. RocketMQ's
    // broker checks a half message again when the op record of the first answer is not
    // visible yet (it writes op records in batches, every transactionOpBatchInterval,
    // 3 s, which is also this rig's check interval), and EndTransactionProcessor commits
    // a second real message for the second answer: each extra delivery here comes with
    // an extra commit answer. The inbox absorbs them (applied twice: 0).
    let commits = commits.lock().unwrap().clone();
    let repeated: usize = commits.values().map(|n| n.saturating_sub(1)).sum();
    if row.delivered_twice > repeated {
        row.failures.push(format!(
            "{} duplicate deliveries, but the check-back answered commit again only {repeated} times",
            row.delivered_twice
        ));
    }
    let wrongly = counts
        .keys()
        .filter(|id| !committed.contains(id.as_str()))
        .count();
    if wrongly > 0 {
        row.failures.push(format!(
            "{wrongly} messages whose local transaction rolled back (or never ran) were delivered"
        ));
    }
    if unresolved > 0 {
        row.failures.push(format!(
            "{unresolved} half messages still prepared at the end"
        ));
    }
    row.note = format!(
        "producer process SIGKILLed after {started} local transactions ({} committed, {} commit answers){}; resolved by a new producer's check-back ({})",
        committed.len(),
        commits.values().sum::<usize>(),
        if sql_store {
            format!(", {prepared_at_kill} half messages prepared at the kill")
        } else {
            String::new()
        },
        if sql_store {
            "SQL prepared store"
        } else {
            "native half messages, broker check-back"
        }
    );
    Ok(row)
}
