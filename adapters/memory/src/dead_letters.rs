//! Dead letters are the log of the group's dead-letter destination: a pass reads a
//! snapshot of it, and removing a dead letter takes its copy out of that log (and out of
//! the queues of any group reading the dead-letter destination, except deliveries in
//! flight). The re-drive rule itself is core's (`raw::DeadLetterQueue`).

use std::sync::Arc;

use async_trait::async_trait;
use surety_core::raw::{DeadLetterLog, DeadLetterPass, PassScope, StoredDeadLetter};
use surety_core::{Error, ErrorKind, Message, Result};

use crate::ADAPTER;
use crate::shared::{Shared, dead_letter_name};

pub(crate) struct MemoryDeadLetterLog {
    shared: Arc<Shared>,
}

impl MemoryDeadLetterLog {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemoryDeadLetterLog { shared }
    }
}

struct Pass {
    shared: Arc<Shared>,
    name: String,
    snapshot: std::vec::IntoIter<Message>,
    last: Option<Message>,
    index: usize,
}

#[async_trait]
impl DeadLetterLog for MemoryDeadLetterLog {
    async fn open(
        &self,
        destination: &str,
        group: &str,
        scope: PassScope,
    ) -> Result<Box<dyn DeadLetterPass>> {
        let name = dead_letter_name(destination, group);
        let Some(mut snapshot) = self.shared.log_of(&name) else {
            return Err(Error::new(
                ErrorKind::Configuration,
                format!(
                    "dead-letter destination {name:?} is not declared (declare {destination:?} with dead letters for group {group:?})"
                ),
            )
            .with_context("adapter", ADAPTER)
            .with_context("destination", name));
        };
        if let PassScope::List { limit } = scope {
            snapshot.truncate(limit);
        }
        Ok(Box::new(Pass {
            shared: self.shared.clone(),
            name,
            snapshot: snapshot.into_iter(),
            last: None,
            index: 0,
        }))
    }
}

#[async_trait]
impl DeadLetterPass for Pass {
    async fn next(&mut self) -> Result<Option<StoredDeadLetter>> {
        self.last = self.snapshot.next();
        self.index += 1;
        Ok(self.last.clone().map(|message| StoredDeadLetter {
            message,
            position: Some(format!("index {}", self.index - 1)),
        }))
    }

    async fn remove(&mut self) -> Result<()> {
        if let Some(message) = &self.last {
            self.shared.remove_from_log(&self.name, message);
        }
        Ok(())
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
