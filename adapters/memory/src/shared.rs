//! The in-process broker's state, shared by the broker object, its publishers,
//! subscribers and transactions: destinations, groups and their queues, half messages.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use surety_core::{CheckBack, Error, ErrorKind, Message, Receipt, Result};
use tokio::sync::watch;

use crate::ADAPTER;
use crate::config::MemoryConfig;

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

impl Shared {
    pub(crate) fn new(config: MemoryConfig) -> Arc<Self> {
        Arc::new(Shared {
            config,
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
        })
    }

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

    /// Every message of the destination `name`, oldest first (its dead letters when
    /// `name` is a dead-letter destination); `None` if it is not declared.
    pub(crate) fn log_of(&self, name: &str) -> Option<Vec<Message>> {
        self.lock().destinations.get(name).map(|d| d.log.clone())
    }

    /// Removes one stored copy of `message` from the destination `name`, and from the
    /// queues of the groups reading it (deliveries in flight are left alone).
    pub(crate) fn remove_from_log(&self, name: &str, message: &Message) {
        let mut state = self.lock();
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

    /// Messages waiting or in flight for `group` on `destination`.
    pub(crate) fn backlog(&self, destination: &str, group: &str) -> usize {
        self.lock()
            .destinations
            .get(destination)
            .and_then(|d| d.groups.get(group))
            .map_or(0, |g| g.queue.len() + g.in_flight.len())
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

    pub(crate) fn declare_destination(&mut self, name: &str) {
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
