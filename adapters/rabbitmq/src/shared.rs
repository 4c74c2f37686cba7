//! The connection supervisor: one AMQP connection per broker object, replaced when it
//! dies, and channels that are reopened on demand.
//!
//! lapin's own auto-recovery is not enabled: it is young (reconnects during a server
//! restart and acks on pre-recovery channels have had bugs), and it would replay
//! channels behind the adapter's back. Instead every user of a channel checks it before
//! use and asks for a new one when it is gone; the connection is re-established here,
//! once per failure, and counted in [`surety_core::telemetry::RECONNECTS`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use surety_core::raw::PublishPath;
use surety_core::{Capabilities, Capability, Error, ErrorKind, Result, telemetry};
use tokio::sync::Mutex;

use crate::ADAPTER;
use crate::config::RabbitConfig;
use crate::confirms::Tracker;
use crate::error;

/// Counts one re-established connection or channel and says so in the log.
pub(crate) fn record_reconnect(what: &'static str) {
    metrics::counter!(telemetry::RECONNECTS, "adapter" => ADAPTER, "what" => what).increment(1);
    tracing::info!(adapter = ADAPTER, what, "re-established after a failure");
}

pub(crate) struct Connector {
    config: Arc<RabbitConfig>,
    uri: lapin::uri::AMQPUri,
    current: Mutex<Option<Arc<Connection>>>,
    ever_connected: AtomicBool,
}

impl Connector {
    pub(crate) fn new(config: Arc<RabbitConfig>) -> Result<Self> {
        let uri = config.parse_uri()?;
        Ok(Connector {
            config,
            uri,
            current: Mutex::new(None),
            ever_connected: AtomicBool::new(false),
        })
    }

    pub(crate) fn config(&self) -> &RabbitConfig {
        &self.config
    }

    /// What the adapter offers with these settings.
    pub(crate) fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with(Capability::OnewayPublish)
            .with(Capability::BrokerTransactions)
            .with(Capability::DelayedRetry)
            .with(Capability::DeadLetter)
            .with_max_message_size(self.config.max_message_size)
    }

    /// The publish path of this adapter: validation, span, metrics, retries.
    pub(crate) fn publish_path(&self) -> PublishPath {
        PublishPath::new(ADAPTER, self.capabilities()).with_retry(self.config.publish_retry.clone())
    }

    /// A live connection: the current one, or a new one if it died. One attempt: a
    /// caller that wants to wait for the broker retries with its own backoff.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref()
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(self.config.connection_name.clone().into());
        let attempt = Connection::connect_uri(self.uri.clone(), properties);
        let connection = match tokio::time::timeout(self.config.connect_timeout, attempt).await {
            Ok(Ok(c)) => Arc::new(c),
            Ok(Err(e)) if error::is_access_refused(&e) => {
                // A settings error: a retry loop must not spin on it.
                return Err(Error::new(
                    ErrorKind::Authentication,
                    format!(
                        "RabbitMQ at {} refused the login: check the user, its password and                          its access to the vhost",
                        self.config.redacted_url()
                    ),
                )
                .with_context("adapter", ADAPTER)
                .with_source(e));
            }
            Ok(Err(e)) => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "cannot connect to RabbitMQ at {}",
                        self.config.redacted_url()
                    ),
                )
                .with_context("adapter", ADAPTER)
                .with_source(e));
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "connecting to RabbitMQ at {} timed out after {:?}",
                        self.config.redacted_url(),
                        self.config.connect_timeout
                    ),
                )
                .with_context("adapter", ADAPTER));
            }
        };
        if self.ever_connected.swap(true, Ordering::SeqCst) {
            record_reconnect("connection");
        }
        *current = Some(connection.clone());
        Ok(connection)
    }

    /// A new channel on a live connection.
    pub(crate) async fn channel(&self) -> Result<Channel> {
        let connection = self.connection().await?;
        match connection.create_channel().await {
            Ok(channel) => Ok(channel),
            // The connection may have died between the check and the call: one more try
            // on a fresh connection.
            Err(_) => self
                .connection()
                .await?
                .create_channel()
                .await
                .map_err(|e| error::unavailable("open a channel", e)),
        }
    }

    /// A new channel in confirm mode.
    pub(crate) async fn confirm_channel(&self) -> Result<Channel> {
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| error::unavailable("put a channel in confirm mode", e))?;
        Ok(channel)
    }
}

/// A confirm-mode channel that is reopened when it fails. Shared by concurrent
/// publishes: lapin channels are `Clone + Send + Sync` and pipeline confirms. Each
/// channel has its own [`Tracker`], which matches returns to publishes.
pub(crate) struct ConfirmChannel {
    connector: Arc<Connector>,
    /// Read on every publish: a plain lock held for a clone, never across an await.
    current: std::sync::Mutex<Option<(Channel, Tracker)>>,
    /// Held while a channel is reopened, so concurrent publishes open one, not many.
    reopening: Mutex<()>,
    what: &'static str,
}

impl ConfirmChannel {
    pub(crate) fn new(connector: Arc<Connector>, what: &'static str) -> Self {
        ConfirmChannel {
            connector,
            current: std::sync::Mutex::new(None),
            reopening: Mutex::new(()),
            what,
        }
    }

    /// The current channel and tracker if the channel is open; whether there was one.
    fn live(&self) -> (Option<(Channel, Tracker)>, bool) {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match current.as_ref() {
            Some((c, t)) if c.status().connected() => (Some((c.clone(), t.clone())), true),
            other => (None, other.is_some()),
        }
    }

    /// The channel and its tracker, reopened if the channel is gone.
    pub(crate) async fn get(&self) -> Result<(Channel, Tracker)> {
        if let (Some(live), _) = self.live() {
            return Ok(live);
        }
        let _reopening = self.reopening.lock().await;
        let had_one = match self.live() {
            // Another publish reopened it while this one waited.
            (Some(live), _) => return Ok(live),
            (None, had_one) => had_one,
        };
        let channel = self.connector.confirm_channel().await?;
        if had_one {
            record_reconnect(self.what);
        }
        let tracker = Tracker::spawn();
        // Replacing the old tracker lets its task end once its confirms are settled
        // (those of a dead channel fail at once).
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((channel.clone(), tracker.clone()));
        Ok((channel, tracker))
    }

    pub(crate) fn connector(&self) -> &Arc<Connector> {
        &self.connector
    }
}
