//! RabbitMQ adapter of Surety, on [lapin](https://docs.rs/lapin) 4 (tokio runtime; TLS
//! for `amqps://` through rustls with the *ring* provider and the system's roots).
//!
//! # What maps to what
//!
//! | Surety | RabbitMQ |
//! |---|---|
//! | destination `d` | durable fanout exchange `d`, bound to the router exchange with key `d` |
//! | publish | `basic.publish` to the router (`surety.router`, direct) with routing key `d`, `mandatory`, persistent (delivery mode 2), on a confirm-mode channel |
//! | consumer group `g` of `d` | durable queue `d:g` (quorum by default, classic selectable) bound to exchange `d` |
//! | dead-letter destination | `d.g.dlq` ([`RabbitBroker`]'s `dead_letter_destination`): a destination like any other; declaring `d` with dead letters on also declares its group [`DEAD_LETTER_GROUP`] (queue `d.g.dlq:dead-letters`), which keeps every dead letter until read |
//! | `Retry { after }` | a copy goes to the delay queue `d:g:delay:<ms>ms`, which dead-letters it back to `d:g` when its TTL expires; then the original is acked |
//! | attempt count | `surety-attempt` header (deliveries so far, written by retries) + the quorum queue's `x-delivery-count` (deliveries nobody settled, e.g. a crash) + 1 |
//! | broker transaction | `tx.select` / `tx.commit` / `tx.rollback` on a channel of its own; a message for an undeclared destination is refused by `publish` (`Unroutable`), one for a destination without queues is returned at commit, which reports it and how many others committed (RabbitMQ routes at commit) |
//!
//! **Why a router exchange.** Publishing to an exchange that does not exist is a channel
//! error in AMQP (404): it would close the shared confirm channel and fail every other
//! publish in flight with an unknown outcome. Every publish therefore goes to one
//! exchange that always exists; an undeclared destination, or one without any bound
//! queue, then comes back as `basic.return` (312 NO_ROUTE) and is reported as
//! [`ErrorKind::Unroutable`](surety_core::ErrorKind::Unroutable) while the channel lives
//! on. Other AMQP clients can still publish to the destination exchange directly.
//!
//! # Send with confirm
//!
//! Many publishes are in flight on one confirm channel, each awaited. A returned
//! mandatory message is an unroutable error, never a success. lapin attaches a return to
//! whichever confirm it completes next (`Ack(Some(returned))`), and with RabbitMQ's
//! multiple acks that is sometimes another publish's confirm (once or twice per run of
//! 3,000 interleaved publishes against the real broker); a per-channel tracker therefore
//! matches returns to publishes by message id, exchange and routing key, and settles a
//! publish only once every publish started before its confirm arrived has been read.
//! `Nack` is [`Rejected`](surety_core::ErrorKind::Rejected) (retryable). A
//! channel or connection failure with confirms pending, or no confirm within
//! `confirm_timeout`, is [`OutcomeUnknown`](surety_core::ErrorKind::OutcomeUnknown)
//! (retryable; the id absorbs a duplicate). The channel is reopened on the next publish.
//!
//! # Consumers
//!
//! Manual acks, sent only after the handler's outcome ([`surety_core::run_handler`] +
//! [`surety_core::decide`]); prefetch (`basic.qos`, per consumer) = the subscription's
//! concurrency. A retry or a dead letter is published *with confirm* before the
//! original is acked, so a crash in between duplicates, never loses.
//!
//! **Delays.** The Debian RabbitMQ 3.10 has no delayed-message plugin, so retries use TTL
//! and dead-lettering. Per-message TTL only expires at the head of a queue (a 30 s retry
//! would hold back a 50 ms one behind it), so each delay gets its own queue with a
//! queue-level `x-message-ttl`: every message in it has the same TTL and expires in
//! order. Delays are rounded *up* to two significant digits of milliseconds (never early,
//! at most 10% late), which bounds the number of delay queues per group. They are
//! classic durable queues with `x-expires` (renewed by re-declaring), so idle ones
//! vanish; a quorum queue's expiry lease is not renewed by re-declaration, so quorum
//! delay queues (selectable with `delay_queue_type`, with at-least-once dead-lettering)
//! never expire and pile up. Trade-off of the classic default: RabbitMQ's dead-lettering
//! out of a classic queue is at-most-once if the node crashes at that very instant.
//!
//! **Attempts.** A consumer that dies before acking gets the message redelivered with
//! `redelivered=true` and the old header; the quorum queue's `x-delivery-count` makes the
//! attempt grow anyway (a classic queue only says "redelivered", counted as one more).
//! A message redelivered past `max_attempts` without ever being settled is dead-lettered
//! without calling the handler again, so a message that crashes the process cannot loop.
//!
//! **Dead letters.** Past `max_attempts`, or on `Reject`, the message is published with
//! confirm to the group's dead-letter destination with the reason, attempts, origin and
//! group headers, then acked. If that fails (say the subscription names a dead-letter
//! destination that does not exist yet), the message is not acked until a copy sits in
//! the group's delay queue for the longest backoff: kept, not hot-looping, and
//! dead-lettered as soon as the destination exists.
//!
//! **Reading and re-driving dead letters** ([`surety_core::Broker::dead_letters`]): the
//! group's dead-letter queue is walked with `basic.get` and manual acks on a channel of
//! its own. Listing acks nothing and closes the channel, so every message goes back: it
//! is then marked `redelivered` and a quorum queue counts one more delivery in its
//! `x-delivery-count` (on RabbitMQ 4, whose quorum queues have a default delivery limit
//! of 20, give the dead-letter queues a policy with a higher limit if operators list very
//! often). A re-drive publishes each selected message with confirm to its original
//! destination (attempt count reset, same id) and acks the dead letter only after the
//! confirm; unselected messages, and one whose publish failed, return to the queue.
//!
//! **Recovery.** lapin's auto-recovery is not used. Publishers reopen their channel on
//! the next publish (one connection attempt; a failure is
//! [`Unavailable`](surety_core::ErrorKind::Unavailable), retryable); each subscription's
//! supervisor reconnects with exponential backoff until stopped. Both are reported
//! through `tracing` and the [`RECONNECTS`](surety_core::telemetry::RECONNECTS) counter.
//!
//! **Logs.** lapin itself logs every returned message at `WARN` (target
//! `lapin::returned_messages`), properties and payload bytes included; filter that
//! target if payloads must not reach the logs. Surety's own logs carry ids, never
//! payloads or credentials.
//!
//! # Not offered
//!
//! - Half messages ([`Capability::HalfMessages`](surety_core::Capability::HalfMessages)):
//!   provided by the SQL prepared-message store that wraps any broker.
//! - Ordering per key: a retry goes through a delay queue and comes back behind later
//!   messages. An ordered subscription is an `Unsupported` error.
//! - Unroutable messages inside a broker transaction are reported after the commit (the
//!   rest of the transaction is committed): RabbitMQ returns them only then.
//!
//! ```no_run
//! # async fn example() -> surety_core::Result<()> {
//! use surety_core::{Broker, Message, Topology};
//! use surety_rabbitmq::{RabbitBroker, RabbitConfig};
//!
//! let broker = RabbitBroker::connect(RabbitConfig::from_env()?).await?;
//! broker.declare(&Topology::new("orders").group("billing")).await?;
//! broker.publisher().await?.publish(&Message::new("orders", "hello")).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod broker;
mod codec;
mod config;
mod confirms;
mod consumer;
mod dead_letters;
mod error;
mod publisher;
mod shared;
mod topology;
mod transaction;

pub use broker::RabbitBroker;
pub use codec::KEY_HEADER;
pub use config::{QueueType, RabbitConfig};
pub use topology::DEAD_LETTER_GROUP;

pub(crate) const ADAPTER: &str = "rabbitmq";
