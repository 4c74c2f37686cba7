//! Kafka: Surety's publisher against a raw idempotent `FutureProducer` with `acks=all`.

use std::sync::Arc;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use surety_core::{Broker, Message, Topology};
use surety_kafka::{KafkaBroker, KafkaConfig};

use crate::measure::{self, Run};
use crate::{Options, Row, fail};

const TOPIC: &str = "surety-bench";

/// Scenario 1 on Kafka.
pub async fn bench(o: &Options) -> Result<Vec<Row>, String> {
    let config = KafkaConfig::from_env();
    let bootstrap = config.bootstrap_servers.clone();
    let broker = KafkaBroker::connect(config)
        .await
        .map_err(fail("surety kafka connect"))?;
    broker
        .declare(&Topology::new(TOPIC))
        .await
        .map_err(fail("declare"))?;
    let publisher = broker.publisher().await.map_err(fail("publisher"))?;
    // The same producer settings as Surety's confirmed publisher (see
    // adapters/kafka/src/config.rs), so that only the wrapper differs.
    let raw: Arc<FutureProducer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("client.id", "surety-bench-raw")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.max.bytes", "1000000")
            .create()
            .map_err(fail("raw producer"))?,
    );
    let payload = o.payload_bytes();

    let raw_run = |messages: usize| {
        measure::windowed(messages, o.window, |_| {
            let producer = raw.clone();
            let payload = payload.clone();
            async move {
                producer
                    .send(
                        FutureRecord::<[u8], [u8]>::to(TOPIC).payload(&payload[..]),
                        Timeout::Never,
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| format!("raw kafka send: {e}"))
            }
        })
    };
    let surety_run = |messages: usize| {
        measure::windowed(messages, o.window, |_| {
            let publisher = publisher.clone();
            let message = Message::new(TOPIC, payload.clone());
            async move {
                publisher
                    .publish(&message)
                    .await
                    .map(|_| ())
                    .map_err(fail("surety publish"))
            }
        })
    };

    raw_run(o.warmup()).await?;
    surety_run(o.warmup()).await?;
    let (mut raws, mut sureties): (Vec<Run>, Vec<Run>) = (Vec::new(), Vec::new());
    for _ in 0..o.repetitions {
        raws.push(raw_run(o.messages).await?);
        sureties.push(surety_run(o.messages).await?);
    }
    let mut rows = crate::pair(
        "kafka",
        "FutureProducer idempotent, acks=all",
        o,
        &raws,
        &sureties,
    );
    if o.outbox {
        let ceiling = rows[0].summary.rate;
        rows.extend(crate::outbox::bench(o, "kafka", TOPIC, &publisher, ceiling).await?);
    }
    Ok(rows)
}
