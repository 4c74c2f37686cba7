//! Settings of the RocketMQ adapter.

use std::fmt;
use std::time::Duration;

use surety_core::{Error, ErrorKind, Result, RetryPolicy};

/// The environment variable [`RocketMqConfig::from_env`] reads for the name server.
pub const NAMESRV_ENV: &str = "SURETY_ROCKETMQ_NAMESRV";
/// The environment variable for the ACL access key (optional).
pub const ACCESS_KEY_ENV: &str = "SURETY_ROCKETMQ_ACCESS_KEY";
/// The environment variable for the ACL secret key (optional; never logged).
pub const SECRET_KEY_ENV: &str = "SURETY_ROCKETMQ_SECRET_KEY";

/// The broker's default `maxMessageSize` (4 MiB).
pub(crate) const BROKER_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// Settings of a [`crate::RocketMqBroker`].
///
/// The secret key never appears in `Debug` output, errors or logs.
#[derive(Clone)]
pub struct RocketMqConfig {
    /// Name server address list, `host:port[;host:port...]`.
    pub namesrv: String,
    /// ACL access key; with `secret_key` every request is signed (`AclClientRPCHook`).
    pub access_key: Option<String>,
    /// ACL secret key.
    pub secret_key: Option<String>,
    /// Timeout of one send, in the client (`sendMsgTimeout`).
    pub send_timeout: Duration,
    /// How often a publish is retried after a retryable failure (`NotDurable`,
    /// `OutcomeUnknown`, `Unavailable`), and how long to wait between tries (same message
    /// id). The client's own retries are switched off so that this is the only bound.
    ///
    /// Publish retries are off by default on every adapter but this one: here the
    /// default is 3 attempts, because without them a send has no retry at all (the Java
    /// client retries twice by default). `None` turns them off.
    pub publish_retry: Option<RetryPolicy>,
    /// Read and write queues of topics created by `declare`.
    pub queues: u32,
    /// How long `declare` waits for a created topic to appear in the name server's routes.
    pub route_timeout: Duration,
    /// Largest message accepted (payload, key and headers), checked before sending. Kept
    /// below the broker's `maxMessageSize` (4 MiB) to leave room for properties.
    pub max_message_size: usize,
    /// Longest time a consumer's handler may run before the client gives the message up
    /// as failed (it is then redelivered).
    pub handler_timeout: Duration,
    /// How long one check-back may take before it counts as `Unknown` (the broker asks
    /// again later): a hung check-back must not hold the producer's check lane.
    pub check_back_timeout: Duration,
}

impl RocketMqConfig {
    /// Settings for the name server at `namesrv`, with defaults for the rest.
    pub fn new(namesrv: impl Into<String>) -> Self {
        RocketMqConfig {
            namesrv: namesrv.into(),
            access_key: None,
            secret_key: None,
            send_timeout: Duration::from_secs(3),
            publish_retry: Some(
                RetryPolicy::with_max_attempts(3)
                    .backoff(Duration::from_millis(100), Duration::from_secs(1)),
            ),
            queues: 4,
            route_timeout: Duration::from_secs(10),
            max_message_size: BROKER_MAX_MESSAGE_SIZE - 64 * 1024,
            handler_timeout: Duration::from_secs(15 * 60),
            check_back_timeout: surety_core::raw::DEFAULT_CHECK_BACK_TIMEOUT,
        }
    }

    /// Settings from `SURETY_ROCKETMQ_NAMESRV` (default `127.0.0.1:9876`) and, when set,
    /// `SURETY_ROCKETMQ_ACCESS_KEY` / `SURETY_ROCKETMQ_SECRET_KEY`.
    pub fn from_env() -> Self {
        let namesrv = std::env::var(NAMESRV_ENV)
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "127.0.0.1:9876".to_owned());
        let mut config = RocketMqConfig::new(namesrv);
        config.access_key = std::env::var(ACCESS_KEY_ENV).ok().filter(|s| !s.is_empty());
        config.secret_key = std::env::var(SECRET_KEY_ENV).ok().filter(|s| !s.is_empty());
        config
    }

    /// Settings from a URL: `rocketmq://host:port[;host:port...][?access_key=AK&secret_key=SK]`.
    /// Errors never repeat the secret.
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::new(ErrorKind::Configuration, format!("bad RocketMQ URL: {why}"))
                .with_context("adapter", crate::ADAPTER)
        };
        let rest = url
            .strip_prefix("rocketmq://")
            .ok_or_else(|| bad("expected rocketmq://host:port"))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.is_empty() {
            return Err(bad("no name server address"));
        }
        let mut config = RocketMqConfig::new(hosts.replace(',', ";"));
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("access_key", v)) => config.access_key = Some(v.to_owned()),
                Some(("secret_key", v)) => config.secret_key = Some(v.to_owned()),
                Some((k, _)) => return Err(bad(&format!("unknown parameter {k:?}"))),
                None => return Err(bad("parameters are key=value")),
            }
        }
        if config.access_key.is_some() != config.secret_key.is_some() {
            return Err(bad("access_key and secret_key go together"));
        }
        Ok(config)
    }

    /// Sets the ACL credentials.
    pub fn credentials(
        mut self,
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
    ) -> Self {
        self.access_key = Some(access_key.into());
        self.secret_key = Some(secret_key.into());
        self
    }
}

impl fmt::Debug for RocketMqConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocketMqConfig")
            .field("namesrv", &self.namesrv)
            .field("access_key", &self.access_key)
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "<redacted>"),
            )
            .field("send_timeout", &self.send_timeout)
            .field("publish_retry", &self.publish_retry)
            .field("queues", &self.queues)
            .field("route_timeout", &self.route_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("handler_timeout", &self.handler_timeout)
            .field("check_back_timeout", &self.check_back_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parses_and_errors_hide_the_secret() {
        let c = RocketMqConfig::from_url("rocketmq://a:9876,b:9876?access_key=ak&secret_key=sk1")
            .unwrap();
        assert_eq!(c.namesrv, "a:9876;b:9876");
        assert_eq!(c.access_key.as_deref(), Some("ak"));
        let e = RocketMqConfig::from_url("rocketmq://a:9876?secret_key=sk2").unwrap_err();
        assert!(!e.to_string().contains("sk2"), "{e}");
        assert!(RocketMqConfig::from_url("kafka://a:1").is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = RocketMqConfig::new("127.0.0.1:9876").credentials("ak", "very-secret");
        let text = format!("{c:?}");
        assert!(!text.contains("very-secret"), "{text}");
        assert!(text.contains("ak"));
    }
}
