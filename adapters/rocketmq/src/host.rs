//! The client runtime the rocketmq client needs injected: a `RuntimeOwner` with its own
//! Tokio runtime, and the `ClientRuntime` derived from it.
//!
//! The client runs its listeners (transaction execute, check-back, consume) on the
//! runtime's "metadata I/O" blocking lane. Surety's listeners block there while an async
//! handler runs, so the lane is sized for many concurrent handlers and its task timeout
//! is the handler timeout: the default lane (2 × cores slots, 30 s) would starve or time
//! out long handlers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocketmq_client_rust::{ClientRuntime, ClientRuntimeConfig, TelemetryHandle};
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use surety_core::{Error, ErrorKind, Result};
use tokio::runtime::Handle;

pub(crate) struct ClientHost {
    owner: Mutex<Option<RuntimeOwner>>,
    pub(crate) runtime: Arc<ClientRuntime>,
    /// A handle of the owner's Tokio runtime, for work that must outlive a caller's task
    /// (shutting a client down from `Drop`).
    pub(crate) handle: Handle,
}

fn config_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Configuration, format!("{what}: {e}"))
        .with_context("adapter", crate::ADAPTER)
}

impl ClientHost {
    pub(crate) fn start(handler_timeout: Duration) -> Result<Arc<ClientHost>> {
        // Building and entering a runtime is not allowed inside the caller's async
        // context: do it on a plain thread.
        std::thread::spawn(move || -> Result<ClientHost> {
            let mut config = RuntimeConfig::for_parallelism("surety-rocketmq", 2);
            config.max_blocking_threads = 512;
            let lane = &mut config.blocking_lane_policies.metadata_io;
            lane.max_concurrency = 384;
            lane.max_queue_depth = 4096;
            lane.queue_timeout = Duration::from_secs(60);
            lane.task_timeout = handler_timeout;
            lane.warn_after = handler_timeout;
            let owner = RuntimeOwner::plan(config)
                .map_err(|e| config_error("rocketmq runtime configuration", e))?
                .build()
                .map_err(|e| config_error("rocketmq runtime", e))?;
            let handle = owner.block_on(async { Handle::current() });
            let runtime = ClientRuntime::try_new(
                owner.root_context().component("client"),
                ClientRuntimeConfig::default(),
                TelemetryHandle::noop(),
            )
            .map_err(|e| config_error("rocketmq client runtime", e))?;
            Ok(ClientHost {
                owner: Mutex::new(Some(owner)),
                runtime,
                handle,
            })
        })
        .join()
        .map_err(|_| config_error("rocketmq runtime", "start-up thread panicked"))?
        .map(Arc::new)
    }
}

impl Drop for ClientHost {
    fn drop(&mut self) {
        let Some(owner) = self.owner.lock().ok().and_then(|mut o| o.take()) else {
            return;
        };
        let runtime = self.runtime.clone();
        // The final shutdown must run outside any async context.
        let _ = std::thread::Builder::new()
            .name("surety-rocketmq-shutdown".into())
            .spawn(move || {
                owner.block_on(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), runtime.shutdown()).await;
                });
                let _ = owner.shutdown_background();
            });
    }
}
