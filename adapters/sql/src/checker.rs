//! The checker: resolves prepared rows of one producer group whose local transaction
//! never reported (a crash, `Unknown`, a panic) by asking the group's [`CheckBack`].
//!
//! A check-back lease counts the check and pushes the row's next check out in one
//! statement, so a row is asked at most once per interval however many checkers run
//! (`SKIP LOCKED` on PostgreSQL); the answer moves the row through `transitions.rs`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety_core::raw::run_check_back;
use surety_core::{CheckBack, Result, TxState, telemetry};

use crate::backend::{Arg, Backend, On};
use crate::entry::{Columns, OutboxEntry, count, decode_all, millis};
use crate::error::{ADAPTER, storage};
use crate::prepared::check_group;
use crate::store::SqlStore;
use crate::transitions;
use crate::worker::Worker;

/// Leases up to `limit` prepared rows of `group` due for a check-back, skipping `skip`
/// (local transactions still running in this process): each gets one more check counted
/// and its next check pushed `interval` out.
async fn claim_checks<DB: Backend>(
    store: &SqlStore<DB>,
    group: &str,
    interval: Duration,
    limit: usize,
    skip: &HashSet<i64>,
) -> Result<Vec<OutboxEntry>> {
    let sql = &store.sql().checks;
    let e = |e| storage("lease prepared messages for check-back", e);
    let mut tx = store
        .begin("lease prepared messages for check-back")
        .await?;
    let args = [Arg::Text(group), Arg::Int(count(limit.max(1)))];
    let rows = DB::fetch(On::Conn(&mut *tx), &sql.check_candidates, &args)
        .await
        .map_err(e)?;
    let mut entries = decode_all::<DB>(&rows)?;
    entries.retain(|entry| !skip.contains(&entry.id));
    for entry in &mut entries {
        let args = [Arg::Int(entry.id), Arg::Int(millis(interval))];
        let rows = DB::fetch(On::Conn(&mut *tx), &sql.claim_check, &args)
            .await
            .map_err(e)?;
        let checks = match rows.first() {
            Some(row) => Columns::<DB>::of(row, "count a check-back").int(0)?,
            None => return Err(crate::error::corrupt("a leased prepared row vanished")),
        };
        entry.checks = u32::try_from(checks).unwrap_or(u32::MAX);
    }
    tx.commit().await.map_err(e)?;
    Ok(entries)
}

/// What a prepared row becomes when its check-backs are used up without an answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckExhausted {
    /// Delete it: never published (RocketMQ's behaviour).
    #[default]
    Rollback,
    /// Keep it as `DEAD` for an operator ([`crate::Outbox::dead`]); re-driving publishes it.
    Dead,
}

/// Settings of a [`Checker`].
#[derive(Clone, Debug)]
pub struct CheckerConfig {
    /// Age of a prepared row before its first check-back.
    pub check_timeout: Duration,
    /// Delay between check-backs of one row.
    pub check_interval: Duration,
    /// Check-backs asked per row before `on_exhausted` applies.
    pub max_checks: u32,
    /// What happens after `max_checks` unanswered check-backs.
    pub on_exhausted: CheckExhausted,
    /// How long one check-back may take before it counts as `Unknown` (asked again after
    /// `check_interval`): a hung check-back holds up the rows behind it in a pass by at
    /// most this.
    pub check_back_timeout: Duration,
    /// Rows checked per pass.
    pub batch_size: usize,
    /// Sleep between passes when nothing was due.
    pub poll_interval: Duration,
}

impl Default for CheckerConfig {
    /// First check after 6 s, then every 30 s, 15 checks, then roll back (RocketMQ's
    /// broker defaults), each check-back answering within 10 s; passes of 100 rows every
    /// second.
    fn default() -> Self {
        CheckerConfig {
            check_timeout: Duration::from_secs(6),
            check_interval: Duration::from_secs(30),
            max_checks: 15,
            on_exhausted: CheckExhausted::Rollback,
            check_back_timeout: surety_core::raw::DEFAULT_CHECK_BACK_TIMEOUT,
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// What one checker pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Check-backs asked.
    pub checked: u64,
    /// Rows committed (now pending for the relay).
    pub committed: u64,
    /// Rows rolled back (deleted).
    pub rolled_back: u64,
    /// `Unknown` answers (asked again after the interval).
    pub unknown: u64,
    /// Rows whose checks ran out (rolled back or dead as configured).
    pub exhausted: u64,
}

/// Resolves stale prepared rows of one producer group through its [`CheckBack`].
/// Several checkers on one PostgreSQL database share the rows (`SKIP LOCKED`).
pub struct Checker<DB: Backend> {
    store: SqlStore<DB>,
    group: Arc<str>,
    check_back: Arc<dyn CheckBack>,
    pub(crate) config: Arc<CheckerConfig>,
    /// Rows whose local transaction is still running in this process: never checked.
    pub(crate) running: Arc<Mutex<HashSet<i64>>>,
}

impl<DB: Backend> Clone for Checker<DB> {
    fn clone(&self) -> Self {
        Checker {
            store: self.store.clone(),
            group: self.group.clone(),
            check_back: self.check_back.clone(),
            config: self.config.clone(),
            running: self.running.clone(),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for Checker<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("group", &self.group)
            .field("config", &self.config)
            .finish()
    }
}

impl<DB: Backend> Checker<DB> {
    /// A checker for `group`'s prepared rows in `store`.
    pub fn new(
        store: SqlStore<DB>,
        group: &str,
        check_back: Arc<dyn CheckBack>,
        config: CheckerConfig,
    ) -> Result<Self> {
        check_group(group)?;
        Ok(Checker {
            store,
            group: group.into(),
            check_back,
            config: Arc::new(config),
            running: Arc::default(),
        })
    }

    /// One pass: asks the check-back of every due prepared row (up to the batch size) and
    /// applies the answers.
    pub async fn run_once(&self) -> Result<CheckStats> {
        let skip = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let entries = claim_checks(
            &self.store,
            &self.group,
            self.config.check_interval,
            self.config.batch_size,
            &skip,
        )
        .await?;
        let mut stats = CheckStats::default();
        for entry in entries {
            // The claim counted this check already.
            if entry.checks > self.config.max_checks {
                stats.exhausted += 1;
                metrics::counter!(telemetry::CHECK_BACK_EXHAUSTED, "adapter" => ADAPTER)
                    .increment(1);
                tracing::warn!(
                    message_id = %entry.message.id(),
                    checks = self.config.max_checks,
                    outcome = ?self.config.on_exhausted,
                    "check-backs exhausted"
                );
                match self.config.on_exhausted {
                    CheckExhausted::Rollback => {
                        transitions::rollback_prepared(&self.store, entry.id).await?;
                    }
                    CheckExhausted::Dead => {
                        let error = format!(
                            "no check-back answer after {} checks",
                            self.config.max_checks
                        );
                        transitions::dead_prepared(&self.store, entry.id, &error).await?;
                    }
                }
                continue;
            }
            stats.checked += 1;
            let answer = run_check_back(
                ADAPTER,
                self.check_back.as_ref(),
                &entry.message,
                self.config.check_back_timeout,
            )
            .await;
            match answer {
                TxState::Commit => {
                    if transitions::commit_prepared(&self.store, entry.id).await? {
                        stats.committed += 1;
                    }
                }
                TxState::Rollback => {
                    if transitions::rollback_prepared(&self.store, entry.id).await? {
                        stats.rolled_back += 1;
                    }
                }
                TxState::Unknown => stats.unknown += 1,
            }
        }
        Ok(stats)
    }

    /// Runs the checker in the background.
    pub fn spawn(&self) -> Worker {
        let checker = self.clone();
        Worker::spawn(self.config.poll_interval, move || {
            let checker = checker.clone();
            async move {
                match checker.run_once().await {
                    Ok(stats) => {
                        stats.checked + stats.exhausted >= checker.config.batch_size as u64
                    }
                    Err(e) => {
                        tracing::warn!(group = %checker.group, error = %e, "check-back pass failed");
                        false
                    }
                }
            }
        })
    }
}
