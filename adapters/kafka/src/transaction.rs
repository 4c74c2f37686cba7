//! Broker transactions: a pool of transactional producers behind
//! [`surety_core::Broker::begin_transaction`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};
use surety_core::{BrokerTransaction, Error, ErrorKind, Message, Result};

use crate::ADAPTER;
use crate::codec::record_of;
use crate::config::create;
use crate::error::{TxnClass, classify, delivery_error, transaction_error};
use crate::shared::{Inner, blocking};

/// Creates a transactional producer with `transactional_id` and runs
/// `init_transactions` (which also fences any older producer with that id and aborts its
/// open transaction).
pub(crate) async fn transactional_producer(
    inner: &Inner,
    transactional_id: &str,
) -> Result<Arc<FutureProducer>> {
    let config = inner.config.transactional_producer(transactional_id);
    let producer: Arc<FutureProducer> =
        Arc::new(create("transactional producer", || config.create())?);
    let p = producer.clone();
    let timeout = inner.config.request_timeout;
    blocking(move || {
        p.init_transactions(timeout)
            .map_err(|e| transaction_error("init_transactions", &e))
    })
    .await?;
    Ok(producer)
}

/// One open Kafka transaction.
///
/// `publish` enqueues the record and returns; the delivery reports are read together
/// before the commit (or when the producer queue is full), so the messages of one
/// transaction are in flight together instead of one round trip each. Nothing is visible
/// before the commit, so a report read late changes no outcome: a failed delivery fails
/// the commit, which then aborts the whole transaction.
pub(crate) struct KafkaTransaction {
    inner: Arc<Inner>,
    producer: Option<Arc<FutureProducer>>,
    unread: Vec<Unread>,
}

/// A record enqueued in the transaction whose delivery report is not read yet.
struct Unread {
    message_id: String,
    destination: String,
    started: Instant,
    report: DeliveryFuture,
}

impl KafkaTransaction {
    pub(crate) async fn begin(inner: Arc<Inner>) -> Result<Self> {
        let producer = match inner.tx_pool.take() {
            Some(p) => p,
            None => {
                let id = format!(
                    "{}-tx-{}",
                    inner.config.transactional_id_prefix,
                    uuid::Uuid::now_v7()
                );
                transactional_producer(&inner, &id).await?
            }
        };
        let p = producer.clone();
        blocking(move || {
            p.begin_transaction()
                .map_err(|e| transaction_error("begin_transaction", &e))
        })
        .await?;
        Ok(KafkaTransaction {
            inner,
            producer: Some(producer),
            unread: Vec::new(),
        })
    }

    /// Reads every unread delivery report. The first failure, if any, is returned (the
    /// transaction must then be aborted); every report is recorded in the metrics.
    async fn read_reports(&mut self) -> Result<()> {
        let unread = std::mem::take(&mut self.unread);
        let path = self.inner.publish_path();
        let path = &path;
        let reports = futures::future::join_all(unread.into_iter().map(|u| async move {
            let outcome = match u.report.await {
                Ok(Ok(_delivery)) => Ok(()),
                Ok(Err((e, _))) => Err(delivery_error(&e, &u.destination)),
                // The producer was dropped with the record queued: no report will come.
                Err(_canceled) => Err(Error::new(
                    ErrorKind::OutcomeUnknown,
                    "the producer went away before the delivery report",
                )
                .with_context("adapter", ADAPTER)),
            };
            path.record(
                &u.destination,
                outcome.as_ref().map(|_| ()).map_err(Error::kind),
                u.started,
            );
            outcome.map_err(|e| e.with_context("message_id", u.message_id))
        }))
        .await;
        reports.into_iter().collect::<Result<Vec<()>>>().map(|_| ())
    }

    fn producer(&self) -> Result<&Arc<FutureProducer>> {
        self.producer.as_ref().ok_or_else(|| {
            Error::new(ErrorKind::Fatal, "the transaction is already finished")
                .with_context("adapter", ADAPTER)
        })
    }

    async fn finish(mut self, commit: bool) -> Result<()> {
        let producer = self.producer.take().ok_or_else(|| {
            Error::new(ErrorKind::Fatal, "the transaction is already finished")
                .with_context("adapter", ADAPTER)
        })?;
        let timeout = self.inner.config.request_timeout;
        let p = producer.clone();
        let outcome = blocking(move || Ok(end_transaction(&p, commit, timeout))).await?;
        match outcome {
            Ok(()) => {
                self.inner.tx_pool.put(producer);
                Ok(())
            }
            Err((e, usable)) => {
                if usable {
                    self.inner.tx_pool.put(producer);
                }
                Err(e)
            }
        }
    }
}

/// Commits (retrying retriable errors) or aborts. On failure says whether the producer
/// can be reused.
fn end_transaction(
    p: &FutureProducer,
    commit: bool,
    timeout: Duration,
) -> std::result::Result<(), (Error, bool)> {
    if commit {
        let mut tries = 0;
        loop {
            match p.commit_transaction(timeout) {
                Ok(()) => return Ok(()),
                Err(e) => match classify(&e) {
                    TxnClass::Retriable if tries < 3 => tries += 1,
                    TxnClass::AbortRequired => {
                        let aborted = p.abort_transaction(timeout);
                        let err = Error::new(
                            ErrorKind::Rejected,
                            "the transaction could not commit and was aborted: none of its messages are visible",
                        )
                        .with_retryable(true)
                        .with_context("adapter", ADAPTER)
                        .with_source(e);
                        return Err((err, aborted.is_ok()));
                    }
                    TxnClass::Fatal => {
                        return Err((transaction_error("commit_transaction", &e), false));
                    }
                    // Timed out or retries used up: whether it committed is unknown, and
                    // the producer's state with it.
                    _ => {
                        return Err((
                            transaction_error("commit_transaction", &e).with_retryable(false),
                            false,
                        ));
                    }
                },
            }
        }
    } else {
        settle_before_abort(p, timeout);
        p.abort_transaction(timeout).map_err(|e| {
            let usable = !matches!(classify(&e), TxnClass::Fatal);
            (transaction_error("abort_transaction", &e), usable)
        })
    }
}

/// Waits (bounded) until the records of the transaction are delivered. librdkafka lets
/// `abort_transaction` send EndTxn once the partitions' AddPartitionsToTxn request is
/// *sent*, not answered, so an abort right after the first records can reach the
/// coordinator while the transaction is still empty there; the coordinator refuses it
/// with INVALID_TXN_STATE, a fatal error for the producer (librdkafka issue 4849). A
/// delivered record proves its partition was registered. The records' outcome does not
/// matter: the abort makes them invisible either way. The producer serves this one
/// transaction, so its queue holds only the transaction's records.
fn settle_before_abort(p: &FutureProducer, timeout: Duration) {
    if let Err(e) = p.flush(timeout) {
        tracing::debug!(error = %e, "records still in flight before the abort");
    }
}

#[async_trait]
impl BrokerTransaction for KafkaTransaction {
    async fn publish(&mut self, message: &Message) -> Result<()> {
        message.validate(Some(self.inner.config.max_message_size))?;
        self.inner.check_topic(message.destination()).await?;
        let producer = self.producer()?.clone();
        let started = Instant::now();
        loop {
            match producer.send_result(record_of(message)) {
                Ok(report) => {
                    self.unread.push(Unread {
                        message_id: message.id().as_str().to_owned(),
                        destination: message.destination().to_owned(),
                        started,
                        report,
                    });
                    return Ok(());
                }
                // The queue holds this transaction's own records: read their reports to
                // make room, then enqueue again.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if !self.unread.is_empty() =>
                {
                    self.read_reports().await?;
                }
                Err((e, _)) => {
                    let error = delivery_error(&e, message.destination())
                        .with_context("message_id", message.id().as_str());
                    self.inner.publish_path().record(
                        message.destination(),
                        Err(error.kind()),
                        started,
                    );
                    return Err(error);
                }
            }
        }
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        // librdkafka's commit would also wait for the reports, but it would say only that
        // one failed; reading them first names the message.
        if let Err(failed) = self.read_reports().await {
            let aborted = (*self).finish(false).await;
            let error = Error::new(
                ErrorKind::Rejected,
                "a message of the transaction was not delivered; the transaction was aborted and none of its messages are visible",
            )
            .with_retryable(failed.is_retryable())
            .with_context("adapter", ADAPTER)
            .with_source(failed);
            if let Err(e) = aborted {
                // Never committed, so still nothing visible: the broker aborts it after
                // transaction.timeout.ms.
                tracing::warn!(error = %e, "aborting a Kafka transaction after a failed delivery failed");
            }
            return Err(error);
        }
        (*self).finish(true).await
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        (*self).finish(false).await
    }
}

impl Drop for KafkaTransaction {
    fn drop(&mut self) {
        // Dropped without commit or abort: abort off the async runtime; the producer is
        // not reused (its state is not awaited here).
        if let Some(p) = self.producer.take() {
            let timeout = self.inner.config.request_timeout;
            std::thread::spawn(move || {
                settle_before_abort(&p, timeout);
                if let Err(e) = p.abort_transaction(timeout) {
                    tracing::warn!(error = %e, "aborting a dropped Kafka transaction failed; the broker aborts it after transaction.timeout.ms");
                }
            });
        }
    }
}
