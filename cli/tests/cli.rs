//! Runs the built `surety` binary against a real SQLite file and a real PostgreSQL
//! database: migrate, status, dead rows, re-drive (and the relay then publishing the
//! row), purge, inbox status, exit codes, and that passwords never reach the output.

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use surety_core::{Broker, Message, RetryPolicy, Topology};
use surety_memory::MemoryBroker;
use surety_sql::sqlx::{self, AssertSqlSafe};
use surety_sql::{
    Backend, EntryState, PgStore, Relay, RelayConfig, SqlStore, SqliteStore, StoreConfig,
    TableNames,
};

fn unique(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{what}_{}_{nanos}", std::process::id())
}

/// A RocketMQ secret key the tests put in a broker URL (the open test broker ignores
/// ACL keys): no output of any command may show it.
const ROCKETMQ_SECRET: &str = "sk/cli@S3CRET:x";

/// Runs `surety args...` with no connection settings inherited from the environment, and
/// checks that its output shows no secret the tests hand it.
fn surety(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_surety"))
        .args(args)
        .env_remove("SURETY_DATABASE_URL")
        .env_remove("SURETY_POSTGRES_URL")
        .env_remove("SURETY_TABLE_PREFIX")
        .env_remove("SURETY_BROKER_URL")
        .output()
        .expect("run surety");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!(
        "$ surety {}\n  exit {:?}\n{stdout}{stderr}",
        surety_core::redact::redact_text(&args.join(" ")),
        out.status.code(),
    );
    for secret in [ROCKETMQ_SECRET, "S3CRET"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret in the output of surety {}",
            surety_core::redact::redact_text(&args.join(" "))
        );
    }
    out
}

fn ok_json(args: &[&str]) -> Value {
    let out = surety(args);
    assert_eq!(out.status.code(), Some(0), "{args:?} failed");
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

fn relay<DB: Backend>(
    store: &SqlStore<DB>,
    publisher: Arc<dyn surety_core::Publisher>,
) -> Relay<DB> {
    Relay::new(
        store.clone(),
        publisher,
        RelayConfig {
            // One attempt: a refused publish makes the row dead at once.
            retry: RetryPolicy::with_max_attempts(1),
            ..RelayConfig::default()
        },
    )
}

async fn enqueue<DB: Backend>(store: &SqlStore<DB>, messages: &[Message]) {
    let mut tx = store.pool().begin().await.unwrap();
    for m in messages {
        store.outbox().enqueue(&mut tx, m).await.unwrap();
    }
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_status_dead_redrive_and_relay_publishes() {
    let path = std::env::temp_dir().join(format!("{}.db", unique("surety_cli")));
    let url = format!("sqlite://{}", path.display());
    let prefix = "clitest";
    let db = ["--database-url", url.as_str(), "--table-prefix", prefix];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(db.iter())
            .map(|s| (*s).to_owned())
            .collect()
    };
    let run = |args: &[&str]| {
        let a = with(args);
        surety(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let json = |args: &[&str]| {
        let a = with(args);
        ok_json(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Before migrate, a status is an operational failure with a hint, not a crash.
    let out = run(&["outbox", "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("surety migrate"));

    let out = run(&["migrate"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("clitest_outbox"));
    // Idempotent.
    assert_eq!(run(&["migrate"]).status.code(), Some(0));

    let store = SqliteStore::connect(
        &url,
        StoreConfig::default().tables(TableNames::prefixed(prefix)),
    )
    .await
    .unwrap();
    let broker = MemoryBroker::new();
    broker
        .declare(&Topology::new("orders").group("g"))
        .await
        .unwrap();
    let orders: Vec<Message> = (0..2)
        .map(|i| Message::new("orders", format!("order {i}")))
        .collect();
    let doomed = Message::new("invoices", "not declared yet: refused");
    let other_a = Message::new("nowhere-a", "a");
    let other_b = Message::new("nowhere-b", "b");
    enqueue(
        &store,
        &[
            orders[0].clone(),
            orders[1].clone(),
            doomed.clone(),
            other_a.clone(),
            other_b.clone(),
        ],
    )
    .await;

    let status = json(&["outbox", "status", "--json"]);
    assert_eq!(status["counts"]["PENDING"], 5, "{status}");
    assert!(status["oldest_pending_age_ms"].is_u64(), "{status}");

    let s = relay(&store, broker.publisher().await.unwrap())
        .run_once()
        .await
        .unwrap();
    assert_eq!((s.sent, s.dead), (2, 3), "{s:?}");

    let status = json(&["outbox", "status", "--json"]);
    assert_eq!(status["counts"]["SENT"], 2, "{status}");
    assert_eq!(status["counts"]["DEAD"], 3, "{status}");
    assert_eq!(status["counts"]["PENDING"], 0, "{status}");
    assert!(status["oldest_pending_age_ms"].is_null(), "{status}");
    let per_destination = status["destinations"].as_array().unwrap();
    let invoices = per_destination
        .iter()
        .find(|d| d["destination"] == "invoices")
        .expect("invoices listed");
    assert_eq!(invoices["counts"]["DEAD"], 1);
    let orders_row = per_destination
        .iter()
        .find(|d| d["destination"] == "orders")
        .unwrap();
    assert_eq!(orders_row["counts"]["SENT"], 2);
    // The table form shows the same numbers.
    let table = String::from_utf8(run(&["outbox", "status"]).stdout).unwrap();
    assert!(table.contains("invoices"), "{table}");
    assert!(table.contains("DEAD"), "{table}");

    // Dead rows, with the reason; paged.
    let dead = json(&["outbox", "dead", "--json"]);
    let rows = dead["dead"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{dead}");
    let row = rows
        .iter()
        .find(|r| r["message_id"] == doomed.id().as_str())
        .unwrap();
    assert_eq!(row["destination"], "invoices");
    assert_eq!(row["attempts"], 1);
    assert!(
        !row["last_error"].as_str().unwrap_or("").is_empty(),
        "{row}"
    );
    let page = json(&["outbox", "dead", "--json", "--limit", "2"]);
    assert_eq!(page["dead"].as_array().unwrap().len(), 2);
    let after = page["next_after"].as_i64().unwrap().to_string();
    let rest = json(&[
        "outbox", "dead", "--json", "--limit", "2", "--after", &after,
    ]);
    assert_eq!(rest["dead"].as_array().unwrap().len(), 1);
    let table = String::from_utf8(run(&["outbox", "dead"]).stdout).unwrap();
    assert!(table.contains(doomed.id().as_str()), "{table}");

    // Re-drive one row: back to PENDING with its attempts reset.
    let out = run(&["outbox", "redrive", doomed.id().as_str()]);
    assert_eq!(out.status.code(), Some(0));
    let entry = store.outbox().get(doomed.id()).await.unwrap().unwrap();
    assert_eq!(entry.state, EntryState::Pending);
    assert_eq!(entry.attempts, 0);
    // It is no longer dead: a second re-drive is an operational failure.
    assert_eq!(
        run(&["outbox", "redrive", doomed.id().as_str()])
            .status
            .code(),
        Some(1)
    );

    // The destination exists now: the relay publishes the re-driven row.
    broker
        .declare(&Topology::new("invoices").group("g"))
        .await
        .unwrap();
    let s = relay(&store, broker.publisher().await.unwrap())
        .run_once()
        .await
        .unwrap();
    assert_eq!((s.claimed, s.sent, s.dead), (1, 1, 0), "{s:?}");
    assert_eq!(broker.backlog("invoices", "g"), 1);
    assert_eq!(
        store
            .outbox()
            .get(doomed.id())
            .await
            .unwrap()
            .unwrap()
            .state,
        EntryState::Sent
    );

    // --all --destination re-drives only that destination's dead rows.
    let r = json(&[
        "outbox",
        "redrive",
        "--all",
        "--destination",
        "nowhere-a",
        "--json",
    ]);
    assert_eq!(r["redriven"], 1, "{r}");
    assert_eq!(
        store
            .outbox()
            .get(other_a.id())
            .await
            .unwrap()
            .unwrap()
            .state,
        EntryState::Pending
    );
    assert_eq!(
        store
            .outbox()
            .get(other_b.id())
            .await
            .unwrap()
            .unwrap()
            .state,
        EntryState::Dead
    );
    let r = json(&["outbox", "redrive", "--all", "--json"]);
    assert_eq!(r["redriven"], 1, "{r}");
    let status = json(&["outbox", "status", "--json"]);
    assert_eq!(status["counts"]["DEAD"], 0, "{status}");
    assert_eq!(status["counts"]["PENDING"], 2, "{status}");
    assert_eq!(status["counts"]["SENT"], 3, "{status}");

    // Purge: nothing is a day old; everything sent is older than zero.
    let p = json(&["outbox", "purge-completed", "--older-than", "1d", "--json"]);
    assert_eq!(p["deleted_sent_rows"], 0, "{p}");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let p = json(&["outbox", "purge-completed", "--older-than", "0s", "--json"]);
    assert_eq!(p["deleted_sent_rows"], 3, "{p}");
    let status = json(&["outbox", "status", "--json"]);
    assert_eq!(status["counts"]["SENT"], 0, "{status}");
    assert_eq!(status["counts"]["PENDING"], 2, "pending rows are kept");

    // Inbox status: keys per consumer.
    let pool = store.pool();
    let mut tx = pool.begin().await.unwrap();
    for m in &orders {
        assert!(
            store
                .inbox()
                .record(&mut *tx, "billing", m.id())
                .await
                .unwrap()
        );
    }
    tx.commit().await.unwrap();
    let inbox = json(&["inbox", "status", "--json"]);
    let consumers = inbox["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1, "{inbox}");
    assert_eq!(consumers[0]["consumer"], "billing");
    assert_eq!(consumers[0]["keys"], 2);
    let table = String::from_utf8(run(&["inbox", "status"]).stdout).unwrap();
    assert!(table.contains("billing"), "{table}");

    store.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[test]
fn usage_errors_exit_2_and_missing_settings_exit_1() {
    assert_eq!(surety(&["outbox", "frobnicate"]).status.code(), Some(2));
    assert_eq!(
        surety(&["outbox", "redrive", "--database-url", "sqlite::memory:"])
            .status
            .code(),
        Some(2),
        "an id or --all is required"
    );
    assert_eq!(
        surety(&["outbox", "redrive", "x", "--destination", "d"])
            .status
            .code(),
        Some(2),
        "--destination needs --all"
    );
    assert_eq!(
        surety(&["outbox", "purge-completed", "--older-than", "soon"])
            .status
            .code(),
        Some(2)
    );
    let out = surety(&["outbox", "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SURETY_DATABASE_URL"));
}

#[test]
fn unreachable_database_exits_1_without_the_password() {
    let secret = "hunter2-do-not-print";
    // Port 1: nothing listens, the connection is refused.
    let url = format!("postgres://surety:{secret}@127.0.0.1:1/surety");
    for json in [false, true] {
        let mut args = vec!["outbox", "status", "--database-url", url.as_str()];
        if json {
            args.push("--json");
        }
        let out = surety(&args);
        assert_eq!(out.status.code(), Some(1));
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(secret), "password printed: {all}");
        assert!(all.contains("unavailable"), "typed error expected: {all}");
        if json {
            let doc: Value = serde_json::from_str(String::from_utf8_lossy(&out.stderr).trim())
                .expect("JSON error on stderr");
            assert_eq!(doc["error"]["kind"], "unavailable");
            assert_eq!(doc["error"]["retryable"], true);
        }
    }
}

fn postgres_url() -> String {
    std::env::var("SURETY_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://surety:surety@127.0.0.1:5432/surety".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrate_and_status_from_the_environment() {
    let url = postgres_url();
    let prefix = unique("cli");
    // Settings from the environment, as a deployment would pass them.
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_surety"))
            .args(args)
            .env("SURETY_DATABASE_URL", &url)
            .env("SURETY_TABLE_PREFIX", &prefix)
            .output()
            .unwrap();
        eprintln!(
            "$ surety {}\n  exit {:?}\n{}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let out = run(&["migrate"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("{prefix}_outbox")), "{stdout}");
    if let Some(password) = url.split('@').next().and_then(|u| u.rsplit(':').next())
        && !password.is_empty()
        && !password.contains('/')
    {
        assert!(
            stdout.contains(":***@"),
            "the URL is shown redacted: {stdout}"
        );
    }

    let store = PgStore::connect(
        &url,
        StoreConfig::default().tables(TableNames::prefixed(&prefix)),
    )
    .await
    .unwrap();
    enqueue(
        &store,
        &[
            Message::new("orders", "1"),
            Message::new("orders", "2"),
            Message::new("refunds", "3"),
        ],
    )
    .await;

    let out = run(&["outbox", "status", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["dialect"], "postgres");
    assert_eq!(status["counts"]["PENDING"], 3, "{status}");
    assert!(status["oldest_pending_age_ms"].is_u64(), "{status}");
    let refunds = status["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["destination"] == "refunds")
        .unwrap()
        .clone();
    assert_eq!(refunds["counts"]["PENDING"], 1);
    let out = run(&["outbox", "status"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("refunds"));
    let out = run(&["inbox", "status", "--json"]);
    assert_eq!(out.status.code(), Some(0));

    let pool = store.pool();
    for table in ["outbox", "inbox", "migrations"] {
        sqlx::query(AssertSqlSafe(format!("DROP TABLE {prefix}_{table}")))
            .execute(pool)
            .await
            .unwrap();
    }
    store.close().await;
}

// ---------------------------------------------------------------------------------------
// verify

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// A few healthy-broker cases, enough to show the matrix on a real broker without the
/// minutes of the full suite (the conformance test runs all of them per adapter).
const SOME_CASES: &[&str] = &[
    "confirm_then_consume",
    "unroutable_is_an_error",
    "ack_after_process",
];

fn verify_json(broker: &str, cases: &[&str]) -> Value {
    let mut args = vec!["verify", "--json", "--broker", broker];
    for case in cases {
        args.extend(["--case", case]);
    }
    let doc = ok_json(&args);
    assert_eq!(doc["failed"], 0, "{doc}");
    let rows = doc["cases"].as_array().unwrap();
    let expected = if cases.is_empty() {
        rows.len()
    } else {
        cases.len()
    };
    assert_eq!(rows.len(), expected, "{doc}");
    for row in rows {
        assert!(
            row["result"] == "pass" || row["result"] == "not_supported",
            "{row}"
        );
    }
    doc
}

#[test]
fn verify_memory_runs_every_case() {
    let doc = verify_json("memory:", &[]);
    let rows = doc["cases"].as_array().unwrap();
    let passed = rows.iter().filter(|r| r["result"] == "pass").count();
    assert!(passed >= 20, "{doc}");
    // Only the hostile-input cases may be unsupported: they send through the broker's own
    // client, and the memory broker has no wire for one.
    assert!(
        rows.iter().all(|r| r["result"] == "pass"
            || (r["result"] == "not_supported"
                && r["reason"]
                    .as_str()
                    .is_some_and(|why| why.contains("foreign producer")))),
        "{doc}"
    );
    // The table form prints the matrix.
    let out = surety(&[
        "verify",
        "--broker",
        "memory:",
        "--case",
        "confirm_then_consume",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("| confirm_then_consume | memory | pass")
    );
}

#[test]
fn verify_rabbitmq() {
    let url = env_or(
        "SURETY_RABBITMQ_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    );
    let doc = verify_json(&url, SOME_CASES);
    assert_eq!(doc["adapter"], "rabbitmq");
    let shown = doc["broker"].as_str().unwrap();
    assert!(!shown.contains(":guest@"), "password shown: {shown}");
}

#[test]
fn verify_kafka() {
    let servers = env_or("SURETY_KAFKA_BOOTSTRAP", "127.0.0.1:9092");
    let doc = verify_json(&format!("kafka://{servers}"), SOME_CASES);
    assert_eq!(doc["adapter"], "kafka");
}

#[test]
fn verify_rocketmq() {
    let namesrv = env_or("SURETY_ROCKETMQ_NAMESRV", "127.0.0.1:9876");
    let doc = verify_json(&format!("rocketmq://{namesrv}"), SOME_CASES);
    assert_eq!(doc["adapter"], "rocketmq");
}

#[test]
fn verify_refuses_bad_input_and_fails_without_secrets() {
    assert_eq!(
        surety(&["verify", "--broker", "nats://x"]).status.code(),
        Some(1)
    );
    assert_eq!(
        surety(&["verify", "--broker", "memory:", "--case", "no_such_case"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        surety(&["verify"]).status.code(),
        Some(2),
        "--broker needed"
    );
    let secret = "verify-secret-pw";
    let out = surety(&[
        "verify",
        "--broker",
        &format!("amqp://guest:{secret}@127.0.0.1:1/%2f"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(secret), "password printed: {all}");
}

// ---------------------------------------------------------------------------------------
// dlq: poison -> `dlq list` shows it -> `dlq redrive` -> the consumer gets it -> audit

/// The broker behind a URL, built in the test process to declare, consume and publish.
async fn broker_for(url: &str) -> Arc<dyn Broker> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
    match scheme {
        "amqp" => Arc::new(
            surety_rabbitmq::RabbitBroker::connect(
                surety_rabbitmq::RabbitConfig::from_url(url).unwrap(),
            )
            .await
            .expect("RabbitMQ must be running"),
        ),
        "kafka" => Arc::new(
            surety_kafka::KafkaBroker::connect(surety_kafka::KafkaConfig::from_url(url).unwrap())
                .await
                .expect("Kafka must be running"),
        ),
        "rocketmq" => Arc::new(
            surety_rocketmq::RocketMqBroker::connect(
                surety_rocketmq::RocketMqConfig::from_url(url).unwrap(),
            )
            .await
            .expect("RocketMQ must be running"),
        ),
        other => panic!("no broker for scheme {other}"),
    }
}

/// Where the audit goes in a run.
enum AuditAt {
    File(std::path::PathBuf),
    Postgres { url: String, prefix: String },
}

impl AuditAt {
    fn args(&self) -> Vec<String> {
        match self {
            AuditAt::File(path) => vec!["--audit-log".into(), path.display().to_string()],
            AuditAt::Postgres { url, prefix } => vec![
                "--database-url".into(),
                url.clone(),
                "--table-prefix".into(),
                prefix.clone(),
            ],
        }
    }
}

fn run_strings(args: &[String]) -> Output {
    surety(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The whole operator cycle on one broker, with the audit in `audit`.
async fn dlq_cycle(url: &str, adapter: &str, audit: AuditAt) {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use surety_core::{Delivery, Outcome, Subscription, handler_fn};

    let broker = broker_for(url).await;
    let dest = unique("dlqcli").replace('_', "-");
    let group = "billing";
    broker
        .declare(&Topology::new(&dest).group(group))
        .await
        .unwrap();
    let healed = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let (h, s) = (healed.clone(), seen.clone());
    let handler = handler_fn(move |d: Delivery| {
        let (h, s) = (h.clone(), s.clone());
        async move {
            s.lock().unwrap().push(d);
            Ok(if h.load(Ordering::SeqCst) {
                Outcome::Ack
            } else {
                Outcome::reject("total is negative")
            })
        }
    });
    let handle = broker
        .subscriber()
        .await
        .unwrap()
        .subscribe(
            Subscription::new(&dest, group).retry(RetryPolicy::with_max_attempts(1)),
            Arc::new(handler),
        )
        .await
        .expect("subscribe");
    let poison = [
        Message::new(&dest, "order 1: total -5"),
        Message::new(&dest, vec![0u8, 159, 146, 150, 255]),
    ];
    let publisher = broker.publisher().await.unwrap();
    for m in &poison {
        publisher.publish(m).await.unwrap();
    }

    let target: Vec<String> = [
        "--broker",
        url,
        "--destination",
        dest.as_str(),
        "--group",
        group,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let cmd = |head: &[&str], tail: &[String]| -> Vec<String> {
        let mut v: Vec<String> = head.iter().map(|s| (*s).to_owned()).collect();
        v.extend(target.iter().cloned());
        v.extend(tail.iter().cloned());
        v
    };

    // `dlq list` shows both dead letters (once the consumer has rejected them).
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let listed = loop {
        let out = run_strings(&cmd(&["dlq", "list", "--json"], &[]));
        assert_eq!(out.status.code(), Some(0), "dlq list on {adapter} failed");
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["adapter"], adapter);
        if doc["count"] == 2 || std::time::Instant::now() > deadline {
            break doc;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let letters = listed["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{listed}");
    // Dead letters of one batch may reach the dead-letter destination in either order (the
    // consumer handles them concurrently): match them by id.
    let letter_of = |m: &Message| {
        letters
            .iter()
            .find(|l| l["message_id"] == m.id().as_str())
            .unwrap_or_else(|| panic!("{} not listed: {listed}", m.id()))
    };
    for m in &poison {
        let letter = letter_of(m);
        assert!(
            letter["reason"]
                .as_str()
                .unwrap()
                .contains("total is negative"),
            "{letter}"
        );
        assert_eq!(letter["attempts"], 1, "{letter}");
        assert_eq!(letter["original_destination"], dest.as_str());
    }
    assert_eq!(letter_of(&poison[1])["payload_encoding"], "hex");
    assert!(!listed.to_string().contains(":guest@"), "password printed");
    // The table form; listing again removed nothing.
    let out = run_strings(&cmd(&["dlq", "list"], &[]));
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.contains(poison[0].id().as_str()), "{table}");
    assert!(table.contains(poison[1].id().as_str()), "{table}");
    assert!(table.contains("total is negative"), "{table}");

    // `dlq show`: one message, text and binary payloads both safe to print.
    let out = run_strings(&cmd(&["dlq", "show", poison[0].id().as_str()], &[]));
    assert_eq!(out.status.code(), Some(0));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.contains("order 1: total -5"), "{shown}");
    assert!(shown.contains("total is negative"), "{shown}");
    let out = run_strings(&cmd(
        &["dlq", "show", poison[1].id().as_str(), "--json"],
        &[],
    ));
    assert_eq!(out.status.code(), Some(0));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["payload_preview"], "00 9f 92 96 ff", "{doc}");
    let stranger = surety_core::MessageId::new();
    let out = run_strings(&cmd(&["dlq", "show", stranger.as_str()], &[]));
    assert_eq!(out.status.code(), Some(3), "an unknown id exits 3");

    // Fixed: re-drive the first one by id (and an unknown one: exit 3, the rest done).
    healed.store(true, Ordering::SeqCst);
    let before = seen.lock().unwrap().len();
    let mut tail = vec!["--actor".to_owned(), "alice".to_owned()];
    tail.extend(audit.args());
    let out = run_strings(&cmd(
        &[
            "dlq",
            "redrive",
            poison[0].id().as_str(),
            stranger.as_str(),
            "--json",
        ],
        &tail,
    ));
    assert_eq!(out.status.code(), Some(3), "an unknown id exits 3");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["redriven"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(doc["redriven"][0]["message_id"], poison[0].id().as_str());
    assert_eq!(doc["not_found"][0], stranger.as_str());
    assert_eq!(doc["audited"], true);
    // Then --all.
    let mut tail = vec!["--actor".to_owned(), "bob".to_owned()];
    tail.extend(audit.args());
    let out = run_strings(&cmd(&["dlq", "redrive", "--all", "--json"], &tail));
    assert_eq!(out.status.code(), Some(0));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_bob: Vec<String> = doc["redriven"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(by_bob.contains(&poison[1].id().to_string()), "{doc}");
    if by_bob.len() > 1 {
        // At-least-once upstream: a consumer redelivery (or a retried dead-letter send)
        // can dead-letter one message twice, and every entry is re-driven. The inbox
        // absorbs the extra delivery; nothing is lost.
        eprintln!("{adapter}: a duplicate dead letter was re-driven too: {doc}");
    }
    assert!(
        by_bob
            .iter()
            .all(|id| poison.iter().any(|m| m.id().as_str() == id.as_str())),
        "{doc}"
    );

    // The consumer gets both back, from attempt 1.
    let mut back = false;
    for _ in 0..300 {
        let all_back = {
            let s = seen.lock().unwrap();
            poison
                .iter()
                .all(|m| s[before..].iter().any(|d| d.message.id() == m.id()))
        };
        if all_back {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    handle.shutdown().await;
    assert!(back, "re-driven messages reach the consumer");
    for d in seen.lock().unwrap()[before..].iter() {
        assert_eq!(d.attempt, 1, "attempts reset: {d:?}");
    }
    let out = run_strings(&cmd(&["dlq", "list", "--json"], &[]));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["count"], 0, "nothing left: {doc}");

    // The audit: who, what, when.
    let mut args = vec!["dlq".to_owned(), "audit".to_owned(), "--json".to_owned()];
    args.extend(audit.args());
    let out = run_strings(&args);
    assert_eq!(out.status.code(), Some(0));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let records: Vec<&Value> = doc["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["to"] == dest.as_str())
        .collect();
    // One record per re-driven message, in order: alice's, then bob's.
    assert_eq!(records.len(), 1 + by_bob.len(), "{doc}");
    let dl = broker.dead_letter_destination(&dest, group);
    let expected = std::iter::once((poison[0].id().to_string(), "alice"))
        .chain(by_bob.iter().map(|id| (id.clone(), "bob")));
    for (r, (id, actor)) in records.iter().zip(expected) {
        assert_eq!(r["message_id"], id.as_str(), "{r}");
        assert_eq!(r["actor"], actor);
        assert_eq!(r["adapter"], adapter);
        assert_eq!(r["from"], dl.as_str());
        assert_eq!(r["group"], group);
        assert!(r["redriven_at_ms"].as_u64().unwrap() > 0);
    }
    if let AuditAt::Postgres { url, prefix } = &audit {
        // The rows are in the table itself.
        let store = PgStore::connect(
            url,
            StoreConfig::default().tables(TableNames::prefixed(prefix)),
        )
        .await
        .unwrap();
        let rows = store.dlq_audit().list(0, 100).await.unwrap();
        assert_eq!(rows.len(), 1 + by_bob.len());
        assert_eq!(rows[0].entry.actor, "alice");
        let pool = store.pool();
        for table in ["outbox", "inbox", "migrations", "dlq_audit"] {
            sqlx::query(AssertSqlSafe(format!("DROP TABLE {prefix}_{table}")))
                .execute(pool)
                .await
                .unwrap();
        }
        store.close().await;
    }
}

fn rabbitmq_url() -> String {
    env_or(
        "SURETY_RABBITMQ_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

async fn postgres_audit() -> AuditAt {
    let prefix = unique("dlqaudit");
    let url = postgres_url();
    let out = surety(&["migrate", "--database-url", &url, "--table-prefix", &prefix]);
    assert_eq!(out.status.code(), Some(0));
    AuditAt::Postgres { url, prefix }
}

fn file_audit() -> AuditAt {
    AuditAt::File(std::env::temp_dir().join(format!("{}.jsonl", unique("dlq_audit"))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_rabbitmq_audit_in_a_file() {
    dlq_cycle(&rabbitmq_url(), "rabbitmq", file_audit()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_rabbitmq_audit_in_postgres() {
    dlq_cycle(&rabbitmq_url(), "rabbitmq", postgres_audit().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_kafka() {
    let servers = env_or("SURETY_KAFKA_BOOTSTRAP", "127.0.0.1:9092");
    dlq_cycle(&format!("kafka://{servers}"), "kafka", file_audit()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_rocketmq() {
    let namesrv = env_or("SURETY_ROCKETMQ_NAMESRV", "127.0.0.1:9876");
    dlq_cycle(
        &format!("rocketmq://{namesrv}?access_key=surety-cli&secret_key={ROCKETMQ_SECRET}"),
        "rocketmq",
        postgres_audit().await,
    )
    .await;
}

#[test]
fn dlq_usage_and_audit_without_records() {
    // An id or --all, not both; --destination and --group needed.
    let base = ["--broker", "memory:", "--destination", "d", "--group", "g"];
    let with = |head: &[&str]| -> Vec<String> {
        head.iter()
            .chain(base.iter())
            .map(|s| (*s).to_owned())
            .collect()
    };
    assert_eq!(
        run_strings(&with(&["dlq", "redrive"])).status.code(),
        Some(2)
    );
    assert_eq!(
        run_strings(&with(&["dlq", "redrive", "--all", "x"]))
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        surety(&["dlq", "list", "--broker", "memory:"])
            .status
            .code(),
        Some(2)
    );
    // An empty audit file (none yet) lists nothing.
    let path = std::env::temp_dir().join(format!("{}.jsonl", unique("dlq_none")));
    let doc = ok_json(&[
        "dlq",
        "audit",
        "--json",
        "--audit-log",
        &path.display().to_string(),
    ]);
    assert_eq!(doc["records"].as_array().unwrap().len(), 0);
    // A secret in a broker URL never reaches the output.
    let secret = "dlq-secret-pw";
    let bad = format!("amqp://guest:{secret}@127.0.0.1:1/%2f");
    let mut args = vec!["dlq", "list", "--broker", bad.as_str()];
    args.extend(&base[2..]);
    let out = surety(&args);
    assert_eq!(out.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(secret), "password printed: {all}");
}
