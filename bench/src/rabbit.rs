//! RabbitMQ: Surety's publisher against raw lapin, and lapin's confirm strategies against
//! transactions.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use surety_core::{Broker, Message, Publisher, Topology};
use surety_rabbitmq::{RabbitBroker, RabbitConfig};

use crate::measure::{self, Run};
use crate::{Options, Row, fail};

/// The destination's name starts with this and ends with the queue type
/// (`SURETY_RABBITMQ_QUEUE_TYPE`), so quorum and classic runs never share a queue.
const DESTINATION: &str = "surety-bench";
const GROUP: &str = "sink";
/// The articles' claim: transactions cost about 250× the throughput of confirms.
const CLAIM: f64 = 250.0;

/// Everything the RabbitMQ scenarios share.
struct Rig {
    destination: String,
    queue_type: &'static str,
    publisher: Arc<dyn Publisher>,
    router: String,
    confirm: Channel,
    tx: Channel,
    admin: Channel,
    _connection: Connection,
}

async fn rig() -> Result<Rig, String> {
    let config = RabbitConfig::from_env().map_err(fail("rabbitmq config"))?;
    let url = config.url.clone();
    let router = config.router_exchange.clone();
    let queue_type = config.queue_type.as_str();
    let destination = format!("{DESTINATION}-{queue_type}");
    let broker = RabbitBroker::connect(config)
        .await
        .map_err(fail("surety rabbitmq connect"))?;
    // A bound group queue makes every mandatory publish routable.
    broker
        .declare(&Topology::new(destination.as_str()).group(GROUP))
        .await
        .map_err(fail("declare"))?;
    let publisher = broker.publisher().await.map_err(fail("publisher"))?;
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .map_err(fail("lapin connect"))?;
    let confirm = connection.create_channel().await.map_err(fail("channel"))?;
    confirm
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(fail("confirm.select"))?;
    let tx = connection.create_channel().await.map_err(fail("channel"))?;
    tx.tx_select().await.map_err(fail("tx.select"))?;
    let admin = connection.create_channel().await.map_err(fail("channel"))?;
    Ok(Rig {
        destination,
        queue_type,
        publisher,
        router,
        confirm,
        tx,
        admin,
        _connection: connection,
    })
}

impl Rig {
    /// Empties the group queue, so that a run does not pay for the previous run's backlog.
    async fn purge(&self) -> Result<(), String> {
        self.admin
            .queue_purge(
                format!("{}:{GROUP}", self.destination).into(),
                QueuePurgeOptions::default(),
            )
            .await
            .map(|_| ())
            .map_err(fail("queue.purge"))
    }

    /// Starts one persistent mandatory publish through the router, as Surety's adapter
    /// does, and returns the pending confirm.
    async fn start_publish(
        channel: &Channel,
        router: &str,
        destination: &str,
        i: usize,
        payload: &[u8],
    ) -> Result<lapin::PublisherConfirm, String> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(format!("bench-{i}")));
        channel
            .basic_publish(
                router.into(),
                destination.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            )
            .await
            .map_err(fail("basic.publish"))
    }

    async fn raw_windowed(
        &self,
        messages: usize,
        window: usize,
        payload: &Bytes,
    ) -> Result<Run, String> {
        measure::windowed(messages, window, |i| {
            let channel = self.confirm.clone();
            let router = self.router.clone();
            let destination = self.destination.clone();
            let payload = payload.clone();
            async move {
                let pending =
                    Self::start_publish(&channel, &router, &destination, i, &payload).await?;
                confirmed(pending.await.map_err(fail("confirm"))?)
            }
        })
        .await
    }

    async fn surety_windowed(
        &self,
        messages: usize,
        window: usize,
        payload: &Bytes,
    ) -> Result<Run, String> {
        measure::windowed(messages, window, |_| {
            let publisher = self.publisher.clone();
            let message = Message::new(self.destination.as_str(), payload.clone());
            async move {
                publisher
                    .publish(&message)
                    .await
                    .map(|_| ())
                    .map_err(fail("surety publish"))
            }
        })
        .await
    }

    /// One transaction per message: publish, then `tx.commit`.
    async fn tx_per_message(&self, messages: usize, payload: &Bytes) -> Result<Run, String> {
        measure::windowed(messages, 1, |i| {
            let channel = self.tx.clone();
            let router = self.router.clone();
            let destination = self.destination.clone();
            let payload = payload.clone();
            async move {
                // In tx mode the publish has no confirm; the commit is the guarantee.
                drop(Self::start_publish(&channel, &router, &destination, i, &payload).await?);
                channel.tx_commit().await.map_err(fail("tx.commit"))
            }
        })
        .await
    }

    /// Publishes `batch` messages, then waits for all their confirms.
    async fn confirm_batches(
        &self,
        messages: usize,
        batch: usize,
        payload: &Bytes,
    ) -> Result<Run, String> {
        let start = Instant::now();
        let mut latencies = Vec::with_capacity(messages);
        let mut sent = 0;
        while sent < messages {
            let n = batch.min(messages - sent);
            let t = Instant::now();
            let mut pending = Vec::with_capacity(n);
            for i in sent..sent + n {
                pending.push(
                    Self::start_publish(&self.confirm, &self.router, &self.destination, i, payload)
                        .await?,
                );
            }
            for p in futures::future::join_all(pending).await {
                confirmed(p.map_err(fail("confirm"))?)?;
            }
            // Each message of a batch waits for the whole batch's confirms.
            latencies.extend(std::iter::repeat_n(t.elapsed(), n));
            sent += n;
        }
        Ok(Run {
            elapsed: start.elapsed(),
            latencies,
        })
    }
}

fn confirmed(confirmation: Confirmation) -> Result<(), String> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err("publish returned as unroutable".into()),
        Confirmation::Nack(_) => Err("publish nacked by the broker".into()),
        Confirmation::NotRequested => Err("channel not in confirm mode".into()),
    }
}

/// Scenario 1 (Surety vs raw lapin) and scenario 2 (confirm strategies vs transactions).
pub async fn bench(o: &Options) -> Result<Vec<Row>, String> {
    let rig = rig().await?;
    let payload = o.payload_bytes();
    // Warm-up: connections, channels, the queue's first segment.
    rig.raw_windowed(o.warmup(), o.window, &payload).await?;
    rig.surety_windowed(o.warmup(), o.window, &payload).await?;
    rig.purge().await?;

    let (mut raw, mut surety) = (Vec::new(), Vec::new());
    let slow = o.slow_messages();
    let (mut tx, mut one, mut batches, mut stream) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.repetitions {
        // Alternate raw and Surety inside each repetition so drift hits both alike.
        raw.push(rig.raw_windowed(o.messages, o.window, &payload).await?);
        rig.purge().await?;
        surety.push(rig.surety_windowed(o.messages, o.window, &payload).await?);
        rig.purge().await?;
        if o.strategies {
            tx.push(rig.tx_per_message(slow, &payload).await?);
            rig.purge().await?;
            one.push(rig.raw_windowed(slow, 1, &payload).await?);
            rig.purge().await?;
            batches.push(rig.confirm_batches(o.messages, 100, &payload).await?);
            rig.purge().await?;
            stream.push(rig.raw_windowed(o.messages, o.window, &payload).await?);
            rig.purge().await?;
        }
    }
    let raw_name = format!(
        "lapin confirm channel, mandatory, persistent, {} queue",
        rig.queue_type
    );
    let mut rows = crate::pair("rabbitmq", &raw_name, o, &raw, &surety);
    if o.strategies {
        let base = measure::summarise(&tx).rate;
        let versus_tx = |s: &measure::Summary| {
            format!("{:.1}× tx (claim ~{CLAIM:.0}×)", s.rate / base.max(1e-9))
        };
        for (name, messages, window, runs) in [
            ("raw: tx.commit per message", slow, 1, &tx),
            ("raw: confirm awaited per message", slow, 1, &one),
            ("raw: confirms in batches of 100", o.messages, 100, &batches),
            ("raw: streaming confirms", o.messages, o.window, &stream),
        ] {
            let summary = measure::summarise(runs);
            let ratio = if std::ptr::eq(runs, &tx) {
                "1.0× (baseline)".to_owned()
            } else {
                versus_tx(&summary)
            };
            rows.push(Row {
                broker: "rabbitmq",
                scenario: name.to_owned(),
                messages,
                window,
                summary,
                ratio,
            });
        }
    }
    if o.outbox {
        let ceiling = rows[0].summary.rate;
        rows.extend(
            crate::outbox::bench(o, "rabbitmq", &rig.destination, &rig.publisher, ceiling).await?,
        );
        rig.purge().await?;
    }
    Ok(rows)
}
