//! RocketMQ: Surety's publisher against the raw rocketmq-client-rust sync send
//! (scenario 1), native half messages + commit against plain sends, raw and Surety (3),
//! then the relay (4), the inbox (5) and end-to-end latency (6) through this broker.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cheetah_string::CheetahString;
use futures::FutureExt;
use futures::future::BoxFuture;
use rocketmq_client_rust::{
    ClientConfig, ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, LocalTransactionState,
    SendStatus, TelemetryHandle, TransactionListener, TransactionMQProducer,
};
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message as RmqMessage;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use surety_core::{
    Broker, CheckBack, Publisher, Topology, TransactionalPublisher, TxState, check_back_fn,
};
use surety_rocketmq::{RocketMqBroker, RocketMqConfig};

use crate::measure::{self, Workload};
use crate::{Options, Row, fail};

const TOPIC: &str = "surety-bench";

/// The client runtime the raw producer needs injected. It is built on a plain thread
/// (building a runtime inside the caller's async context is refused) and never dropped:
/// its shutdown must run outside an async context, and the process exits right after
/// the benchmark anyway.
fn client_runtime() -> Result<Arc<ClientRuntime>, String> {
    std::thread::spawn(|| -> Result<Arc<ClientRuntime>, String> {
        // The blocking lane sized as Surety's adapter sizes it (adapters/rocketmq/src/
        // host.rs): the transaction listener runs there, and the default lane (2 × cores
        // slots) refuses a window of half messages, which the client reports as `Unknown`.
        let mut config = RuntimeConfig::for_parallelism("surety-bench", 2);
        config.max_blocking_threads = 512;
        let lane = &mut config.blocking_lane_policies.metadata_io;
        lane.max_concurrency = 384;
        lane.max_queue_depth = 4096;
        lane.queue_timeout = Duration::from_secs(60);
        let owner = RuntimeOwner::plan(config)
            .map_err(fail("rocketmq runtime plan"))?
            .build()
            .map_err(fail("rocketmq runtime"))?;
        let runtime = ClientRuntime::try_new(
            owner.root_context().component("client"),
            ClientRuntimeConfig::default(),
            TelemetryHandle::noop(),
        )
        .map_err(fail("rocketmq client runtime"))?;
        std::mem::forget(owner);
        Ok(runtime)
    })
    .join()
    .map_err(|_| "rocketmq runtime start-up thread panicked".to_owned())?
}

fn raw_client_config(namesrv: &str, what: &str) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set_namesrv_addr(CheetahString::from(namesrv));
    client.set_instance_name(CheetahString::from(format!(
        "surety-bench-{what}-{}",
        std::process::id()
    )));
    client.set_vip_channel_enabled(false);
    client
}

/// A raw producer with the settings Surety's publisher uses (no client retries, 3 s send
/// timeout, plain port).
async fn raw_producer(
    runtime: Arc<ClientRuntime>,
    namesrv: &str,
) -> Result<Arc<DefaultMQProducer>, String> {
    let mut producer = DefaultMQProducer::builder(runtime)
        .client_config(raw_client_config(namesrv, "raw"))
        .producer_group(format!("surety-bench-raw-{}", std::process::id()))
        .name_server_addr(namesrv)
        .send_msg_timeout(Duration::from_secs(3).as_millis() as u32)
        .retry_times_when_send_failed(0)
        .retry_times_when_send_async_failed(0)
        .retry_another_broker_when_not_store_ok(false)
        .build();
    let start: BoxFuture<'_, _> = producer.start().boxed();
    start.await.map_err(fail("raw producer start"))?;
    Ok(Arc::new(producer))
}

/// The raw transactional producer's listener: every local transaction commits.
struct CommitAll;

impl TransactionListener for CommitAll {
    fn execute_local_transaction(
        &self,
        _msg: &dyn MessageTrait,
        _arg: Option<&(dyn std::any::Any + Send + Sync)>,
    ) -> LocalTransactionState {
        LocalTransactionState::CommitMessage
    }

    fn check_local_transaction(&self, _msg: &MessageExt) -> LocalTransactionState {
        LocalTransactionState::CommitMessage
    }
}

/// A raw transactional producer with the same settings.
async fn raw_tx_producer(
    runtime: Arc<ClientRuntime>,
    namesrv: &str,
) -> Result<Arc<TransactionMQProducer>, String> {
    let mut producer = TransactionMQProducer::builder(runtime)
        .client_config(raw_client_config(namesrv, "raw-tx"))
        .producer_group(format!("surety-bench-raw-tx-{}", std::process::id()))
        .name_server_addr(namesrv)
        .send_msg_timeout(Duration::from_secs(3).as_millis() as u32)
        .retry_times_when_send_failed(0)
        .retry_another_broker_when_not_store_ok(false)
        .transaction_listener(CommitAll)
        .build();
    let start: BoxFuture<'_, _> = producer.start().boxed();
    start
        .await
        .map_err(fail("raw transactional producer start"))?;
    Ok(Arc::new(producer))
}

fn raw_message(payload: &Bytes) -> RmqMessage {
    RmqMessage::builder()
        .topic(TOPIC)
        .body(payload.clone())
        .build_unchecked()
}

/// Raw sync sends, `window` in flight.
fn raw_workload<'a>(
    producer: &'a Arc<DefaultMQProducer>,
    payload: &'a Bytes,
    window: usize,
) -> Workload<'a> {
    measure::workload(move |n| {
        measure::windowed(n, window, move |_| {
            let producer = producer.clone();
            let message = raw_message(payload);
            // Boxed: the client's futures nest deeper than the default recursion limit.
            let send: BoxFuture<'static, Result<(), String>> = async move {
                match producer.send(message).await {
                    Ok(Some(r)) if r.send_status == SendStatus::SendOk => Ok(()),
                    Ok(Some(r)) => Err(format!("raw rocketmq send: {:?}", r.send_status)),
                    Ok(None) => Err("raw rocketmq send: no result".to_owned()),
                    Err(e) => Err(format!("raw rocketmq send: {e}")),
                }
            }
            .boxed();
            send
        })
    })
}

/// Raw half messages + commit, `window` in flight.
fn raw_tx_workload<'a>(
    producer: &'a Arc<TransactionMQProducer>,
    payload: &'a Bytes,
    window: usize,
) -> Workload<'a> {
    measure::workload(move |n| {
        measure::windowed(n, window, move |_| {
            let producer = producer.clone();
            let message = raw_message(payload);
            let send: BoxFuture<'static, Result<(), String>> = async move {
                let r = producer
                    .send_message_in_transaction::<(), _>(message, None)
                    .await
                    .map_err(fail("raw half message"))?;
                let sent = r.send_result.as_ref().map(|s| s.send_status);
                match (sent, r.local_transaction_state) {
                    (Some(SendStatus::SendOk), Some(LocalTransactionState::CommitMessage)) => {
                        Ok(())
                    }
                    other => Err(format!("raw half message ended {other:?}")),
                }
            }
            .boxed();
            send
        })
    })
}

/// Every scenario on RocketMQ.
pub async fn bench(o: &Options) -> Result<Vec<Row>, String> {
    let config = RocketMqConfig::from_env();
    let namesrv = config.namesrv.clone();
    if let Some(v) = crate::machine::installed_version("rocketmq") {
        crate::machine::note_version("RocketMQ", v);
    }
    let concrete = RocketMqBroker::connect(config)
        .await
        .map_err(fail("surety rocketmq connect"))?;
    concrete
        .declare(&Topology::new(TOPIC))
        .await
        .map_err(fail("declare"))?;
    let broker: Arc<dyn Broker> = Arc::new(concrete);
    let publisher: Arc<dyn Publisher> = broker.publisher().await.map_err(fail("publisher"))?;
    let runtime = client_runtime()?;
    let raw = raw_producer(runtime.clone(), &namesrv).await?;
    let payload = o.payload_bytes();
    let raw_name = "raw: sync send (DefaultMQProducer)";
    let mut rows = Vec::new();
    let mut ceiling = None;

    if o.runs(1) || o.runs(3) {
        let mut transactional = None;
        if o.runs(3) {
            let raw_tx = raw_tx_producer(runtime.clone(), &namesrv).await?;
            let check_back: Arc<dyn CheckBack> =
                Arc::new(check_back_fn(|_| async { TxState::Commit }));
            let surety_tx: Arc<dyn TransactionalPublisher> = broker
                .transactional_publisher(
                    &format!("surety-bench-tx-{}", std::process::id()),
                    check_back,
                )
                .await
                .map_err(fail("transactional publisher"))?;
            transactional = Some((raw_tx, surety_tx));
        }
        let mut workloads = vec![
            (o.messages, raw_workload(&raw, &payload, o.window)),
            (
                o.messages,
                measure::surety_workload(&publisher, TOPIC, &payload, o.window),
            ),
        ];
        if let Some((raw_tx, surety_tx)) = &transactional {
            workloads.push((o.tx_messages, raw_tx_workload(raw_tx, &payload, o.window)));
            workloads.push((
                o.tx_messages,
                measure::workload(|n| {
                    crate::halfmsg::send_in_transaction(surety_tx, TOPIC, &payload, n, o.window)
                }),
            ));
        }
        let runs = measure::alternate(o.repetitions, o.warmup(), &workloads, None).await?;
        ceiling = Some(measure::summarise(&runs[0]).rate);
        if o.runs(1) {
            rows.extend(crate::pair(
                1,
                "rocketmq",
                (raw_name, &runs[0]),
                ("surety: Publisher::publish", &runs[1]),
                o.messages,
                o.window,
                o.payload,
                "goal ≥ 0.95",
            ));
        }
        if transactional.is_some() {
            rows.extend(crate::transactional_rows(
                "rocketmq",
                ("raw: sync send (the raw row of 1)", &runs[0]),
                (
                    "raw: native half message + commit (TransactionMQProducer)",
                    &runs[2],
                ),
                ("surety: Publisher::publish (the Surety row of 1)", &runs[1]),
                ("surety: send_in_transaction, native half message", &runs[3]),
                o.tx_messages,
                o.window,
                o.payload,
                "raw half messages",
            ));
        }
    }
    if o.runs(1) {
        let extras = o.extra_payload_bodies();
        rows.extend(
            crate::extra_payload_rows(
                o,
                "rocketmq",
                raw_name,
                &extras,
                |p| raw_workload(&raw, p, o.window),
                |p| measure::surety_workload(&publisher, TOPIC, p, o.window),
                None,
            )
            .await?,
        );
    }
    if o.runs(4) {
        let ceiling = match ceiling {
            Some(c) => c,
            None => raw_workload(&raw, &payload, o.window)(o.messages)
                .await?
                .rate(),
        };
        rows.extend(crate::outbox::bench(o, "rocketmq", TOPIC, &publisher, ceiling).await?);
    }
    if o.runs(5) || o.runs(6) {
        rows.extend(
            Box::pin(crate::consume::bench(
                o,
                "rocketmq",
                broker.clone(),
                TOPIC,
                &publisher,
            ))
            .await?,
        );
    }
    Ok(rows)
}
