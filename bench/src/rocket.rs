//! RocketMQ: Surety's publisher against the raw rocketmq-client-rust sync send.

use std::sync::Arc;
use std::time::Duration;

use cheetah_string::CheetahString;
use futures::FutureExt;
use futures::future::BoxFuture;
use rocketmq_client_rust::{
    ClientConfig, ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, SendStatus,
    TelemetryHandle,
};
use rocketmq_model::common::message::message_single::Message as RmqMessage;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use surety_core::{Broker, Message, Topology};
use surety_rocketmq::{RocketMqBroker, RocketMqConfig};

use crate::measure::{self, Run};
use crate::{Options, Row, fail};

const TOPIC: &str = "surety-bench";

/// The client runtime the raw producer needs injected. It is built on a plain thread
/// (building a runtime inside the caller's async context is refused) and never dropped:
/// its shutdown must run outside an async context, and the process exits right after
/// the benchmark anyway.
fn client_runtime() -> Result<Arc<ClientRuntime>, String> {
    std::thread::spawn(|| -> Result<Arc<ClientRuntime>, String> {
        let owner = RuntimeOwner::plan(RuntimeConfig::for_parallelism("surety-bench", 2))
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

/// A raw producer with the settings Surety's publisher uses (no client retries, 3 s send
/// timeout, plain port).
async fn raw_producer(namesrv: &str) -> Result<Arc<DefaultMQProducer>, String> {
    let runtime = client_runtime()?;
    let mut client = ClientConfig::new();
    client.set_namesrv_addr(CheetahString::from(namesrv));
    client.set_instance_name(CheetahString::from(format!(
        "surety-bench-raw-{}",
        std::process::id()
    )));
    client.set_vip_channel_enabled(false);
    let mut producer = DefaultMQProducer::builder(runtime)
        .client_config(client)
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

/// Scenario 1 on RocketMQ.
pub async fn bench(o: &Options) -> Result<Vec<Row>, String> {
    let config = RocketMqConfig::from_env();
    let namesrv = config.namesrv.clone();
    let broker = RocketMqBroker::connect(config)
        .await
        .map_err(fail("surety rocketmq connect"))?;
    broker
        .declare(&Topology::new(TOPIC))
        .await
        .map_err(fail("declare"))?;
    let publisher = broker.publisher().await.map_err(fail("publisher"))?;
    let raw = raw_producer(&namesrv).await?;
    let payload = o.payload_bytes();

    let raw_run = |messages: usize| {
        measure::windowed(messages, o.window, |_| {
            let producer = raw.clone();
            let message = RmqMessage::builder()
                .topic(TOPIC)
                .body(payload.clone())
                .build_unchecked();
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
        "rocketmq",
        "sync send (DefaultMQProducer)",
        o,
        &raws,
        &sureties,
    );
    if o.outbox {
        let ceiling = rows[0].summary.rate;
        rows.extend(crate::outbox::bench(o, "rocketmq", TOPIC, &publisher, ceiling).await?);
    }
    Ok(rows)
}
