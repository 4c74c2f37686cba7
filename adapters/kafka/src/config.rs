//! Settings of the Kafka adapter and the librdkafka client configurations built from them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use surety_core::{Error, ErrorKind, Result, RetryPolicy};

use crate::ADAPTER;

/// The environment variable [`KafkaConfig::from_env`] reads.
pub const BOOTSTRAP_ENV: &str = "SURETY_KAFKA_BOOTSTRAP";

/// Settings of a [`crate::KafkaBroker`].
///
/// `settings` are passed to every librdkafka client the adapter creates (producer,
/// transactional producers, consumers, admin client): put `security.protocol`,
/// `ssl.*` and `sasl.*` there. Their values never appear in `Debug` output, errors or
/// logs when the key names a secret (password, secret, key, token, JAAS config).
/// TLS needs the crate feature `ssl` (or `ssl-vendored`); without it librdkafka rejects
/// `security.protocol=ssl` at client creation with a configuration error.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// Extra librdkafka settings for every client (TLS, SASL, `client.id`...).
    pub settings: BTreeMap<String, String>,
    /// Partitions of topics created by `declare`; `None` uses the broker's `num.partitions`.
    pub partitions: Option<i32>,
    /// Replication factor of created topics; `None` uses the broker's default.
    pub replication_factor: Option<i32>,
    /// How long librdkafka keeps retrying a send before reporting it failed
    /// (`delivery.timeout.ms`). The idempotent producer retries within it without
    /// duplicates or reordering.
    pub delivery_timeout: Duration,
    /// Consumer `session.timeout.ms`: how long before a silent consumer's partitions move.
    pub session_timeout: Duration,
    /// Consumer `heartbeat.interval.ms`: also how fast a consumer notices a rebalance.
    pub heartbeat_interval: Duration,
    /// `transaction.timeout.ms` of transactional producers: how long an abandoned
    /// transaction can hold back read-committed consumers before the broker aborts it.
    pub transaction_timeout: Duration,
    /// Timeout of one blocking broker call (metadata, commit, transaction calls).
    pub request_timeout: Duration,
    /// Largest message accepted (payload, key and headers), checked before sending.
    /// Kept below the producer's `message.max.bytes` to leave room for Surety's headers
    /// and the record overhead.
    pub max_message_size: usize,
    /// Prefix of the `transactional.id`s of [`surety_core::Broker::begin_transaction`]
    /// producers.
    pub transactional_id_prefix: String,
    /// How long a rebalance waits for a revoked partition's in-flight handler to settle
    /// before giving the partition up without committing it.
    pub rebalance_drain_timeout: Duration,
    /// Retries of a publish that failed with a retryable error after librdkafka's own
    /// retries (`delivery_timeout`) ran out, with the same message id. Off by default.
    pub publish_retry: Option<RetryPolicy>,
}

/// The producer's `message.max.bytes` (librdkafka default, below the broker's).
pub(crate) const PRODUCER_MESSAGE_MAX_BYTES: usize = 1_000_000;

impl KafkaConfig {
    /// Settings for the cluster at `bootstrap_servers`, with defaults for the rest.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        KafkaConfig {
            bootstrap_servers: bootstrap_servers.into(),
            settings: BTreeMap::new(),
            partitions: None,
            replication_factor: None,
            delivery_timeout: Duration::from_secs(120),
            session_timeout: Duration::from_secs(6),
            heartbeat_interval: Duration::from_millis(500),
            transaction_timeout: Duration::from_secs(15),
            request_timeout: Duration::from_secs(30),
            max_message_size: PRODUCER_MESSAGE_MAX_BYTES - 64 * 1024,
            transactional_id_prefix: "surety".to_owned(),
            rebalance_drain_timeout: Duration::from_secs(30),
            publish_retry: None,
        }
    }

    /// Settings from `SURETY_KAFKA_BOOTSTRAP` (default `127.0.0.1:9092`).
    pub fn from_env() -> Self {
        KafkaConfig::new(
            std::env::var(BOOTSTRAP_ENV)
                .ok()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| "127.0.0.1:9092".to_owned()),
        )
    }

    /// Settings from a URL `kafka://host:port[,host:port...]`. User info in the URL is
    /// refused (put SASL credentials in [`KafkaConfig::settings`]), and the URL is never
    /// echoed in errors.
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::Configuration,
                format!("invalid kafka URL: {why}"),
            )
            .with_context("adapter", ADAPTER)
        };
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| bad("expected kafka://host:port[,host:port]"))?;
        let hosts = rest.trim_end_matches('/');
        if hosts.contains('@') {
            return Err(bad(
                "credentials in the URL are not accepted; use SASL settings",
            ));
        }
        if hosts.is_empty() || hosts.contains(['/', '?', '#']) {
            return Err(bad("expected kafka://host:port[,host:port]"));
        }
        Ok(KafkaConfig::new(hosts))
    }

    /// Adds a librdkafka setting passed to every client.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.insert(key.into(), value.into());
        self
    }

    /// Sets the partitions of created topics.
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Sets the delivery timeout.
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// Sets the transactional id prefix.
    pub fn transactional_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.transactional_id_prefix = prefix.into();
        self
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        c.set("client.id", "surety-kafka");
        for (k, v) in &self.settings {
            c.set(k, v);
        }
        c
    }

    /// The idempotent producer of confirmed sends.
    pub(crate) fn producer(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            // Publishing to an undeclared topic must fail, not create it (the broker may
            // have auto.create.topics.enable=true). The adapter also checks metadata.
            .set("allow.auto.create.topics", "false")
            .set("message.max.bytes", PRODUCER_MESSAGE_MAX_BYTES.to_string())
            .set("linger.ms", "2")
            .set(
                "delivery.timeout.ms",
                millis(self.delivery_timeout).to_string(),
            );
        self.apply_overrides(&mut c);
        c
    }

    /// A transactional producer with `transactional_id`.
    pub(crate) fn transactional_producer(&self, transactional_id: &str) -> ClientConfig {
        let mut c = self.producer();
        // librdkafka refuses a transactional producer whose sends may outlive the
        // transaction: a record still retrying after the broker aborted would be orphaned.
        let delivery = self.delivery_timeout.min(self.transaction_timeout);
        c.set("transactional.id", transactional_id)
            .set(
                "transaction.timeout.ms",
                millis(self.transaction_timeout).to_string(),
            )
            .set("delivery.timeout.ms", millis(delivery).to_string());
        self.apply_overrides(&mut c);
        c
    }

    /// A consumer of `group`: read committed, manual commits after the handler.
    pub(crate) fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("allow.auto.create.topics", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            .set(
                "session.timeout.ms",
                millis(self.session_timeout).to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                millis(self.heartbeat_interval).to_string(),
            );
        self.apply_overrides(&mut c);
        c
    }

    /// The admin client of `declare`.
    pub(crate) fn admin(&self) -> ClientConfig {
        self.base()
    }

    /// Re-applies the user's settings so they win over the adapter's defaults, except
    /// for the ones the contracts depend on.
    fn apply_overrides(&self, c: &mut ClientConfig) {
        for (k, v) in &self.settings {
            if !PINNED.contains(&k.as_str()) {
                c.set(k, v);
            }
        }
    }
}

/// Settings the contracts depend on: a user setting cannot override them.
const PINNED: &[&str] = &[
    "enable.idempotence",
    "acks",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "group.id",
    "transactional.id",
    "allow.auto.create.topics",
];

fn millis(d: Duration) -> u128 {
    d.as_millis().max(1)
}

/// Whether a setting's value is a secret that must never be shown.
pub(crate) fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key",
        "token",
        "jaas",
        "oauthbearer.config",
        "username",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings: BTreeMap<&str, &str> = self
            .settings
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("settings", &settings)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("session_timeout", &self.session_timeout)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("publish_retry", &self.publish_retry)
            .field("transactional_id_prefix", &self.transactional_id_prefix)
            .finish()
    }
}

/// Creates a librdkafka client, turning a configuration error into one that names the
/// setting but never its value (it may be a password).
pub(crate) fn create<T, F>(what: &str, make: F) -> Result<T>
where
    F: FnOnce() -> rdkafka::error::KafkaResult<T>,
{
    make().map_err(|e| {
        let text = match &e {
            rdkafka::error::KafkaError::ClientConfig(_, desc, key, _value) => {
                let desc = if is_secret(key) {
                    "invalid value"
                } else {
                    desc
                };
                format!("invalid librdkafka setting {key:?}: {desc}")
            }
            rdkafka::error::KafkaError::ClientCreation(desc) => {
                format!("cannot create the {what}: {}", scrub(desc))
            }
            other => format!("cannot create the {what}: {}", scrub(&other.to_string())),
        };
        Error::new(ErrorKind::Configuration, text).with_context("adapter", ADAPTER)
    })
}

/// Drops anything after `=` in librdkafka text that could echo a setting.
fn scrub(text: &str) -> String {
    if text.contains('=') && text.to_ascii_lowercase().contains("pass") {
        "(details withheld: they may contain a secret)".to_owned()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_bootstrap_servers_and_refuse_credentials() {
        let c = KafkaConfig::from_url("kafka://a:9092,b:9092").unwrap();
        assert_eq!(c.bootstrap_servers, "a:9092,b:9092");
        let e = KafkaConfig::from_url("kafka://user:hunter2@a:9092").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(KafkaConfig::from_url("amqp://a").is_err());
    }

    #[test]
    fn debug_redacts_secrets() {
        let c = KafkaConfig::new("h:9092")
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "hunter3")
            .set("security.protocol", "sasl_ssl");
        let text = format!("{c:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("hunter3"),
            "{text}"
        );
        assert!(text.contains("sasl_ssl"), "{text}");
    }

    #[test]
    fn user_settings_cannot_turn_off_the_contracts() {
        let c = KafkaConfig::new("h:9092")
            .set("enable.idempotence", "false")
            .set("linger.ms", "50");
        let p = c.producer();
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("linger.ms"), Some("50"));
        let k = c.set("isolation.level", "read_uncommitted").consumer("g");
        assert_eq!(k.get("isolation.level"), Some("read_committed"));
    }

    #[test]
    fn a_bad_secret_setting_is_named_without_its_value() {
        let c = KafkaConfig::new("h:9092").set("sasl.password.bogus", "hunter2");
        let e = create("producer", || {
            c.producer().create::<rdkafka::producer::FutureProducer>()
        })
        .err()
        .expect("an unknown setting is refused");
        assert_eq!(e.kind(), ErrorKind::Configuration);
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
