//! Matching `basic.return` to the publish it belongs to.
//!
//! lapin queues returned messages and hands the oldest one to whichever publisher confirm
//! it completes next. RabbitMQ coalesces confirms into *multiple* acks, and lapin
//! completes the tags of one multiple ack in no particular order: the return of publish
//! B can end up on the confirm of publish A, and B then resolves as a plain `Ack`, a
//! success for a message no queue took. Pairing by position is therefore not enough.
//!
//! One tracker task per confirm channel reads every confirm of that channel (including
//! those of oneway publishes, which would otherwise swallow a return), collects the
//! returned messages by (message id, exchange, routing key), and settles each publish
//! only once every publish that had started when its confirm was seen has had its own
//! confirm read: by then the return of that publish, wherever lapin put it, is known.
//! RabbitMQ sends a message's `basic.return` before its `basic.ack`, and a publish whose
//! confirm is resolved was started before that ack arrived, so nothing is missed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::Confirmation;
use lapin::PublisherConfirm;
use lapin::message::BasicReturnMessage;
use tokio::sync::{mpsc, oneshot};

/// What the broker said about one publish.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Acked, and no return for it: the broker took responsibility.
    Confirmed,
    /// Returned (`basic.return`): no queue took it.
    Returned {
        /// The AMQP reply code (312 NO_ROUTE).
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// Nacked without a return: the broker could not store it.
    Nacked,
    /// The channel was not in confirm mode.
    NotRequested,
}

pub(crate) type Reply = oneshot::Sender<lapin::Result<Verdict>>;

enum Event {
    Started(u64),
    Registered {
        seq: u64,
        key: ReturnKey,
        confirm: PublisherConfirm,
        reply: Option<Reply>,
    },
    Abandoned(u64),
}

/// A returned message is known by its id, exchange and routing key (one id may be
/// published to several destinations at once).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ReturnKey {
    pub(crate) message_id: String,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
}

impl ReturnKey {
    fn of(message: &BasicReturnMessage) -> Self {
        ReturnKey {
            message_id: message
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            exchange: message.delivery.exchange.as_str().to_owned(),
            routing_key: message.delivery.routing_key.as_str().to_owned(),
        }
    }
}

/// The publishing side of a channel's tracker. Cloned into every publish.
#[derive(Clone)]
pub(crate) struct Tracker {
    events: mpsc::UnboundedSender<Event>,
    next: Arc<AtomicU64>,
}

impl Tracker {
    /// Starts the tracker task of a new confirm channel. It ends once every sender is
    /// gone and every confirm it holds is settled.
    pub(crate) fn spawn() -> Self {
        let (events, rx) = mpsc::unbounded_channel();
        tokio::spawn(track(rx));
        Tracker {
            events,
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Announces a publish; call before `basic_publish`. The guard reports the publish as
    /// abandoned if it is dropped without [`Started::register`] (an error, or the caller
    /// gave up), so that no settlement waits for it forever.
    pub(crate) fn start(&self) -> Started {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send(Event::Started(seq));
        Started {
            tracker: self.clone(),
            seq,
            done: false,
        }
    }
}

pub(crate) struct Started {
    tracker: Tracker,
    seq: u64,
    done: bool,
}

impl Started {
    /// Hands the confirm to the tracker; the verdict comes on `reply` (`None` for a
    /// oneway publish, whose confirm is read only for the returns it may carry).
    pub(crate) fn register(
        mut self,
        key: ReturnKey,
        confirm: PublisherConfirm,
        reply: Option<Reply>,
    ) {
        self.done = true;
        let _ = self.tracker.events.send(Event::Registered {
            seq: self.seq,
            key,
            confirm,
            reply,
        });
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tracker.events.send(Event::Abandoned(self.seq));
        }
    }
}

/// A confirm that was read and waits for the publishes started before it.
struct Seen {
    key: ReturnKey,
    acked: bool,
    reply: Option<Reply>,
    /// Settle once no publish up to this one is outstanding; `None`: not yet decided
    /// (seen in this round, the barrier is taken after the next look at the events).
    barrier: Option<Option<u64>>,
}

type Read = (ReturnKey, Option<Reply>, lapin::Result<Confirmation>);
type Reading = FuturesUnordered<BoxFuture<'static, Read>>;
type Returned = HashMap<ReturnKey, Vec<(u16, String)>>;

fn on_event(event: Event, outstanding: &mut BTreeSet<u64>, confirms: &mut Reading) {
    match event {
        Event::Started(seq) => {
            outstanding.insert(seq);
        }
        Event::Abandoned(seq) => {
            outstanding.remove(&seq);
        }
        Event::Registered {
            seq,
            key,
            confirm,
            reply,
        } => {
            outstanding.remove(&seq);
            confirms.push(async move { (key, reply, confirm.await) }.boxed());
        }
    }
}

fn on_confirm((key, reply, result): Read, returned: &mut Returned, seen: &mut Vec<Seen>) {
    let (acked, message) = match result {
        Ok(Confirmation::Ack(m)) => (true, m),
        Ok(Confirmation::Nack(m)) => (false, m),
        Ok(Confirmation::NotRequested) => {
            if let Some(r) = reply {
                let _ = r.send(Ok(Verdict::NotRequested));
            }
            return;
        }
        // The channel failed with this confirm pending: its own outcome is unknown,
        // whatever returns it might have carried.
        Err(e) => {
            if let Some(r) = reply {
                let _ = r.send(Err(e));
            }
            return;
        }
    };
    if let Some(m) = message {
        let owner = ReturnKey::of(&m);
        if owner != key {
            tracing::debug!(
                adapter = crate::ADAPTER,
                returned = %owner.message_id,
                confirm_of = %key.message_id,
                "lapin paired a return with another publish's confirm; matched by id instead"
            );
        }
        returned
            .entry(owner)
            .or_default()
            .push((m.reply_code, m.reply_text.as_str().to_owned()));
    }
    seen.push(Seen {
        key,
        acked,
        reply,
        barrier: None,
    });
}

/// Reads every confirm that is ready now (a noop waker: the next `select!` registers
/// the real one before waiting).
fn drain_ready(confirms: &mut Reading, returned: &mut Returned, seen: &mut Vec<Seen>) {
    while let Some(Some(done)) = confirms.next().now_or_never() {
        on_confirm(done, returned, seen);
    }
}

async fn track(mut events: mpsc::UnboundedReceiver<Event>) {
    let mut confirms: Reading = FuturesUnordered::new();
    let mut outstanding: BTreeSet<u64> = BTreeSet::new();
    let mut returned: Returned = HashMap::new();
    let mut seen: Vec<Seen> = Vec::new();
    let mut open = true;
    loop {
        if seen.iter().all(|s| s.barrier.is_some()) {
            if !open && confirms.is_empty() && seen.is_empty() {
                break;
            }
            tokio::select! {
                event = events.recv(), if open => match event {
                    Some(event) => on_event(event, &mut outstanding, &mut confirms),
                    None => {
                        // Every sender is gone: nothing can be outstanding any more.
                        open = false;
                        outstanding.clear();
                    }
                },
                Some(done) = confirms.next(), if !confirms.is_empty() => {
                    on_confirm(done, &mut returned, &mut seen);
                }
                else => {}
            }
        }
        // 1. Every confirm that is ready now.
        drain_ready(&mut confirms, &mut returned, &mut seen);
        // 2. Every publish announced before those confirms were seen.
        while let Ok(event) = events.try_recv() {
            on_event(event, &mut outstanding, &mut confirms);
        }
        // 3. Their barrier: the publishes outstanding now, one of which may hold
        //    their return.
        let barrier = outstanding.last().copied();
        for s in seen.iter_mut().filter(|s| s.barrier.is_none()) {
            s.barrier = Some(barrier);
        }
        // 4. Read what the publishes registered in step 2 say (returns included).
        drain_ready(&mut confirms, &mut returned, &mut seen);
        // 5. Settle those whose earlier publishes have all been read.
        let lowest = outstanding.first().copied();
        let mut keep = Vec::with_capacity(seen.len());
        for s in seen.drain(..) {
            let ready = match s.barrier {
                None => false,
                Some(None) => true,
                Some(Some(b)) => lowest.is_none_or(|low| low > b),
            };
            if !ready {
                keep.push(s);
                continue;
            }
            let own_return = returned.get_mut(&s.key).and_then(Vec::pop);
            if returned.get(&s.key).is_some_and(Vec::is_empty) {
                returned.remove(&s.key);
            }
            let verdict = match (own_return, s.acked) {
                (Some((code, text)), _) => Verdict::Returned { code, text },
                (None, true) => Verdict::Confirmed,
                (None, false) => Verdict::Nacked,
            };
            if let Some(r) = s.reply {
                let _ = r.send(Ok(verdict));
            }
        }
        seen = keep;
        if returned.len() > 10_000 {
            // Returns that no publish of this channel claimed: a bug, but never a
            // reason to grow without bound.
            tracing::error!(
                adapter = crate::ADAPTER,
                unclaimed = returned.len(),
                "returned messages matched no publish; dropping them"
            );
            returned.clear();
        }
    }
}
