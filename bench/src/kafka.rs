//! Kafka: Surety's publisher against a raw idempotent `FutureProducer` with `acks=all`
//! (scenario 1), transactions per batch against plain sends, raw and Surety, and Surety's
//! store-backed half messages (3), then the relay (4), the inbox (5) and end-to-end
//! latency (6) through this broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use surety_core::{Broker, Message, Publisher, Topology};
use surety_kafka::{KafkaBroker, KafkaConfig};

use crate::measure::{self, Run, Workload};
use crate::{Options, Row, fail};

const TOPIC: &str = "surety-bench";
/// librdkafka's blocking transaction calls wait at most this long.
const TX_TIMEOUT: Duration = Duration::from_secs(30);

/// The raw producer with the same settings as Surety's confirmed publisher (see
/// adapters/kafka/src/config.rs), so that only the wrapper differs; with
/// `transactional_id`, a transactional one.
fn raw_producer(bootstrap: &str, transactional_id: Option<&str>) -> Result<FutureProducer, String> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "surety-bench-raw")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.max.bytes", "1000000");
    if let Some(id) = transactional_id {
        config.set("transactional.id", id);
    }
    config.create().map_err(fail("raw producer"))
}

/// Raw confirmed sends, `window` in flight.
async fn raw_plain(
    producer: &FutureProducer,
    payload: &Bytes,
    messages: usize,
    window: usize,
) -> Result<Run, String> {
    measure::windowed(messages, window, |_| async move {
        producer
            .send(
                FutureRecord::<[u8], [u8]>::to(TOPIC).payload(&payload[..]),
                Timeout::Never,
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| format!("raw kafka send: {e}"))
    })
    .await
}

fn raw_workload<'a>(raw: &'a FutureProducer, payload: &'a Bytes, window: usize) -> Workload<'a> {
    measure::workload(move |n| raw_plain(raw, payload, n, window))
}

/// Runs `batches` of `batch` messages, one after the other, each message's latency
/// being its batch's.
async fn batches<F, Fut>(messages: usize, batch: usize, mut one: F) -> Result<Run, String>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(messages);
    let mut sent = 0;
    while sent < messages {
        let n = batch.max(1).min(messages - sent);
        let t = Instant::now();
        one(n).await?;
        latencies.extend(std::iter::repeat_n(t.elapsed(), n));
        sent += n;
    }
    Ok(Run {
        elapsed: start.elapsed(),
        latencies,
    })
}

/// Raw transactions: begin, `n` sends in flight together, commit.
async fn raw_transactions(
    producer: &Arc<FutureProducer>,
    payload: &Bytes,
    messages: usize,
    batch: usize,
) -> Result<Run, String> {
    batches(messages, batch, |n| async move {
        producer
            .begin_transaction()
            .map_err(fail("begin_transaction"))?;
        let sends = (0..n).map(|_| {
            producer.send(
                FutureRecord::<[u8], [u8]>::to(TOPIC).payload(&payload[..]),
                Timeout::Never,
            )
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(e, _)| format!("raw transactional send: {e}"))?;
        }
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.commit_transaction(TX_TIMEOUT))
            .await
            .map_err(fail("commit task"))?
            .map_err(fail("commit_transaction"))
    })
    .await
}

/// Surety's broker transactions (`Broker::begin_transaction`): begin, `n` publishes,
/// commit. Each `publish` enqueues its record; the delivery reports are read together
/// before the commit, as the raw row does with `join_all`.
async fn surety_transactions(
    broker: &Arc<dyn Broker>,
    payload: &Bytes,
    messages: usize,
    batch: usize,
) -> Result<Run, String> {
    batches(messages, batch, |n| async move {
        let mut tx = broker
            .begin_transaction()
            .await
            .map_err(fail("begin_transaction"))?;
        for _ in 0..n {
            tx.publish(&Message::new(TOPIC, payload.clone()))
                .await
                .map_err(fail("transactional publish"))?;
        }
        tx.commit().await.map_err(fail("commit"))
    })
    .await
}

/// Every scenario on Kafka.
pub async fn bench(o: &Options) -> Result<Vec<Row>, String> {
    let config = KafkaConfig::from_env();
    let bootstrap = config.bootstrap_servers.clone();
    if let Some(v) = crate::machine::installed_version("kafka") {
        crate::machine::note_version("Kafka", v);
    }
    let concrete = KafkaBroker::connect(config)
        .await
        .map_err(fail("surety kafka connect"))?;
    concrete
        .declare(&Topology::new(TOPIC))
        .await
        .map_err(fail("declare"))?;
    let broker: Arc<dyn Broker> = Arc::new(concrete);
    let publisher: Arc<dyn Publisher> = broker.publisher().await.map_err(fail("publisher"))?;
    let raw = raw_producer(&bootstrap, None)?;
    let payload = o.payload_bytes();
    let raw_name = "raw: FutureProducer idempotent, acks=all";
    let mut rows = Vec::new();
    let mut ceiling = None;

    let main_payload = &payload;

    if o.runs(1) || o.runs(3) {
        let raw_tx = if o.runs(3) {
            let id = format!("surety-bench-raw-tx-{}", std::process::id());
            let p = Arc::new(raw_producer(&bootstrap, Some(&id))?);
            let init = p.clone();
            tokio::task::spawn_blocking(move || init.init_transactions(TX_TIMEOUT))
                .await
                .map_err(fail("init task"))?
                .map_err(fail("init_transactions"))?;
            Some(p)
        } else {
            None
        };
        let mut workloads = vec![
            (o.messages, raw_workload(&raw, main_payload, o.window)),
            (
                o.messages,
                measure::surety_workload(&publisher, TOPIC, main_payload, o.window),
            ),
        ];
        if let Some(p) = &raw_tx {
            let batch = o.tx_batch;
            workloads.push((
                o.tx_messages,
                measure::workload(move |n| raw_transactions(p, main_payload, n, batch)),
            ));
            let broker = &broker;
            workloads.push((
                o.tx_messages,
                measure::workload(move |n| surety_transactions(broker, main_payload, n, batch)),
            ));
        }
        let runs = measure::alternate(o.repetitions, o.warmup(), &workloads, None).await?;
        ceiling = Some(measure::summarise(&runs[0]).rate);
        if o.runs(1) {
            rows.extend(crate::pair(
                1,
                "kafka",
                (raw_name, &runs[0]),
                ("surety: Publisher::publish", &runs[1]),
                o.messages,
                o.window,
                o.payload,
                "goal ≥ 0.95",
            ));
        }
        if raw_tx.is_some() {
            let batch = o.tx_batch;
            rows.extend(crate::transactional_rows(
                "kafka",
                ("raw: idempotent send (the raw row of 1)", &runs[0]),
                (
                    &format!("raw: transaction per batch of {batch}, sends in flight together"),
                    &runs[2],
                ),
                ("surety: Publisher::publish (the Surety row of 1)", &runs[1]),
                (
                    &format!(
                        "surety: Broker::begin_transaction per batch of {batch}, reports read before the commit"
                    ),
                    &runs[3],
                ),
                o.tx_messages,
                batch,
                o.payload,
                "raw transactions",
            ));
        }
    }
    if o.runs(1) {
        let extras = o.extra_payload_bodies();
        rows.extend(
            crate::extra_payload_rows(
                o,
                "kafka",
                raw_name,
                &extras,
                |p| raw_workload(&raw, p, o.window),
                |p| measure::surety_workload(&publisher, TOPIC, p, o.window),
                None,
            )
            .await?,
        );
    }
    if o.runs(3) {
        rows.extend(
            crate::halfmsg::bench(o, "kafka", broker.clone(), TOPIC, &publisher, None).await?,
        );
    }
    if o.runs(4) {
        let ceiling = match ceiling {
            Some(c) => c,
            None => raw_plain(&raw, &payload, o.messages, o.window)
                .await?
                .rate(),
        };
        rows.extend(crate::outbox::bench(o, "kafka", TOPIC, &publisher, ceiling).await?);
    }
    if o.runs(5) || o.runs(6) {
        rows.extend(crate::consume::bench(o, "kafka", broker.clone(), TOPIC, &publisher).await?);
    }
    Ok(rows)
}
