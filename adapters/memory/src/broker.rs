//! Broker state: destinations, groups and their queues, half messages.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use surety_core::{
    Broker, BrokerTransaction, Capabilities, Capability, CheckBack, DeadLetter, DeadLetters, Error,
    ErrorKind, Message, Publisher, Receipt, RedriveReport, RedriveSelection, Result, Subscriber,
    Topology, TransactionalPublisher, redrive_message, telemetry, validate_destination,
};
use tokio::sync::watch;

use crate::consumer::MemorySubscriber;
use crate::transaction::{MemoryBrokerTransaction, MemoryTransactionalPublisher};

pub(crate) const ADAPTER: &str = "memory";

/// Settings of a [`MemoryBroker`].
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// Largest message accepted, in bytes.
    pub max_message_size: usize,
    /// How old a half message must be before its check-back is asked.
    pub transaction_timeout: Duration,
    /// How often prepared half messages are checked.
    pub check_interval: Duration,
    /// How many check-backs a half message gets before it is discarded.
    pub check_max: u32,
}

impl Default for MemoryConfig {
    /// 4 MiB messages; check-back after 1 s, every 250 ms, at most 15 times.
    fn default() -> Self {
        MemoryConfig {
            max_message_size: 4 * 1024 * 1024,
            transaction_timeout: Duration::from_secs(1),
            check_interval: Duration::from_millis(250),
            check_max: 15,
        }
    }
}

/// The in-process broker. Cheap to clone: clones share one broker.
#[derive(Clone)]
pub struct MemoryBroker {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) config: MemoryConfig,
    state: Mutex<State>,
    /// Bumped on every change consumers may be waiting for.
    pub(crate) changed: watch::Sender<u64>,
}

/// A producer's check-back listener and the id that removes it when the producer goes.
pub(crate) type Registration = (u64, Arc<dyn CheckBack>);

#[derive(Default)]
pub(crate) struct State {
    destinations: HashMap<String, Destination>,
    pub(crate) half: HashMap<String, HalfMessage>,
    /// Live check-back listeners per producer group, by registration id.
    pub(crate) check_backs: HashMap<String, Vec<Registration>>,
    pub(crate) discarded_half: Vec<Message>,
    pub(crate) checker_running: bool,
    next_id: u64,
}

struct Destination {
    /// Every message ever published here, so that a late group starts from the first.
    log: Vec<Message>,
    groups: HashMap<String, Group>,
}

#[derive(Default)]
pub(crate) struct Group {
    pub(crate) queue: VecDeque<Entry>,
    pub(crate) in_flight: HashMap<u64, Entry>,
}

#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) message: Message,
    /// Deliveries so far.
    pub(crate) attempt: u32,
    pub(crate) not_before: Option<Instant>,
}

pub(crate) struct HalfMessage {
    pub(crate) message: Message,
    pub(crate) group: String,
    pub(crate) prepared_at: Instant,
    pub(crate) checks: u32,
    /// The local transaction is still running in this process: do not check yet.
    pub(crate) local_running: bool,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

impl MemoryBroker {
    /// A broker with the default settings.
    pub fn new() -> Self {
        MemoryBroker::with_config(MemoryConfig::default())
    }

    /// A broker with `config`.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryBroker {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(State::default()),
                changed: watch::Sender::new(0),
            }),
        }
    }

    /// Messages waiting or in flight for `group` on `destination` (for tests and status).
    pub fn backlog(&self, destination: &str, group: &str) -> usize {
        let state = self.shared.lock();
        state
            .destinations
            .get(destination)
            .and_then(|d| d.groups.get(group))
            .map_or(0, |g| g.queue.len() + g.in_flight.len())
    }

    /// Half messages still prepared.
    pub fn prepared_count(&self) -> usize {
        self.shared.lock().half.len()
    }

    /// Half messages discarded after `check_max` unanswered check-backs.
    pub fn discarded_half_messages(&self) -> Vec<Message> {
        self.shared.lock().discarded_half.clone()
    }
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-changed in a way
        // that loses messages (every change is a single move), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn wake(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn check(&self, message: &Message) -> Result<()> {
        message.validate(Some(self.config.max_message_size))
    }

    /// Appends to the destination and every group's queue; the confirm.
    pub(crate) fn publish_locked(state: &mut State, message: &Message) -> Result<Receipt> {
        let seq = state.next_id();
        let Some(dest) = state.destinations.get_mut(message.destination()) else {
            return Err(unroutable(message.destination()));
        };
        dest.log.push(message.clone());
        for group in dest.groups.values_mut() {
            group.queue.push_back(Entry {
                seq,
                message: message.clone(),
                attempt: 0,
                not_before: None,
            });
        }
        Ok(Receipt::for_message(message).with_position(format!("{}", dest.log.len() - 1)))
    }

    pub(crate) fn publish(&self, message: &Message) -> Result<Receipt> {
        let started = std::time::Instant::now();
        let _span = tracing::debug_span!(
            telemetry::SPAN_PUBLISH,
            message_id = %message.id(),
            destination = %message.destination()
        )
        .entered();
        let result = self
            .check(message)
            .and_then(|()| Shared::publish_locked(&mut self.lock(), message));
        telemetry::record_publish_since(
            ADAPTER,
            message.destination(),
            result.as_ref().map(|_| ()).map_err(Error::kind),
            started,
        );
        if result.is_ok() {
            self.wake();
        }
        result
    }

    pub(crate) fn ensure_destination(&self, destination: &str) -> Result<()> {
        Shared::check_destination_locked(&self.lock(), destination)
    }

    pub(crate) fn check_destination_locked(state: &State, destination: &str) -> Result<()> {
        if state.destinations.contains_key(destination) {
            Ok(())
        } else {
            Err(unroutable(destination))
        }
    }

    /// Runs `f` on a group's state, creating the group (from the first message) if the
    /// destination exists.
    pub(crate) fn with_group<T>(
        state: &mut State,
        destination: &str,
        group: &str,
        f: impl FnOnce(&mut Group) -> T,
    ) -> Result<T> {
        let dest = state.destinations.get_mut(destination).ok_or_else(|| {
            Error::new(
                ErrorKind::Configuration,
                format!("destination {destination:?} is not declared"),
            )
            .with_context("adapter", ADAPTER)
        })?;
        let group = dest.groups.entry(group.to_owned()).or_insert_with(|| {
            let mut g = Group::default();
            // Sequence numbers only need to be unique within the group.
            for (i, m) in dest.log.iter().enumerate() {
                g.queue.push_back(Entry {
                    seq: u64::MAX / 2 + i as u64,
                    message: m.clone(),
                    attempt: 0,
                    not_before: None,
                });
            }
            g
        });
        Ok(f(group))
    }
}

impl State {
    pub(crate) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn declare_destination(&mut self, name: &str) {
        self.destinations
            .entry(name.to_owned())
            .or_insert_with(|| Destination {
                log: Vec::new(),
                groups: HashMap::new(),
            });
    }
}

pub(crate) fn unroutable(destination: &str) -> Error {
    Error::new(
        ErrorKind::Unroutable,
        format!("no destination {destination:?} is declared"),
    )
    .with_context("adapter", ADAPTER)
    .with_context("destination", destination)
}

/// The memory adapter's dead-letter convention: `<destination>.<group>.dlq`.
pub(crate) fn dead_letter_name(destination: &str, group: &str) -> String {
    format!("{destination}.{group}.dlq")
}

struct MemoryPublisher {
    shared: Arc<Shared>,
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn publish(&self, message: &Message) -> Result<Receipt> {
        self.shared.publish(message)
    }

    async fn publish_oneway(&self, message: &Message) -> Result<()> {
        // In process nothing can be lost between hand-off and store, but a oneway caller
        // must not rely on the error either: it only reports invalid input.
        self.shared.publish(message).map(|_| ())
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn name(&self) -> &'static str {
        ADAPTER
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .with(Capability::OnewayPublish)
            .with(Capability::HalfMessages)
            .with(Capability::NativeHalfMessages)
            .with(Capability::BrokerTransactions)
            .with(Capability::OrderingPerKey)
            .with(Capability::DelayedRetry)
            .with(Capability::DeadLetter)
            .with_max_message_size(self.shared.config.max_message_size)
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        validate_destination(&topology.destination)?;
        let mut names = vec![];
        if topology.dead_letter {
            for group in &topology.groups {
                names.push(self.dead_letter_destination(&topology.destination, group));
            }
        }
        for name in &names {
            validate_destination(name)?;
        }
        let mut state = self.shared.lock();
        state.declare_destination(&topology.destination);
        for name in &names {
            state.declare_destination(name);
        }
        for group in &topology.groups {
            Shared::with_group(&mut state, &topology.destination, group, |_| ())?;
        }
        Ok(())
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(MemoryPublisher {
            shared: self.shared.clone(),
        }))
    }

    async fn transactional_publisher(
        &self,
        producer_group: &str,
        check_back: Arc<dyn CheckBack>,
    ) -> Result<Arc<dyn TransactionalPublisher>> {
        Ok(Arc::new(MemoryTransactionalPublisher::register(
            self.shared.clone(),
            producer_group,
            check_back,
        )))
    }

    async fn begin_transaction(&self) -> Result<Box<dyn BrokerTransaction>> {
        Ok(Box::new(MemoryBrokerTransaction::new(self.shared.clone())))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(MemorySubscriber::new(self.shared.clone())))
    }

    fn dead_letter_destination(&self, destination: &str, group: &str) -> String {
        dead_letter_name(destination, group)
    }

    async fn dead_letters(&self) -> Result<Arc<dyn DeadLetters>> {
        Ok(Arc::new(MemoryDeadLetters {
            shared: self.shared.clone(),
        }))
    }
}

/// Dead letters are the log of the group's dead-letter destination: listing reads it,
/// a re-drive publishes the message to its origin and then removes it from that log (and
/// from the queues of any group reading the dead-letter destination, except deliveries
/// in flight).
struct MemoryDeadLetters {
    shared: Arc<Shared>,
}

impl MemoryDeadLetters {
    /// The dead letters of `group` on `destination`, oldest first, with their index.
    fn snapshot(&self, destination: &str, group: &str) -> Result<Vec<Message>> {
        let name = dead_letter_name(destination, group);
        let state = self.shared.lock();
        let dest = state.destinations.get(&name).ok_or_else(|| {
            Error::new(
                ErrorKind::Configuration,
                format!(
                    "dead-letter destination {name:?} is not declared (declare {destination:?} with dead letters for group {group:?})"
                ),
            )
            .with_context("adapter", ADAPTER)
            .with_context("destination", name.clone())
        })?;
        Ok(dest.log.clone())
    }

    /// Removes one stored copy of `message` from the dead-letter destination `name`.
    fn remove(&self, name: &str, message: &Message) {
        let mut state = self.shared.lock();
        let Some(dest) = state.destinations.get_mut(name) else {
            return;
        };
        if let Some(i) = dest.log.iter().position(|m| m == message) {
            dest.log.remove(i);
        }
        for group in dest.groups.values_mut() {
            if let Some(i) = group.queue.iter().position(|e| &e.message == message) {
                group.queue.remove(i);
            }
        }
    }
}

#[async_trait]
impl DeadLetters for MemoryDeadLetters {
    async fn list(&self, destination: &str, group: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        Ok(self
            .snapshot(destination, group)?
            .into_iter()
            .take(limit)
            .enumerate()
            .map(|(i, m)| DeadLetter::from_message(m, Some(format!("index {i}"))))
            .collect())
    }

    async fn redrive(
        &self,
        destination: &str,
        group: &str,
        selection: &RedriveSelection,
    ) -> Result<RedriveReport> {
        let name = dead_letter_name(destination, group);
        let stored = self.snapshot(destination, group)?;
        let mut report = RedriveReport::default();
        let chosen: Vec<Message> = match selection {
            RedriveSelection::All => stored,
            RedriveSelection::Ids(ids) => {
                for id in ids {
                    if !stored.iter().any(|m| m.id() == id) && !report.not_found.contains(id) {
                        report.not_found.push(id.clone());
                    }
                }
                stored
                    .into_iter()
                    .filter(|m| ids.contains(m.id()))
                    .collect()
            }
        };
        let mut published = HashSet::new();
        for dead in chosen {
            let fresh = redrive_message(&dead, destination);
            // Another copy of a message already published by this re-drive: removed only.
            if published.insert((fresh.id().clone(), fresh.destination().to_owned())) {
                // Confirmed at the origin first, removed second: never lost in between.
                report.redriven.push(self.shared.publish(&fresh)?);
            }
            self.remove(&name, &dead);
        }
        Ok(report)
    }
}

/// Picks the next deliverable entry of a group, or when the earliest delayed one is due.
///
/// Ordered: an entry waits while an earlier entry with its key is in flight or delayed.
pub(crate) fn take_next(
    group: &mut Group,
    ordered: bool,
    now: Instant,
) -> std::result::Result<Entry, Option<Instant>> {
    let mut blocked: HashSet<&str> = HashSet::new();
    if ordered {
        blocked.extend(group.in_flight.values().filter_map(|e| e.message.key()));
    }
    let mut wake: Option<Instant> = None;
    let mut found = None;
    for (index, entry) in group.queue.iter().enumerate() {
        let key = entry.message.key().filter(|_| ordered);
        if key.is_some_and(|k| blocked.contains(k)) {
            continue;
        }
        match entry.not_before {
            Some(due) if due > now => {
                wake = Some(wake.map_or(due, |w: Instant| w.min(due)));
                if let Some(k) = key {
                    blocked.insert(k);
                }
            }
            _ => {
                found = Some(index);
                break;
            }
        }
    }
    match found {
        Some(index) => {
            let mut entry = group.queue.remove(index).expect("index from iteration");
            entry.attempt += 1;
            group.in_flight.insert(entry.seq, entry.clone());
            Ok(entry)
        }
        None => Err(wake),
    }
}
