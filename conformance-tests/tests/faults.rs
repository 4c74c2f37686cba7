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
//! What the TCP fault proxy can reach: RabbitMQ clients talk to the one address they are
//! given, so the proxy sits on every byte. Kafka clients only bootstrap through it: the
//! broker advertises `127.0.0.1:9092` and the client then connects there directly.
//! RocketMQ clients ask the name server for the broker's address and connect to it
//! directly too. The cut and stall scenarios therefore run on RabbitMQ only; the others get
//! a "not run" row with the reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Failed, Trial};
use surety_conformance::faults::{self, EffectStore, FaultReport, FaultRow};
use surety_conformance::{FaultProxy, Fixture};
use surety_core::{Message, MessageId};
use surety_memory::MemoryBroker;
// Table names below are built from a fixed word and a random hex number only.
use surety_sql::sqlx::{self, AssertSqlSafe, PgConnection, Row};
use surety_sql::{SqlStore, StoreConfig, TableNames};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
});

static REPORT: LazyLock<FaultReport> = LazyLock::new(FaultReport::default);

const KNOWN: &[&str] = &["memory", "rabbitmq", "kafka", "rocketmq"];

const CUT: &str = "connection-cut-during-confirmed-sends";
const POISON: &str = "poison-messages-in-a-stream";
const KILL: &str = "consumer-killed-after-effect-before-ack";
const STALL: &str = "stall-beyond-client-timeouts";
const BAD: &str = "bad-input";
const SCENARIOS: &[&str] = &[CUT, STALL, POISON, KILL, BAD];

/// Messages per scenario: enough to overlap faults with traffic, few enough to keep a
/// broker's run near a minute.
const CUT_MESSAGES: usize = 2000;
const STALL_MESSAGES: usize = 1000;
/// Longer than the 5 s confirm timeout set in [`rabbit_config`].
const STALL_PAUSE: Duration = Duration::from_secs(8);
const POISON_MESSAGES: usize = 500;
const KILL_MESSAGES: usize = 600;

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
            Ok(f(Arc::new(broker)).quiet_period(Duration::from_secs(2)))
        }
        other => Err(format!(
            "unknown adapter {other:?}; expected one of {}",
            KNOWN.join(", ")
        )),
    }
}

/// Effects as rows of a table of their own, each written in the inbox's transaction on
/// PostgreSQL, so a row per id counts how often the effect was applied.
struct PgInboxEffects {
    store: SqlStore,
    effects_table: String,
}

impl PgInboxEffects {
    async fn create() -> Result<Self, String> {
        let prefix = format!("faults_{:08x}", rand::random::<u32>());
        let store = SqlStore::connect(
            &postgres_url(),
            StoreConfig::default().tables(TableNames::prefixed(&prefix)),
        )
        .await
        .map_err(|e| format!("cannot reach PostgreSQL (SURETY_POSTGRES_URL): {e}"))?;
        store.migrate().await.map_err(|e| format!("migrate: {e}"))?;
        let effects_table = format!("{prefix}_effects");
        let pool = store.pg_pool().ok_or("the store is not on PostgreSQL")?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {effects_table} (message_id TEXT NOT NULL, consumer TEXT NOT NULL)"
        )))
        .execute(pool)
        .await
        .map_err(|e| format!("create the effects table: {e}"))?;
        Ok(PgInboxEffects {
            store,
            effects_table,
        })
    }

    /// Drops the scenario's tables; failures only leave tables behind.
    async fn drop_tables(&self) {
        let Some(pool) = self.store.pg_pool() else {
            return;
        };
        let t = &self.store.config().tables;
        for table in [&self.effects_table, &t.inbox, &t.outbox, &t.migrations] {
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
            .process(consumer, message, move |tx: &mut PgConnection| {
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
        let pool = self
            .store
            .pg_pool()
            .ok_or("the store is not on PostgreSQL")?;
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

async fn run_network_fault(
    adapter: &str,
    direct: &Fixture,
    n: usize,
    fault: faults::NetworkFault,
) -> Result<FaultRow, String> {
    if adapter != "rabbitmq" {
        let why = match adapter {
            "kafka" => {
                "the proxy only carries Kafka's bootstrap connection: the broker advertises 127.0.0.1:9092 and the client connects there directly"
            }
            "rocketmq" => {
                "the proxy only carries the name-server connection: the client gets the broker's address from the name server and connects there directly"
            }
            _ => "in-process broker: there is no connection to cut",
        };
        return Ok(FaultRow::not_run(fault.scenario(), adapter, why));
    }
    let config = rabbit_config()?;
    let host = host_port(&config.url)?;
    let upstream: SocketAddr = tokio::net::lookup_host(&host)
        .await
        .map_err(|e| format!("resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to nothing"))?;
    let proxy = FaultProxy::start(upstream)
        .await
        .map_err(|e| format!("start the fault proxy: {e}"))?;
    let mut proxied_config = config.clone();
    proxied_config.url = via(&config.url, proxy.addr())?;
    let broker = surety_rabbitmq::RabbitBroker::connect(proxied_config)
        .await
        .map_err(|e| format!("connect through the proxy: {e}"))?;
    let proxied = Fixture::new(Arc::new(broker)).quiet_period(direct.quiet_period);
    // Cuts hit the consumers too (their supervisor must reconnect and the unacked
    // deliveries come again); a stall is measured on the publisher alone.
    let consumer = match fault {
        faults::NetworkFault::Cut { .. } => &proxied,
        faults::NetworkFault::Stall { .. } => direct,
    };
    faults::network_fault_during_confirmed_sends(adapter, &proxied, consumer, &proxy, n, fault)
        .await
}

async fn run_kill(adapter: &str, f: &Fixture) -> Result<FaultRow, String> {
    let effects = Arc::new(PgInboxEffects::create().await?);
    let row = faults::kill_before_ack(adapter, f, effects.clone(), KILL_MESSAGES).await;
    effects.drop_tables().await;
    row
}

async fn run(scenario: &'static str, adapter: &str, f: &Fixture) -> Result<FaultRow, String> {
    match scenario {
        CUT => {
            let fault = faults::NetworkFault::Cut { times: 3 };
            run_network_fault(adapter, f, CUT_MESSAGES, fault).await
        }
        STALL => {
            let fault = faults::NetworkFault::Stall { pause: STALL_PAUSE };
            run_network_fault(adapter, f, STALL_MESSAGES, fault).await
        }
        POISON => faults::poison_stream(adapter, f, POISON_MESSAGES, 10).await,
        KILL => run_kill(adapter, f).await,
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
         - **recovery**: from the fault until the client worked again (first successful publish begun after a cut or after the end of a stall; all effects applied after a consumer was killed).\n\n\
         ## Scenarios\n\n\
         - `{CUT}`: {CUT_MESSAGES} publishes with confirm, 64 in flight, through an in-process TCP proxy that cuts every connection (publisher's and consumer's) three times. Every failure must be a retryable `outcome_unknown`/`unavailable`/`rejected` (the same id is then published again), never a false success. RabbitMQ only: Kafka and RocketMQ clients learn the broker's address from the broker (advertised listener) or the name server and bypass the proxy after bootstrapping.\n\
         - `{STALL}`: {STALL_MESSAGES} publishes with confirm through the proxy, which holds every byte for {stall} s half-way (longer than the 5 s confirm timeout), then lets them flow again; same rules as above, recovery measured from the end of the stall. RabbitMQ only, for the same reason.\n\
         - `{POISON}`: {POISON_MESSAGES} messages, every 10th poison (alternately rejected by the handler and failing until 3 attempts are used up).\n\
         - `{KILL}`: {KILL_MESSAGES} messages; after a third of the effects, the consumer hangs right after each effect commit (no ack) and is aborted like a killed process; a new consumer in the same group takes the redeliveries through the inbox.\n\
         - `{BAD}`: oversized payload, empty / spaced / non-ASCII header names, a newline in a header value, a control character in a key, empty and malformed destinations: each a permanent `invalid_message`; declaring or subscribing to an empty destination is a typed error; nothing reaches a consumer.\n\n\
         Not covered yet (issue 8): broker restart during traffic, relay killed mid-batch, producer killed between half message and commit, malformed envelopes from a foreign producer.\n",
        date = today(),
        stall = STALL_PAUSE.as_secs(),
        result = if passed { "pass" } else { "FAIL" },
    );
    std::fs::write(path, text)
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

    let (named, explicit) = match std::env::var("SURETY_ADAPTERS") {
        Ok(list) if !list.trim().is_empty() => (
            list.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>(),
            true,
        ),
        _ => (KNOWN.iter().map(|s| s.to_string()).collect(), false),
    };
    let mut fixtures = Vec::new();
    let mut setup_errors = Vec::new();
    for adapter in &named {
        match fixture(adapter) {
            Ok(f) => fixtures.push((adapter.clone(), f)),
            Err(why) if explicit => setup_errors.push(format!("{adapter}: {why}")),
            Err(why) => eprintln!("faults: skipping {adapter}: {why}"),
        }
    }
    if !setup_errors.is_empty() {
        for e in &setup_errors {
            eprintln!("faults: cannot run {e}");
        }
        eprintln!("faults: SURETY_ADAPTERS named adapters that cannot run; failing.");
        return std::process::ExitCode::FAILURE;
    }

    let mut trials = Vec::new();
    for (adapter, fixture) in &fixtures {
        for scenario in SCENARIOS {
            let (adapter, fixture) = (adapter.clone(), fixture.clone());
            trials.push(Trial::test(format!("{adapter}::{scenario}"), move || {
                let row = match RUNTIME.block_on(run(scenario, &adapter, &fixture)) {
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
