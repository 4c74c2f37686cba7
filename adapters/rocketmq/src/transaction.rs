//! Native half messages: `TransactionMQProducer` with a listener that bridges the client's
//! synchronous callbacks to Surety's async local transaction and check-back.
//!
//! - `execute_local_transaction` runs on the client's blocking lane after the broker
//!   stored the half message. It signals the waiting `send_in_transaction` call (through
//!   the `arg` the call passed) and blocks that lane thread, not the async runtime, until
//!   the caller's local transaction answers. If the caller's future is dropped (timeout,
//!   crash of the task) the channel closes and the answer is `Unknown`.
//! - `check_local_transaction` spawns the `CheckBack` on the application's runtime and
//!   waits for it with a timeout; a panic, a closed runtime or the timeout is `Unknown`.
//! - The client's `LocalTransactionState::default()` is `CommitMessage`: no path here ever
//!   uses a default; every state comes from an explicit answer.

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rocketmq_client_rust::{LocalTransactionState, TransactionListener, TransactionMQProducer};
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::common::message::message_ext::MessageExt;
use surety_core::raw::{run_check_back, run_local_transaction};
use surety_core::{
    CheckBack, Error, ErrorKind, LocalTransaction, Message, Publisher, Receipt, Result,
    TransactionalPublisher, TxOutcome, TxState,
};
use tokio::sync::oneshot;

use crate::ADAPTER;
use crate::codec;
use crate::error::{admin_error, send_error, status_error};
use crate::publisher::RocketMqPublisher;
use crate::shared::Shared;

/// How much longer than the check-back's own bound the client's check lane waits for its
/// answer before telling the broker `Unknown` (it asks again).
const CHECK_BACK_SLACK: Duration = Duration::from_secs(1);

/// Passed as the client's `arg`: pairs the listener call with its `send_in_transaction`.
struct Rendezvous {
    prepared: Mutex<Option<oneshot::Sender<()>>>,
    answer: Mutex<Option<oneshot::Receiver<TxState>>>,
}

fn to_client(state: TxState) -> LocalTransactionState {
    match state {
        TxState::Commit => LocalTransactionState::CommitMessage,
        TxState::Rollback => LocalTransactionState::RollbackMessage,
        TxState::Unknown => LocalTransactionState::Unknown,
    }
}

struct Bridge {
    check_back: Arc<dyn CheckBack>,
    /// How long a check-back may take ([`crate::RocketMqConfig::check_back_timeout`]).
    check_back_timeout: Duration,
    /// The application's runtime, where check-backs run.
    app: tokio::runtime::Handle,
}

impl TransactionListener for Bridge {
    fn execute_local_transaction(
        &self,
        msg: &dyn MessageTrait,
        arg: Option<&(dyn Any + Send + Sync)>,
    ) -> LocalTransactionState {
        let Some(rendezvous) = arg.and_then(|a| a.downcast_ref::<Rendezvous>()) else {
            tracing::error!(topic = %msg.topic(), "half message without its caller; leaving it to the check-back");
            return LocalTransactionState::Unknown;
        };
        let prepared = rendezvous.prepared.lock().ok().and_then(|mut p| p.take());
        let answer = rendezvous.answer.lock().ok().and_then(|mut a| a.take());
        let (Some(prepared), Some(answer)) = (prepared, answer) else {
            return LocalTransactionState::Unknown;
        };
        if prepared.send(()).is_err() {
            // The caller is gone: its local transaction will not run.
            return LocalTransactionState::Unknown;
        }
        // A blocking-lane thread, not a runtime worker: blocking here is allowed.
        match answer.blocking_recv() {
            Ok(state) => to_client(state),
            Err(_) => LocalTransactionState::Unknown,
        }
    }

    fn check_local_transaction(&self, msg: &MessageExt) -> LocalTransactionState {
        let message = match codec::decode(msg, codec::Lane::Open) {
            Ok((message, _)) => message,
            Err(e) => {
                tracing::error!(error = %e, "check-back for an undecodable half message; unknown");
                return LocalTransactionState::Unknown;
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let check_back = self.check_back.clone();
        let timeout = self.check_back_timeout;
        let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.app.spawn(async move {
                let state = run_check_back(ADAPTER, check_back.as_ref(), &message, timeout).await;
                let _ = tx.send(state);
            })
        }));
        if spawned.is_err() {
            return LocalTransactionState::Unknown;
        }
        // The check-back is bounded on the runtime; this only covers a runtime too busy to
        // run it at all.
        match rx.recv_timeout(self.check_back_timeout + CHECK_BACK_SLACK) {
            Ok(state) => to_client(state),
            Err(_) => LocalTransactionState::Unknown,
        }
    }
}

/// A producer of one producer group: half messages, local transaction, check-back.
pub(crate) struct RocketMqTransactionalPublisher {
    shared: Arc<Shared>,
    plain: Arc<RocketMqPublisher>,
    producer: Option<TransactionMQProducer>,
}

impl RocketMqTransactionalPublisher {
    pub(crate) async fn start(
        shared: Arc<Shared>,
        plain: Arc<RocketMqPublisher>,
        producer_group: &str,
        check_back: Arc<dyn CheckBack>,
    ) -> Result<Self> {
        codec::validate_topic(producer_group).map_err(|e| {
            Error::new(
                ErrorKind::Configuration,
                format!("producer group: {}", e.message()),
            )
        })?;
        let bridge = Bridge {
            check_back,
            check_back_timeout: shared.config.check_back_timeout,
            app: tokio::runtime::Handle::current(),
        };
        let client_config = shared.client_config("tx");
        let instance_name = client_config.get_instance_name().to_string();
        // See `Shared::anchor_topics`: without them this producer would stay unknown to
        // the brokers (and unreachable for check-backs) until its first send.
        let anchors = shared.anchor_topics().await;
        let mut builder = TransactionMQProducer::builder(shared.host.runtime.clone())
            .client_config(client_config)
            .topics(anchors.clone())
            .producer_group(producer_group)
            .name_server_addr(shared.config.namesrv.as_str())
            .send_msg_timeout(shared.config.send_timeout.as_millis() as u32)
            .retry_times_when_send_failed(0)
            .retry_another_broker_when_not_store_ok(false)
            .transaction_listener(bridge);
        if let Some(hook) = shared.rpc_hook() {
            builder = builder.rpc_hook(hook);
        }
        let mut producer = builder.build();
        producer
            .start()
            .await
            .map_err(|e| admin_error(&e, "transactional producer start"))?;
        // Return only once a broker lists this producer for its group, so that a
        // check-back for a half message of the group (say, of a producer that died)
        // can reach it. Bounded; on time-out the client's next heartbeat registers it.
        if let Some(anchor) = anchors.first() {
            let deadline = Instant::now() + shared.config.route_timeout;
            while !shared
                .producer_registered(producer_group, anchor, &instance_name)
                .await
            {
                if Instant::now() >= deadline {
                    tracing::warn!(
                        producer_group,
                        "the broker does not list the transactional producer yet; check-backs reach it after its next heartbeat"
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } else {
            tracing::warn!(
                producer_group,
                "no topic with a route to register the transactional producer; check-backs reach it after its first send"
            );
        }
        Ok(RocketMqTransactionalPublisher {
            shared,
            plain,
            producer: Some(producer),
        })
    }
}

#[async_trait]
impl Publisher for RocketMqTransactionalPublisher {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.plain.publish(message).await
    }

    async fn publish_oneway(&self, message: &Message) -> Result<()> {
        self.plain.publish_oneway(message).await
    }
}

#[async_trait]
impl TransactionalPublisher for RocketMqTransactionalPublisher {
    async fn send_in_transaction(
        &self,
        message: &Message,
        local: LocalTransaction<'_>,
    ) -> Result<TxOutcome> {
        let topic = message.destination();
        let raw = codec::encode(message, topic, self.shared.config.max_message_size)?;
        self.shared.ensure_route(topic).await?;
        let producer = self.producer.as_ref().expect("producer present until drop");
        let (prepared_tx, prepared_rx) = oneshot::channel();
        let (answer_tx, answer_rx) = oneshot::channel();
        let rendezvous = Rendezvous {
            prepared: Mutex::new(Some(prepared_tx)),
            answer: Mutex::new(Some(answer_rx)),
        };
        let send = producer.send_message_in_transaction(raw, Some(rendezvous));
        let run_local = async move {
            // Runs only once the broker holds the half message.
            prepared_rx.await.ok()?;
            let state = run_local_transaction(message, local).await;
            let _ = answer_tx.send(state);
            Some(state)
        };
        let (sent, local_state) = futures::join!(send, run_local);
        let result = match sent {
            Err(e) => {
                let err = send_error(&e, topic);
                return Err(match local_state {
                    None => err,
                    // Cannot happen with this client (the listener runs inside the send),
                    // but if it did the half message is the check-back's to resolve.
                    Some(_) => err.with_context("local_transaction", "ran"),
                });
            }
            Ok(r) => r,
        };
        let Some(send_result) = result.send_result else {
            return Err(Error::new(
                ErrorKind::OutcomeUnknown,
                "the client returned no half-message result",
            )
            .with_context("adapter", ADAPTER));
        };
        if let Some(e) = status_error(send_result.send_status, topic) {
            // The client rolls such a half message back without running the listener.
            return Err(e.with_context("local_transaction", "not run"));
        }
        // Our own answer, never the client's (whose default would be a commit).
        Ok(match local_state {
            Some(TxState::Commit) => {
                let mut receipt = Receipt::for_message(message);
                if let Some(id) = send_result.msg_id.as_ref() {
                    receipt = receipt.with_position(id.to_string());
                }
                TxOutcome::Committed(receipt)
            }
            Some(TxState::Rollback) => TxOutcome::RolledBack,
            Some(TxState::Unknown) | None => TxOutcome::Pending,
        })
    }
}

impl Drop for RocketMqTransactionalPublisher {
    fn drop(&mut self) {
        // Unregister from the broker so that check-backs go to live producers of the group.
        if let Some(mut producer) = self.producer.take() {
            self.shared.host.handle.spawn(async move {
                producer.shutdown().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocketmq_model::common::message::message_single::Message as RmqMessage;
    use surety_core::check_back_fn;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn half(id: &str) -> MessageExt {
        let message = Message::new("t", "x").with_id(surety_core::MessageId::parse(id).unwrap());
        let mut ext = MessageExt::default();
        ext.set_message_inner(codec::encode(&message, "t", 1024).unwrap());
        ext
    }

    fn bridge(rt: &tokio::runtime::Runtime, check_back: Arc<dyn CheckBack>) -> Bridge {
        Bridge {
            check_back,
            check_back_timeout: Duration::from_millis(300),
            app: rt.handle().clone(),
        }
    }

    #[test]
    fn a_hung_check_back_is_unknown_within_its_timeout() {
        let rt = runtime();
        let b = bridge(
            &rt,
            Arc::new(check_back_fn(|_| async {
                std::future::pending::<()>().await;
                TxState::Commit
            })),
        );
        let asked = Instant::now();
        assert_eq!(
            b.check_local_transaction(&half("hangs")),
            LocalTransactionState::Unknown
        );
        // The timeout is 300 ms (plus the lane's 1 s slack at worst); the fallback before
        // the check-back had its own bound was 20 s.
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "{:?}",
            asked.elapsed()
        );
    }

    #[test]
    fn a_listener_call_without_its_caller_is_unknown_never_the_default_commit() {
        let rt = runtime();
        let b = bridge(&rt, Arc::new(check_back_fn(|_| async { TxState::Commit })));
        let msg = RmqMessage::builder().topic("t").body("x").build_unchecked();
        assert_eq!(
            b.execute_local_transaction(&msg, None),
            LocalTransactionState::Unknown
        );
        // The caller went away after the half message was stored.
        let (prepared, _prepared_rx) = oneshot::channel();
        let (answer_tx, answer) = oneshot::channel::<TxState>();
        drop(answer_tx);
        let r = Rendezvous {
            prepared: Mutex::new(Some(prepared)),
            answer: Mutex::new(Some(answer)),
        };
        assert_eq!(
            b.execute_local_transaction(&msg, Some(&r)),
            LocalTransactionState::Unknown
        );
    }

    #[test]
    fn check_back_answers_and_a_panic_is_unknown() {
        let rt = runtime();
        let b = bridge(
            &rt,
            Arc::new(check_back_fn(|m: Message| async move {
                match m.id().as_str() {
                    "commit" => TxState::Commit,
                    "rollback" => TxState::Rollback,
                    _ => panic!("deliberate panic in a check-back"),
                }
            })),
        );
        assert_eq!(
            b.check_local_transaction(&half("commit")),
            LocalTransactionState::CommitMessage
        );
        assert_eq!(
            b.check_local_transaction(&half("rollback")),
            LocalTransactionState::RollbackMessage
        );
        assert_eq!(
            b.check_local_transaction(&half("boom")),
            LocalTransactionState::Unknown
        );
    }
}
