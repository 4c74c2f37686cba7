//! RabbitMQ: Surety's publisher against raw lapin (scenario 1), lapin's confirm strategies
//! against transactions (2), Surety's store-backed half messages (3), then the relay (4),
//! the inbox (5) and end-to-end latency (6) through this broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use surety_core::{Broker, Publisher, Topology};
use surety_rabbitmq::{RabbitBroker, RabbitConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::measure::{self, Run, Workload};
use crate::{Options, Row, fail};

/// The destination's name starts with this and ends with the queue type
/// (`SURETY_RABBITMQ_QUEUE_TYPE`), so quorum and classic runs never share a queue.
const DESTINATION: &str = "surety-bench";
const GROUP: &str = "sink";
/// The articles' claim: transactions cost about 250× the throughput of confirms.
const CLAIM: f64 = 250.0;

/// Everything the RabbitMQ scenarios share.
struct Rig {
    broker: Arc<dyn Broker>,
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
    if let Some(version) = server_version(&url).await {
        crate::machine::note_version("RabbitMQ", version);
    }
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
        broker: Arc::new(broker),
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

/// The broker's version from the `server-properties` of its `connection.start` frame
/// (lapin does not expose them): connect, send the protocol header, read one frame.
async fn server_version(url: &str) -> Option<String> {
    // amqp://user:pass@host:port/vhost → host:port (5672 when absent).
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or(rest);
    let address = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    };
    let read = async {
        let mut socket = tokio::net::TcpStream::connect(address).await.ok()?;
        socket.write_all(b"AMQP\x00\x00\x09\x01").await.ok()?;
        let mut frame = vec![0u8; 4096];
        let n = socket.read(&mut frame).await.ok()?;
        let frame = &frame[..n];
        let pattern = b"\x07versionS";
        let at = frame.windows(pattern.len()).position(|w| w == pattern)? + pattern.len();
        let len = u32::from_be_bytes(frame.get(at..at + 4)?.try_into().ok()?) as usize;
        String::from_utf8(frame.get(at + 4..at + 4 + len)?.to_vec()).ok()
    };
    tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .ok()
        .flatten()
}

/// The AMQP properties Surety's codec writes for a message (see
/// adapters/rabbitmq/src/codec.rs): a UUID message id, persistence, a timestamp and the
/// `surety-created-at` header. Used by the diagnostic "raw + Surety's properties" run.
fn surety_like_properties() -> BasicProperties {
    let id = surety_core::MessageId::new();
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut table = FieldTable::default();
    table.insert(
        "surety-created-at".into(),
        AMQPValue::LongString(LongString::from(millis.to_string().into_bytes())),
    );
    BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(millis / 1000)
        .with_headers(table)
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
        properties: BasicProperties,
        payload: &[u8],
    ) -> Result<lapin::PublisherConfirm, String> {
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

    fn plain_properties(i: usize) -> BasicProperties {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(format!("bench-{i}")))
    }

    /// Raw lapin: `window` confirmed publishes in flight, each awaited on its own.
    /// `surety_properties`: with the properties Surety's codec writes (diagnostic).
    async fn raw_windowed(
        &self,
        messages: usize,
        window: usize,
        payload: &Bytes,
        surety_properties: bool,
    ) -> Result<Run, String> {
        measure::windowed(messages, window, |i| {
            let channel = self.confirm.clone();
            let router = self.router.clone();
            let destination = self.destination.clone();
            let payload = payload.clone();
            async move {
                let properties = if surety_properties {
                    surety_like_properties()
                } else {
                    Self::plain_properties(i)
                };
                let pending =
                    Self::start_publish(&channel, &router, &destination, properties, &payload)
                        .await?;
                confirmed(pending.await.map_err(fail("confirm"))?)
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
                drop(
                    Self::start_publish(
                        &channel,
                        &router,
                        &destination,
                        Self::plain_properties(i),
                        &payload,
                    )
                    .await?,
                );
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
                    Self::start_publish(
                        &self.confirm,
                        &self.router,
                        &self.destination,
                        Self::plain_properties(i),
                        payload,
                    )
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

    fn reset(&self) -> measure::Reset<'_> {
        Box::new(move || Box::pin(self.purge()))
    }

    fn raw<'a>(&'a self, window: usize, payload: &'a Bytes, surety_props: bool) -> Workload<'a> {
        measure::workload(move |n| self.raw_windowed(n, window, payload, surety_props))
    }

    fn surety<'a>(&'a self, payload: &'a Bytes, window: usize) -> Workload<'a> {
        measure::surety_workload(&self.publisher, &self.destination, payload, window)
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

/// Every scenario on RabbitMQ.
pub async fn bench(o: &Options) -> Result<Vec<Row>, String> {
    let rig = rig().await?;
    let payload = o.payload_bytes();
    let reset = rig.reset();
    let raw_name = format!(
        "raw: lapin confirm channel, mandatory, persistent, {} queue",
        rig.queue_type
    );
    let mut rows = Vec::new();
    let mut ceiling = None;

    if o.runs(1) || o.runs(2) {
        // Scenarios 1 and 2 alternate in one loop: they share the channel and the queue.
        let slow = o.slow_messages();
        let mut workloads = vec![
            (o.messages, rig.raw(o.window, &payload, false)),
            (o.messages, rig.surety(&payload, o.window)),
        ];
        if o.runs(2) {
            workloads.push((slow, measure::workload(|n| rig.tx_per_message(n, &payload))));
            workloads.push((slow, rig.raw(1, &payload, false)));
            workloads.push((
                o.messages,
                measure::workload(|n| rig.confirm_batches(n, 100, &payload)),
            ));
        }
        if o.diagnose {
            workloads.push((o.messages, rig.raw(o.window, &payload, true)));
        }
        let runs = measure::alternate(o.repetitions, o.warmup(), &workloads, Some(&reset)).await?;
        ceiling = Some(measure::summarise(&runs[0]).rate);
        if o.runs(1) {
            rows.extend(crate::pair(
                1,
                "rabbitmq",
                (&raw_name, &runs[0]),
                ("surety: Publisher::publish", &runs[1]),
                o.messages,
                o.window,
                o.payload,
                "goal ≥ 0.95",
            ));
        }
        if o.runs(2) {
            let base = measure::summarise(&runs[2]).rate;
            for (name, messages, window, i) in [
                ("raw: tx.commit per message", slow, 1, 2),
                ("raw: confirm awaited per message", slow, 1, 3),
                ("raw: confirms in batches of 100", o.messages, 100, 4),
                (
                    "raw: streaming confirms (the raw row of 1)",
                    o.messages,
                    o.window,
                    0,
                ),
            ] {
                let summary = measure::summarise(&runs[i]);
                let ratio = if i == 2 {
                    "1.0× (baseline)".to_owned()
                } else {
                    format!(
                        "{:.1}× tx (claim ~{CLAIM:.0}×)",
                        summary.rate / base.max(1e-9)
                    )
                };
                rows.push(Row {
                    scenario_no: 2,
                    broker: "rabbitmq",
                    scenario: name.to_owned(),
                    messages,
                    window,
                    payload: o.payload,
                    summary,
                    ratio,
                });
            }
        }
        if o.diagnose {
            let last = runs.len() - 1;
            rows.extend(
                crate::pair(
                    1,
                    "rabbitmq",
                    (&raw_name, &runs[0]),
                    (
                        "diagnostic: raw lapin with Surety's AMQP properties",
                        &runs[last],
                    ),
                    o.messages,
                    o.window,
                    o.payload,
                    "diagnostic, no goal",
                )
                .into_iter()
                .skip(1),
            );
        }
    }
    if o.runs(1) {
        let extras = o.extra_payload_bodies();
        rows.extend(
            crate::extra_payload_rows(
                o,
                "rabbitmq",
                &raw_name,
                &extras,
                |p| rig.raw(o.window, p, false),
                |p| rig.surety(p, o.window),
                Some(&reset),
            )
            .await?,
        );
    }
    if o.runs(3) {
        rows.extend(
            crate::halfmsg::bench(
                o,
                "rabbitmq",
                rig.broker.clone(),
                &rig.destination,
                &rig.publisher,
                Some(&reset),
            )
            .await?,
        );
    }
    if o.runs(4) {
        let ceiling = match ceiling {
            Some(c) => c,
            None => {
                measure::summarise(&[rig
                    .raw_windowed(o.messages, o.window, &payload, false)
                    .await?])
                .rate
            }
        };
        rig.purge().await?;
        rows.extend(
            crate::outbox::bench(o, "rabbitmq", &rig.destination, &rig.publisher, ceiling).await?,
        );
        rig.purge().await?;
    }
    if o.runs(5) || o.runs(6) {
        rows.extend(
            crate::consume::bench(
                o,
                "rabbitmq",
                rig.broker.clone(),
                &rig.destination,
                &rig.publisher,
            )
            .await?,
        );
    }
    Ok(rows)
}
