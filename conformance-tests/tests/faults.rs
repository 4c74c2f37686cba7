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
//! How the TCP fault proxy reaches every byte: RabbitMQ clients talk to the one address
//! they are given. Kafka clients connect to the address the broker advertises, so
//! `scripts/brokers` gives Kafka a second listener (`FAULTS`, 127.0.0.1:9094) that
//! advertises 127.0.0.1:9095, where the proxy listens and forwards to 9094. RocketMQ
//! clients ask the name server for the broker's address: a proxy in front of the name
//! server rewrites `127.0.0.1:10911` to `127.0.0.1:19911` in its answers, where a second
//! proxy forwards to the broker (the adapter disables the VIP channel, port - 2).
//!
//! Killing Surety processes: the runner re-executes its own binary with
//! `SURETY_FAULTS_CHILD=relay|producer`; `main` then runs only a relay or a producer on the
//! scenario's tables and broker, and the parent SIGKILLs it at the chosen point.
//!
//! Broker restarts run `scripts/brokers restart <name>` and disturb everything else on
//! that broker: run this binary alone.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Failed, Trial};
use surety_conformance::faults::{self, DyingConsumer, EffectStore, FaultReport, FaultRow};
use surety_conformance::{FaultProxy, Fixture, ProxyOptions};
use surety_core::{
    Broker, CapabilityCheck, Message, MessageId, Publisher, Receipt, TxState, check_back_fn,
};
use surety_memory::MemoryBroker;
// Table names below are built from a fixed word and a random hex number only.
use surety_sql::sqlx::{self, AssertSqlSafe, PgPool, Row};
use surety_sql::{EntryState, PgStore, Relay, RelayConfig, StoreConfig, TableNames};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
});

static REPORT: LazyLock<FaultReport> = LazyLock::new(FaultReport::default);

const RESTART: &str = faults::RESTART;
const CUT: &str = "connection-cut-during-confirmed-sends";
const RELAY_KILL: &str = "relay-killed-mid-batch";
const KILL: &str = "consumer-killed-after-effect-before-ack";
const PRODUCER_KILL: &str = "producer-killed-between-half-message-and-commit";
const POISON: &str = "poison-messages-in-a-stream";
const STALL: &str = "stall-beyond-client-timeouts";
const BAD: &str = "bad-input";
/// In the issue's order (scenarios 1 to 7, then bad input).
const SCENARIOS: &[&str] = &[
    RESTART,
    CUT,
    RELAY_KILL,
    KILL,
    PRODUCER_KILL,
    POISON,
    STALL,
    BAD,
];

/// Set in a child process: `relay` or `producer`.
const CHILD_ENV: &str = "SURETY_FAULTS_CHILD";
/// The child's adapter, table prefix, destination, producer group and message count.
const CHILD_ADAPTER: &str = "SURETY_FAULTS_CHILD_ADAPTER";
const CHILD_PREFIX: &str = "SURETY_FAULTS_CHILD_PREFIX";
const CHILD_DEST: &str = "SURETY_FAULTS_CHILD_DEST";
const CHILD_GROUP: &str = "SURETY_FAULTS_CHILD_GROUP";
const CHILD_COUNT: &str = "SURETY_FAULTS_CHILD_COUNT";
/// A child that outlives this is an orphan of a dead parent: it exits.
const CHILD_LIFETIME: Duration = Duration::from_secs(180);

/// Messages per scenario: enough to overlap faults with traffic, few enough to keep a
/// broker's run near a minute.
const CUT_MESSAGES: usize = 2000;
const STALL_MESSAGES: usize = 1000;
/// Longer than the 5 s confirm timeout set in [`rabbit_config`].
const STALL_PAUSE: Duration = Duration::from_secs(8);
const POISON_MESSAGES: usize = 500;
const KILL_MESSAGES: usize = 600;
const RESTART_MESSAGES: usize = 1000;
const RELAY_MESSAGES: usize = 1000;
/// Relay batches: the one in flight at the kill is published twice.
const RELAY_BATCH: usize = 50;
/// Half messages in flight when the producer is killed; every other one commits locally.
const PRODUCER_MESSAGES: usize = 60;

/// Kafka's fault listener and the address it advertises (see `scripts/brokers`).
const KAFKA_FAULTS_LISTENER: &str = "127.0.0.1:9094";
const KAFKA_FAULTS_ADVERTISED: &str = "127.0.0.1:9095";
/// RocketMQ's broker address as the name server gives it, and the proxied one.
const ROCKETMQ_BROKER: &str = "127.0.0.1:10911";
const ROCKETMQ_PROXIED_BROKER: &str = "127.0.0.1:19911";

fn postgres_url() -> String {
    std::env::var("SURETY_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://surety:surety@127.0.0.1:5432/surety".into())
}

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

fn fixture(adapter: &str) -> Result<Fixture, String> {
    let f = |broker: Arc<dyn surety_core::Broker>| {
        Fixture::new(broker).quiet_period(Duration::from_secs(1))
    };
    match adapter {
        "memory" => Ok(
            Fixture::new(Arc::new(MemoryBroker::new())).quiet_period(Duration::from_millis(300))
        ),
        "rabbitmq" => {
            let config = rabbit_config()?;
            let url = config.redacted_url();
            let broker = RUNTIME
                .block_on(surety_rabbitmq::RabbitBroker::connect(config))
                .map_err(|e| format!("cannot reach RabbitMQ at {url}: {e}"))?;
            Ok(f(Arc::new(broker)))
        }
        "kafka" => {
            let config = surety_kafka::KafkaConfig::from_env();
            let servers = config.bootstrap_servers.clone();
            let broker = RUNTIME
                .block_on(surety_kafka::KafkaBroker::connect(config))
                .map_err(|e| format!("cannot reach Kafka at {servers}: {e}"))?;
            Ok(f(Arc::new(broker)))
        }
        "rocketmq" => {
            let config = surety_rocketmq::RocketMqConfig::from_env();
            let namesrv = config.namesrv.clone();
            let broker = RUNTIME
                .block_on(surety_rocketmq::RocketMqBroker::connect(config))
                .map_err(|e| format!("cannot reach RocketMQ at {namesrv}: {e}"))?;
            // A pull request in flight when a fault cuts its connection can wait out the
            // client's fixed 30 s long-poll timeout before the push consumer pulls again
            // (docs/rocketmq-interop.md): deliveries may resume only after that.
            Ok(f(Arc::new(broker))
                .quiet_period(Duration::from_secs(2))
                .delivery_timeout(Duration::from_secs(60)))
        }
        other => Err(format!(
            "unknown adapter {other:?}; expected one of {}",
            surety_conformance::runner::ADAPTERS.join(", ")
        )),
    }
}

/// Effects as rows of a table of their own, each written in the inbox's transaction on
/// PostgreSQL, so a row per id counts how often the effect was applied.
struct PgInboxEffects {
    store: PgStore,
    prefix: String,
    effects_table: String,
}

impl PgInboxEffects {
    async fn create() -> Result<Self, String> {
        let prefix = format!("faults_{:08x}", rand::random::<u32>());
        let store = PgStore::connect(
            &postgres_url(),
            StoreConfig::default().tables(TableNames::prefixed(&prefix)),
        )
        .await
        .map_err(|e| format!("cannot reach PostgreSQL (SURETY_POSTGRES_URL): {e}"))?;
        store.migrate().await.map_err(|e| format!("migrate: {e}"))?;
        let effects_table = format!("{prefix}_effects");
        let pool = store.pool();
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {effects_table} (message_id TEXT NOT NULL, consumer TEXT NOT NULL)"
        )))
        .execute(pool)
        .await
        .map_err(|e| format!("create the effects table: {e}"))?;
        Ok(PgInboxEffects {
            store,
            prefix,
            effects_table,
        })
    }

    fn pool(&self) -> Result<&PgPool, String> {
        Ok(self.store.pool())
    }

    /// Drops the scenario's tables; failures only leave tables behind.
    async fn drop_tables(&self) {
        let pool = self.store.pool();
        let t = &self.store.config().tables;
        let business = format!("{}_business", self.prefix);
        let started = format!("{}_started", self.prefix);
        for table in [
            &self.effects_table,
            &business,
            &started,
            &t.inbox,
            &t.outbox,
            &t.migrations,
        ] {
            let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
                .execute(pool)
                .await;
        }
    }
}

#[async_trait::async_trait]
impl EffectStore for PgInboxEffects {
    async fn apply(&self, consumer: &str, message: &Message) -> Result<bool, String> {
        let insert = format!(
            "INSERT INTO {} (message_id, consumer) VALUES ($1, $2)",
            self.effects_table
        );
        let (id, who) = (message.id().as_str().to_owned(), consumer.to_owned());
        let outcome = self
            .store
            .inbox()
            .process(consumer, message, move |tx| {
                Box::pin(async move {
                    sqlx::query(AssertSqlSafe(insert))
                        .bind(id)
                        .bind(who)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| {
                            surety_core::Error::new(surety_core::ErrorKind::Storage, "effect")
                                .with_source(e)
                        })?;
                    Ok(())
                }) as BoxFuture<'_, surety_core::Result<()>>
            })
            .await
            .map_err(|e| format!("inbox: {e}"))?;
        Ok(!outcome.is_duplicate())
    }

    async fn applied(&self) -> Result<HashMap<MessageId, usize>, String> {
        let pool = self.store.pool();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT message_id, COUNT(*) AS n FROM {} GROUP BY message_id",
            self.effects_table
        )))
        .fetch_all(pool)
        .await
        .map_err(|e| format!("count effects: {e}"))?;
        let mut out = HashMap::new();
        for row in rows {
            let id: String = row.get("message_id");
            let n: i64 = row.get("n");
            let id = MessageId::parse(id).map_err(|e| format!("stored id: {e}"))?;
            out.insert(id, n as usize);
        }
        Ok(out)
    }
}

async fn socket(addr: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))
}

async fn start_proxy(upstream: &str, options: ProxyOptions) -> Result<FaultProxy, String> {
    let listen = options.listen;
    FaultProxy::start_with(socket(upstream).await?, options)
        .await
        .map_err(|e| match listen {
            Some(at) => format!("start the fault proxy on {at}: {e}"),
            None => format!("start the fault proxy: {e}"),
        })
}

/// The adapter connected through fault proxies, and the proxies (all of its traffic
/// passes through them).
async fn proxied(adapter: &str) -> Result<(Arc<dyn Broker>, Vec<FaultProxy>), String> {
    match adapter {
        "rabbitmq" => {
            let config = rabbit_config()?;
            let proxy = start_proxy(&host_port(&config.url)?, ProxyOptions::default()).await?;
            let mut proxied_config = config.clone();
            proxied_config.url = via(&config.url, proxy.addr())?;
            let broker = surety_rabbitmq::RabbitBroker::connect(proxied_config)
                .await
                .map_err(|e| format!("connect through the proxy: {e}"))?;
            Ok((Arc::new(broker), vec![proxy]))
        }
        "kafka" => {
            let proxy = start_proxy(
                KAFKA_FAULTS_LISTENER,
                ProxyOptions {
                    listen: Some(socket(KAFKA_FAULTS_ADVERTISED).await?),
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
        "rocketmq" => {
            let direct = surety_rocketmq::RocketMqConfig::from_env();
            let broker_proxy = start_proxy(
                ROCKETMQ_BROKER,
                ProxyOptions {
                    listen: Some(socket(ROCKETMQ_PROXIED_BROKER).await?),
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
        other => Err(format!("no proxied set-up for {other}")),
    }
}

async fn run_network_fault(
    adapter: &str,
    direct: &Fixture,
    n: usize,
    fault: faults::NetworkFault,
) -> Result<FaultRow, String> {
    if adapter == "memory" {
        return Ok(FaultRow::not_run(
            fault.scenario(),
            adapter,
            "in-process broker: there is no connection to cut",
        ));
    }
    let (broker, proxies) = proxied(adapter).await?;
    let proxied = Fixture::new(broker)
        .quiet_period(direct.quiet_period)
        .delivery_timeout(direct.delivery_timeout);
    // Cuts hit the consumers too (they must reconnect and the unacked deliveries come
    // again); a stall is measured on the publisher alone.
    let consumer = match fault {
        faults::NetworkFault::Cut { .. } => &proxied,
        faults::NetworkFault::Stall { .. } => direct,
    };
    let refs: Vec<&FaultProxy> = proxies.iter().collect();
    let mut row =
        faults::network_fault_during_confirmed_sends(adapter, &proxied, consumer, &refs, n, fault)
            .await?;
    // The scenario means something only if the client's traffic went through every proxy
    // (not around it, to an address the broker advertised).
    for p in &proxies {
        if p.accepted_connections() == 0 {
            row.failures.push(format!(
                "no connection went through the proxy on {}: the client bypassed it",
                p.addr()
            ));
        }
    }
    Ok(row)
}

async fn run_kill(adapter: &str, f: &Fixture) -> Result<FaultRow, String> {
    let effects = Arc::new(PgInboxEffects::create().await?);
    let row = faults::kill_before_ack(adapter, f, effects.clone(), KILL_MESSAGES).await;
    effects.drop_tables().await;
    row
}

// ---------------------------------------------------------------------------------------
// Scenario 1: broker restart.

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

async fn run_restart(adapter: &str, f: &Fixture) -> Result<FaultRow, String> {
    let name: &'static str = match adapter {
        "rabbitmq" => "rabbitmq",
        "kafka" => "kafka",
        "rocketmq" => "rocketmq",
        _ => {
            return Ok(FaultRow::not_run(
                RESTART,
                adapter,
                "in-process broker: a restart would be a new, empty broker",
            ));
        }
    };
    let effects = Arc::new(PgInboxEffects::create().await?);
    let row = faults::broker_restart(
        adapter,
        f,
        effects.clone(),
        RESTART_MESSAGES,
        restart_broker(name),
    )
    .await;
    effects.drop_tables().await;
    row
}

// ---------------------------------------------------------------------------------------
// Child processes: a relay or a producer that the parent kills.

fn child_env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

/// Starts this binary again as a child running `role` only.
fn spawn_child(role: &str, vars: &[(&str, &str)]) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the test binary's path: {e}"))?;
    let mut command = Command::new(exe);
    command
        .env(CHILD_ENV, role)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (k, v) in vars {
        command.env(k, v);
    }
    command
        .spawn()
        .map_err(|e| format!("start the {role} child: {e}"))
}

/// SIGKILLs a child (std's `kill` is SIGKILL on Unix) and reaps it.
fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

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

async fn store_for(prefix: &str) -> Result<PgStore, String> {
    PgStore::connect(
        &postgres_url(),
        StoreConfig::default().tables(TableNames::prefixed(prefix)),
    )
    .await
    .map_err(|e| format!("cannot reach PostgreSQL: {e}"))
}

/// Child: a relay on the scenario's outbox, publishing through the adapter, forever.
fn child_relay() -> Result<(), String> {
    let adapter = child_env(CHILD_ADAPTER)?;
    let prefix = child_env(CHILD_PREFIX)?;
    let f = fixture(&adapter)?;
    RUNTIME.block_on(async {
        let store = store_for(&prefix).await?;
        let publisher = faults::setup("publisher", f.broker.publisher()).await?;
        let relay = Relay::new(store, Arc::new(SlowConfirm(publisher)), relay_config());
        // As an application runs it: the background loop, which also leases a batch
        // ahead, so the kill leaves that batch leased too.
        let _worker = relay.spawn();
        std::future::pending::<Result<(), String>>().await
    })
}

/// The broker a producer of half messages uses: RabbitMQ and Kafka through the SQL
/// prepared store (as the conformance runner builds them), RocketMQ natively.
fn half_message_broker(adapter: &str, inner: Arc<dyn Broker>, store: PgStore) -> Arc<dyn Broker> {
    match adapter {
        "rabbitmq" | "kafka" => surety_conformance::runner::with_sql_half_messages(inner, store),
        _ => inner,
    }
}

/// Child: sends half messages whose local transactions commit (a row in the business
/// table) or roll back, record that they ran, then never return, until the parent kills
/// the process. Its own check-back knows nothing (`Unknown`).
fn child_producer() -> Result<(), String> {
    let adapter = child_env(CHILD_ADAPTER)?;
    let prefix = child_env(CHILD_PREFIX)?;
    let dest = child_env(CHILD_DEST)?;
    let group = child_env(CHILD_GROUP)?;
    let count: usize = child_env(CHILD_COUNT)?
        .parse()
        .map_err(|e| format!("{CHILD_COUNT}: {e}"))?;
    let f = fixture(&adapter)?;
    RUNTIME.block_on(async move {
        let store = store_for(&prefix).await?;
        let pool = store.pool().clone();
        let broker = half_message_broker(&adapter, f.broker.clone(), store);
        let unknown = Arc::new(check_back_fn(|_m: Message| async { TxState::Unknown }));
        let publisher = faults::setup(
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

/// Runs the child role named in the environment; `None` when this is not a child.
fn child_main() -> Option<std::process::ExitCode> {
    let role = std::env::var(CHILD_ENV).ok()?;
    std::thread::spawn(|| {
        std::thread::sleep(CHILD_LIFETIME);
        std::process::exit(3);
    });
    let result = match role.as_str() {
        "relay" => child_relay(),
        "producer" => child_producer(),
        other => Err(format!("unknown child role {other}")),
    };
    if let Err(why) = result {
        eprintln!("faults child {role}: {why}");
    }
    Some(std::process::ExitCode::FAILURE)
}

async fn count_rows(pool: &PgPool, sql: String) -> Result<i64, String> {
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .map_err(|e| format!("count rows: {e}"))
}

// ---------------------------------------------------------------------------------------
// Scenario 3: relay killed mid-batch, restarted.

async fn run_relay_kill(adapter: &str, f: &Fixture) -> Result<FaultRow, String> {
    let effects = Arc::new(PgInboxEffects::create().await?);
    let row = relay_kill(adapter, f, effects.clone()).await;
    effects.drop_tables().await;
    row
}

async fn relay_kill(
    adapter: &str,
    f: &Fixture,
    effects: Arc<PgInboxEffects>,
) -> Result<FaultRow, String> {
    let mut row = FaultRow::not_run(RELAY_KILL, adapter, "");
    row.ran = true;
    row.messages = RELAY_MESSAGES;
    let store = effects.store.clone();
    let pool = effects.pool()?.clone();
    let outbox_table = store.config().tables.outbox.clone();
    let (dest, group) = faults::declare_fresh(f, "fault-relay").await?;
    let consumer = Arc::new(DyingConsumer::inbox(effects.clone(), &group));
    let handle = faults::subscribe_inbox(f, &dest, &group, consumer.clone()).await?;

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
    let publisher = faults::setup("publisher", f.broker.publisher()).await?;
    // The first relay: a child process (an in-process task on the memory broker, which
    // lives in this process), killed once 30 % of the rows are sent.
    let mut child = None;
    let mut worker = None;
    if adapter == "memory" {
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
    if let Err(why) = faults::stop_consumer(handle).await {
        row.failures.push(why);
    }

    let counts = effects.applied().await?;
    row.lost = ids
        .iter()
        .filter(|id| counts.get(*id).copied().unwrap_or(0) == 0)
        .count();
    row.applied_twice = Some(
        ids.iter()
            .map(|id| counts.get(id).copied().unwrap_or(0).saturating_sub(1))
            .sum(),
    );
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
        if adapter == "memory" {
            "in-process relay task aborted"
        } else {
            "relay process SIGKILLed"
        }
    );
    Ok(row)
}

async fn faults_wait(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

async fn stop_quietly(handle: surety_core::SubscriptionHandle) {
    let _ = faults::stop_consumer(handle).await;
}

// ---------------------------------------------------------------------------------------
// Scenario 5: producer killed between half message and commit.

async fn run_producer_kill(adapter: &str, f: &Fixture) -> Result<FaultRow, String> {
    if adapter == "memory" {
        return Ok(FaultRow::not_run(
            PRODUCER_KILL,
            adapter,
            "in-process broker: killing the producer's process kills the broker and its half messages with it",
        ));
    }
    let effects = Arc::new(PgInboxEffects::create().await?);
    let row = producer_kill(adapter, f, effects.clone()).await;
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
    let pool = effects.pool()?.clone();
    let prefix = effects.prefix.clone();
    for table in ["business", "started"] {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {prefix}_{table} (message_id TEXT PRIMARY KEY)"
        )))
        .execute(&pool)
        .await
        .map_err(|e| format!("create the {table} table: {e}"))?;
    }
    let (dest, group) = faults::declare_fresh(f, "fault-half").await?;
    let producer_group = surety_conformance::unique_name("pg");
    let consumer = Arc::new(DyingConsumer::inbox(effects.clone(), &group));
    let handle = faults::subscribe_inbox(f, &dest, &group, consumer.clone()).await?;

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
    let sql_store = matches!(adapter, "rabbitmq" | "kafka");
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

    // A new producer of the same group: its check-back answers from the business table.
    let business = format!("{prefix}_business");
    let check_pool = pool.clone();
    let check_back = Arc::new(check_back_fn(move |m: Message| {
        let (pool, business) = (check_pool.clone(), business.clone());
        async move {
            match sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {business} WHERE message_id = $1"
            )))
            .bind(m.id().as_str())
            .fetch_one(&pool)
            .await
            {
                Ok(0) => TxState::Rollback,
                Ok(_) => TxState::Commit,
                Err(_) => TxState::Unknown,
            }
        }
    }));
    let broker = half_message_broker(adapter, f.broker.clone(), effects.store.clone());
    let publisher = faults::setup(
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
    if let Err(why) = faults::stop_consumer(handle).await {
        row.failures.push(why);
    }

    let counts = effects.applied().await?;
    row.lost = committed_ids
        .iter()
        .filter(|id| counts.get(*id).copied().unwrap_or(0) == 0)
        .count();
    row.applied_twice = Some(
        committed_ids
            .iter()
            .map(|id| counts.get(id).copied().unwrap_or(0).saturating_sub(1))
            .sum(),
    );
    row.delivered_twice = consumer.duplicates();
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
        "producer process SIGKILLed after {started} local transactions ({} committed){}; resolved by a new producer's check-back ({})",
        committed.len(),
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

async fn run(scenario: &'static str, adapter: &str, f: &Fixture) -> Result<FaultRow, String> {
    match scenario {
        RESTART => run_restart(adapter, f).await,
        CUT => {
            let fault = faults::NetworkFault::Cut { times: 3 };
            run_network_fault(adapter, f, CUT_MESSAGES, fault).await
        }
        RELAY_KILL => run_relay_kill(adapter, f).await,
        STALL => {
            let fault = faults::NetworkFault::Stall { pause: STALL_PAUSE };
            run_network_fault(adapter, f, STALL_MESSAGES, fault).await
        }
        POISON => faults::poison_stream(adapter, f, POISON_MESSAGES, 10).await,
        KILL => run_kill(adapter, f).await,
        PRODUCER_KILL => run_producer_kill(adapter, f).await,
        BAD => faults::bad_input(adapter, f).await,
        other => Err(format!("unknown scenario {other}")),
    }
}

/// `YYYY-MM-DD` (UTC) of now, from the days since 1970 (civil-from-days).
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn write_guarantees(adapters: &[String], matrix: &str, passed: bool) -> std::io::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/guarantees.md");
    let command = format!(
        "SURETY_ADAPTERS={} SURETY_WRITE_GUARANTEES=1 cargo test --workspace --test faults -- --nocapture",
        adapters.join(",")
    );
    let text = format!(
        "# Guarantee matrix\n\n\
         Produced on {date} by\n\n```sh\n{command}\n```\n\n\
         Result of that run: **{result}**.\n\n{matrix}\n\
         ## What the columns mean\n\n\
         - **messages**: messages the scenario published (or tried to).\n\
         - **lost**: messages whose publish returned `Ok` (or that had to be dead-lettered) and that no consumer ever saw. Must be 0.\n\
         - **applied twice**: effects applied more than once behind `surety-sql`'s inbox on PostgreSQL. Must be 0.\n\
         - **delivered twice**: deliveries beyond the first for one id. Expected after an unknown publish outcome is retried or a consumer dies before its ack; the message id (and the inbox) absorbs them.\n\
         - **dead-lettered**: distinct poison messages read back from the broker's dead-letter destination.\n\
         - **recovery**: from the fault until the client worked again (restart: first confirm after the broker was back, measured from the start of the restart; cut and stall: first successful publish begun after a cut or after the end of a stall; killed consumer, relay or producer: all effects applied).\n\n\
         ## Scenarios\n\n\
         - `{RESTART}`: {RESTART_MESSAGES} publishes with confirm, paced at 100 a second, while an inbox consumer applies them; after 30 % are confirmed, `scripts/brokers restart <broker>` (RocketMQ: name server and broker). Retryable errors are retried with the same id; the consumer must come back through the adapter's own recovery. Recovery: from the start of the restart to the first confirm after the broker was back.\n\
         - `{CUT}`: {CUT_MESSAGES} publishes with confirm, 64 in flight, through an in-process TCP proxy that cuts every connection (publisher's and consumer's) three times. Every failure must be a retryable `outcome_unknown`/`unavailable`/`rejected` (the same id is then published again), never a false success; a client that retries inside (Kafka) must have had confirms in flight across the cut. Kafka goes through its `FAULTS` listener (advertised at the proxy); RocketMQ through a name-server proxy that rewrites the broker's address to a second proxy.\n\
         - `{RELAY_KILL}`: {RELAY_MESSAGES} rows in `surety-sql`'s outbox on PostgreSQL; a relay process (`Relay::spawn`, batches of {RELAY_BATCH}, the next batch leased while one publishes) is SIGKILLed once 30 % are sent, with a batch confirmed but not yet marked sent; a second relay takes over both leased batches after the lease. Every row must end `SENT` and every id be applied once behind the inbox; the duplicates delivered are the batch in flight at the kill. Memory: the relay is an in-process task, aborted.\n\
         - `{KILL}`: {KILL_MESSAGES} messages; after a third of the effects, the consumer hangs right after each effect commit (no ack) and is aborted like a killed process; a new consumer in the same group takes the redeliveries through the inbox.\n\
         - `{PRODUCER_KILL}`: a producer process sends {PRODUCER_MESSAGES} half messages; every other local transaction commits a row, the others roll back; the process is SIGKILLed after its local transactions and before Surety commits. A new producer of the same group, whose check-back reads the rows, must resolve them: committed → applied once, rolled back → never delivered. RocketMQ: native half messages and the broker's check-back; RabbitMQ and Kafka: `surety-sql`'s prepared store (`WithSqlHalfMessages`).\n\
         - `{POISON}`: {POISON_MESSAGES} messages, every 10th poison (alternately rejected by the handler and failing until 3 attempts are used up).\n\
         - `{STALL}`: {STALL_MESSAGES} publishes with confirm through the proxies, which hold every byte for {stall} s half-way (longer than the clients' 5 s confirm / request timeouts and RocketMQ's 3 s send timeout), then let them flow again; same rules as the cut, recovery measured from the end of the stall.\n\
         - `{BAD}`: oversized payload, empty / spaced / non-ASCII header names, a newline in a header value, a control character in a key, empty and malformed destinations: each a permanent `invalid_message`; declaring or subscribing to an empty destination is a typed error; nothing reaches a consumer.\n\n\
         Malformed envelopes from a foreign producer (no id, garbage in Surety's headers, bytes that are not UTF-8) are covered by each adapter's own tests with the broker's raw client: `malformed_*_from_a_foreign_*` in `adapters/{{kafka,rabbitmq,rocketmq}}/tests/`; each message reaches the handler with an id or is dead-lettered with the reason, and the consumer goes on.\n",
        date = today(),
        stall = STALL_PAUSE.as_secs(),
        result = if passed { "pass" } else { "FAIL" },
    );
    std::fs::write(path, text)
}

/// Longest a scenario may run: past it the row fails with the phase it was in, and the
/// next scenario runs (the watchdog then never has to end a healthy run).
const SCENARIO_LIMIT: Duration = Duration::from_secs(300);

fn main() -> std::process::ExitCode {
    if let Some(code) = child_main() {
        return code;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            // lapin logs every cut connection as an error: here they are on purpose.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin=off".into()),
        )
        .with_test_writer()
        .try_init();
    // A scenario that hangs (an await that never completes after a cut) must fail the run,
    // not stall CI: past the budget the whole binary exits with a failure.
    let budget = std::env::var("SURETY_FAULTS_BUDGET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900);
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(budget));
        eprintln!("faults: still running after {budget} s; a scenario hangs: failing the run");
        std::process::exit(1);
    });
    let mut args = Arguments::from_args();
    // Scenarios measure recovery times and share two cores: one at a time.
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }

    // Behind the capability layer, as applications get their broker.
    let fixture = |adapter: &str| {
        fixture(adapter).map(|f| Fixture {
            broker: CapabilityCheck::wrap(f.broker.clone()),
            ..f
        })
    };
    let Some(fixtures) = surety_conformance::runner::adapters_from_env("faults", fixture) else {
        return std::process::ExitCode::FAILURE;
    };

    let mut trials = Vec::new();
    for (adapter, fixture) in &fixtures {
        for scenario in SCENARIOS {
            let (adapter, fixture) = (adapter.clone(), fixture.clone());
            trials.push(Trial::test(format!("{adapter}::{scenario}"), move || {
                let began = Instant::now();
                let ran = RUNTIME.block_on(async {
                    tokio::time::timeout(SCENARIO_LIMIT, run(scenario, &adapter, &fixture))
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!(
                                "the scenario did not finish within {} s",
                                SCENARIO_LIMIT.as_secs()
                            ))
                        })
                });
                eprintln!(
                    "faults: {adapter}::{scenario} took {:.1} s",
                    began.elapsed().as_secs_f64()
                );
                let row = match ran {
                    Ok(row) => row,
                    Err(why) => {
                        let mut row = FaultRow::not_run(scenario, &adapter, "");
                        row.ran = true;
                        row.failures.push(why);
                        row
                    }
                };
                let verdict = row.verdict();
                REPORT.add(row);
                match verdict {
                    None => Ok(()),
                    Some(why) => Err(Failed::from(why)),
                }
            }));
        }
    }

    let conclusion = libtest_mimic::run(&args, trials);
    let matrix = REPORT.markdown(SCENARIOS);
    println!("\n## Fault guarantee matrix\n\n{matrix}");
    if std::env::var("SURETY_WRITE_GUARANTEES").as_deref() == Ok("1") {
        let adapters: Vec<String> = fixtures.iter().map(|(a, _)| a.clone()).collect();
        match write_guarantees(&adapters, &matrix, !conclusion.has_failed()) {
            Ok(()) => println!("faults: wrote docs/guarantees.md"),
            Err(e) => {
                eprintln!("faults: cannot write docs/guarantees.md: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    conclusion.exit_code()
}
