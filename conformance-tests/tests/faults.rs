//! Fault scenarios against the adapters named in `SURETY_ADAPTERS` (comma list of
//! `memory`, `rabbitmq`, `kafka`, `rocketmq`; without it: `memory` plus every adapter
//! whose broker answers), then the guarantee matrix.
//!
//! ```text
//! SURETY_ADAPTERS=memory,rabbitmq,kafka,rocketmq cargo test --workspace --test faults -- --nocapture
//! ```
//!
//! With `SURETY_WRITE_GUARANTEES=1` the matrix is also written to `docs/guarantees.md`
//! with the date and the command. A lost confirmed message, or an effect applied twice
//! behind the inbox, fails the run.
//!
//! The scenarios, the trials and the matrix are `surety_conformance::faults`; this file
//! says how to reach each adapter's broker: directly, through the fault proxies, and how
//! to restart it.
//!
//! How the TCP fault proxy reaches every byte: RabbitMQ clients talk to the one address
//! they are given. Kafka clients connect to the address the broker advertises, so
//! `scripts/brokers` gives Kafka a second listener (`FAULTS`, 127.0.0.1:9094) that
//! advertises 127.0.0.1:9095, where the proxy listens and forwards to 9094. RocketMQ
//! clients ask the name server for the broker's address: a proxy in front of the name
//! server rewrites `127.0.0.1:10911` to `127.0.0.1:19911` in its answers, where a second
//! proxy forwards to the broker (the adapter disables the VIP channel, port - 2).
//!
//! Broker restarts run `scripts/brokers restart <name>` and disturb everything else on
//! that broker: run this binary alone.
// The RocketMQ client's futures are deeply nested types.
#![recursion_limit = "512"]

mod foreign;

#[cfg(not(feature = "faults"))]
compile_error!("the fault runner needs the `faults` feature of surety-conformance (on by default)");

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use surety_conformance::faults::{self, FaultAdapter, Proxied, resolve, start_proxy};
use surety_conformance::{Fixture, ProxyOptions, runtime};
use surety_memory::MemoryBroker;

/// Kafka's fault listener and the address it advertises (see `scripts/brokers`).
const KAFKA_FAULTS_LISTENER: &str = "127.0.0.1:9094";
const KAFKA_FAULTS_ADVERTISED: &str = "127.0.0.1:9095";
/// RocketMQ's broker address as the name server gives it, and the proxied one.
const ROCKETMQ_BROKER: &str = "127.0.0.1:10911";
const ROCKETMQ_PROXIED_BROKER: &str = "127.0.0.1:19911";

fn rabbit_config() -> Result<surety_rabbitmq::RabbitConfig, String> {
    let mut config = surety_rabbitmq::RabbitConfig::from_env()
        .map_err(|e| format!("SURETY_RABBITMQ_URL: {e}"))?;
    // Short enough that a lost connection surfaces in seconds, not half a minute.
    config.confirm_timeout = Duration::from_secs(5);
    config.connect_timeout = Duration::from_secs(3);
    Ok(config)
}

/// Where the host and port of an AMQP URL start and end.
fn authority(url: &str) -> Result<(usize, usize), String> {
    let start = url.find("://").ok_or("the RabbitMQ URL has no scheme")? + 3;
    let rest = &url[start..];
    let host_end = rest.find('/').unwrap_or(rest.len());
    let host_start = rest[..host_end].rfind('@').map_or(0, |i| i + 1);
    Ok((start + host_start, start + host_end))
}

/// `host:port` of an AMQP URL (port 5672 when it names none).
fn host_port(url: &str) -> Result<String, String> {
    let (a, b) = authority(url)?;
    let host = &url[a..b];
    Ok(if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    })
}

/// The AMQP URL with its host and port replaced by `addr`.
fn via(url: &str, addr: SocketAddr) -> Result<String, String> {
    let (a, b) = authority(url)?;
    Ok(format!("{}{addr}{}", &url[..a], &url[b..]))
}

/// How the fault scenarios reach one adapter, or why they cannot.
fn adapter(name: &str) -> Result<FaultAdapter, String> {
    let f = |broker: Arc<dyn surety_core::Broker>| {
        Fixture::new(broker).quiet_period(Duration::from_secs(1))
    };
    match name {
        "memory" => Ok(FaultAdapter::in_process(
            Fixture::new(Arc::new(MemoryBroker::new())).quiet_period(Duration::from_millis(300)),
        )),
        "rabbitmq" => {
            let config = rabbit_config()?;
            let url = config.redacted_url();
            let foreign = runtime().block_on(foreign::RabbitForeign::connect(&config))?;
            let broker = runtime()
                .block_on(surety_rabbitmq::RabbitBroker::connect(config))
                .map_err(|e| format!("cannot reach RabbitMQ at {url}: {e}"))?;
            Ok(
                FaultAdapter::networked(f(Arc::new(broker)).foreign(Arc::new(foreign)))
                    .proxied(rabbitmq_proxied)
                    .restart(|| restart_broker("rabbitmq")),
            )
        }
        "kafka" => {
            let config = surety_kafka::KafkaConfig::from_env();
            let servers = config.bootstrap_servers.clone();
            let foreign = foreign::KafkaForeign::connect(&config)?;
            let broker = runtime()
                .block_on(surety_kafka::KafkaBroker::connect(config))
                .map_err(|e| format!("cannot reach Kafka at {servers}: {e}"))?;
            Ok(
                FaultAdapter::networked(f(Arc::new(broker)).foreign(Arc::new(foreign)))
                    .proxied(kafka_proxied)
                    .restart(|| restart_broker("kafka")),
            )
        }
        "rocketmq" => {
            let config = surety_rocketmq::RocketMqConfig::from_env();
            let namesrv = config.namesrv.clone();
            let foreign = foreign::RocketForeign::build(&config)?;
            runtime().block_on(foreign.start())?;
            let broker = runtime()
                .block_on(surety_rocketmq::RocketMqBroker::connect(config))
                .map_err(|e| format!("cannot reach RocketMQ at {namesrv}: {e}"))?;
            // A pull request in flight when a fault cuts its connection can wait out the
            // client's fixed 30 s long-poll timeout before the push consumer pulls again
            // (docs/rocketmq-interop.md): deliveries may resume only after that.
            let fixture = f(Arc::new(broker))
                .quiet_period(Duration::from_secs(2))
                .delivery_timeout(Duration::from_secs(60))
                .foreign(Arc::new(foreign));
            Ok(FaultAdapter::networked(fixture)
                .proxied(rocketmq_proxied)
                .restart(|| restart_broker("rocketmq")))
        }
        other => Err(format!(
            "unknown adapter {other:?}; expected one of {}",
            surety_conformance::runner::ADAPTERS.join(", ")
        )),
    }
}

/// RabbitMQ through one proxy in front of the address of its URL.
async fn rabbitmq_proxied() -> Result<Proxied, String> {
    let config = rabbit_config()?;
    let proxy = start_proxy(&host_port(&config.url)?, ProxyOptions::default()).await?;
    let mut proxied_config = config.clone();
    proxied_config.url = via(&config.url, proxy.addr())?;
    let broker = surety_rabbitmq::RabbitBroker::connect(proxied_config)
        .await
        .map_err(|e| format!("connect through the proxy: {e}"))?;
    Ok((Arc::new(broker), vec![proxy]))
}

/// Kafka through a proxy on the address its `FAULTS` listener advertises.
async fn kafka_proxied() -> Result<Proxied, String> {
    let proxy = start_proxy(
        KAFKA_FAULTS_LISTENER,
        ProxyOptions {
            listen: Some(resolve(KAFKA_FAULTS_ADVERTISED).await?),
            rewrite: None,
        },
    )
    .await?;
    let mut config = surety_kafka::KafkaConfig::new(proxy.addr().to_string());
    // A stall must outlast the client's request timeout; a send must give up
    // ("outcome unknown") well within the scenario's hang limit.
    config.request_timeout = Duration::from_secs(5);
    config.delivery_timeout = Duration::from_secs(20);
    let broker = surety_kafka::KafkaBroker::connect(config)
        .await
        .map_err(|e| format!("connect to Kafka through the proxy: {e}"))?;
    Ok((Arc::new(broker), vec![proxy]))
}

/// RocketMQ through a name-server proxy that names a proxied broker address, and that
/// second proxy.
async fn rocketmq_proxied() -> Result<Proxied, String> {
    let direct = surety_rocketmq::RocketMqConfig::from_env();
    let broker_proxy = start_proxy(
        ROCKETMQ_BROKER,
        ProxyOptions {
            listen: Some(resolve(ROCKETMQ_PROXIED_BROKER).await?),
            rewrite: None,
        },
    )
    .await?;
    let namesrv = direct.namesrv.split(';').next().unwrap_or_default();
    let namesrv_proxy = start_proxy(
        namesrv,
        ProxyOptions {
            listen: None,
            rewrite: Some((
                ROCKETMQ_BROKER.as_bytes().to_vec(),
                ROCKETMQ_PROXIED_BROKER.as_bytes().to_vec(),
            )),
        },
    )
    .await?;
    let mut config = direct.clone();
    config.namesrv = namesrv_proxy.addr().to_string();
    let broker = surety_rocketmq::RocketMqBroker::connect(config)
        .await
        .map_err(|e| format!("connect to RocketMQ through the proxies: {e}"))?;
    Ok((Arc::new(broker), vec![namesrv_proxy, broker_proxy]))
}

fn brokers_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/brokers")
}

/// Runs `scripts/brokers restart <name>` (stop, start, wait until it answers).
async fn restart_broker(name: &'static str) -> Result<(), String> {
    let script = brokers_script();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(&script)
            .args(["restart", name])
            .stdin(Stdio::null())
            .output()
    });
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .map_err(|_| format!("scripts/brokers restart {name} did not finish within 240 s"))?
        .map_err(|e| format!("scripts/brokers restart {name}: {e}"))?
        .map_err(|e| format!("cannot run scripts/brokers: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    // The script's own lines say what went wrong; the broker log tail it appends is
    // context, kept short.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let (own, log): (Vec<&str>, Vec<&str>) =
        stderr.lines().partition(|l| l.starts_with("brokers:"));
    let tail = log[log.len().saturating_sub(3)..].join(" / ");
    Err(format!(
        "scripts/brokers restart {name} failed ({}): {} / log: {tail}",
        output.status,
        own.join(" / "),
    ))
}

fn main() -> std::process::ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            // lapin logs every cut connection as an error: here they are on purpose.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin=off".into()),
        )
        .with_test_writer()
        .try_init();
    let guarantees = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/guarantees.md");
    faults::run(adapter, Some(&guarantees))
}
