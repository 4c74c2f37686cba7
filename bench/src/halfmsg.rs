//! Scenario 3 on RabbitMQ and Kafka: Surety's store-backed half messages
//! ([`WithSqlHalfMessages`] on PostgreSQL, as the conformance suite wires them) against
//! Surety's plain confirmed publish on the same broker.
//!
//! Each `send_in_transaction` prepares a row, runs the local transaction (it commits at
//! once: the mechanism's own cost is what is measured), commits the row and publishes it
//! through the relay's fast path before it returns.

use std::sync::Arc;

use bytes::Bytes;
use surety_core::{
    Broker, CheckBack, Message, Publisher, TransactionalPublisher, TxOutcome, TxState,
    check_back_fn,
};
use surety_sql::sqlx::Postgres;
use surety_sql::{CheckerConfig, RelayConfig, WithSqlHalfMessages};

use crate::measure::{self, Reset, Run};
use crate::outbox::{exec, store_with};
use crate::{Options, Row, fail};

/// Tables of the half-message store, apart from the relay scenario's outbox.
const PREFIX: &str = "surety_bench_tx";
const CLEAR: &str = "DELETE FROM surety_bench_tx_outbox";
const GROUP: &str = "surety-bench";

/// `send_in_transaction` of `messages` messages, `window` in flight, each with a local
/// transaction that commits.
pub async fn send_in_transaction(
    publisher: &Arc<dyn TransactionalPublisher>,
    destination: &str,
    payload: &Bytes,
    messages: usize,
    window: usize,
) -> Result<Run, String> {
    measure::windowed(messages, window, |_| {
        let message = Message::new(destination, payload.clone());
        async move {
            let outcome = publisher
                .send_in_transaction(&message, Box::pin(async { TxState::Commit }))
                .await
                .map_err(fail("send_in_transaction"))?;
            match outcome {
                TxOutcome::Committed(_) => Ok(()),
                other => Err(format!(
                    "send_in_transaction ended {other:?}, not committed"
                )),
            }
        }
    })
    .await
}

/// Store-backed half messages against plain publishes on `inner`. `reset` (the broker's
/// own, e.g. a queue purge) runs after each run, with the store's table cleared.
pub async fn bench(
    o: &Options,
    broker_name: &'static str,
    inner: Arc<dyn Broker>,
    destination: &str,
    plain: &Arc<dyn Publisher>,
    reset: Option<&Reset<'_>>,
) -> Result<Vec<Row>, String> {
    let store = store_with::<Postgres>(PREFIX).await?;
    exec(&store, CLEAR).await?;
    let wrapped = WithSqlHalfMessages::new(
        inner,
        store.clone(),
        CheckerConfig::default(),
        RelayConfig::default(),
    );
    // Every local transaction commits, so a check-back (never expected) says so too.
    let check_back: Arc<dyn CheckBack> = Arc::new(check_back_fn(|_| async { TxState::Commit }));
    let tx = wrapped
        .transactional_publisher(GROUP, check_back)
        .await
        .map_err(fail("transactional publisher"))?;
    let payload = o.payload_bytes();
    let both: Reset<'_> = Box::new(|| {
        let store = &store;
        Box::pin(async move {
            if let Some(reset) = reset {
                reset().await?;
            }
            exec(store, CLEAR).await
        })
    });
    let runs = measure::alternate(
        o.repetitions,
        o.warmup().min(o.tx_messages),
        &[
            (
                o.tx_messages,
                measure::surety_workload(plain, destination, &payload, o.window),
            ),
            (
                o.tx_messages,
                measure::workload(|n| send_in_transaction(&tx, destination, &payload, n, o.window)),
            ),
        ],
        Some(&both),
    )
    .await?;
    // Stops the publisher's checker and relay before the store closes.
    drop(tx);
    store.close().await;
    Ok(crate::pair(
        3,
        broker_name,
        ("surety: Publisher::publish", &runs[0]),
        (
            "surety: send_in_transaction, store-backed half message (PostgreSQL)",
            &runs[1],
        ),
        o.tx_messages,
        o.window,
        o.payload,
        "no goal",
    ))
}
