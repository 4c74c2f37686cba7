//! Scenarios 5 and 6 through one broker: a Surety subscription whose handler applies an
//! effect in PostgreSQL, alone or through the inbox (5), and the end-to-end latency from
//! a business commit (order row + outbox row) to that effect, through the outbox fast
//! path and through a polling relay alone (6).
//!
//! One subscription (destination `<name>-consume`, group `bench`) serves every run: each
//! run tags its messages with a run id of its own, and the handler acknowledges anything
//! else (a leftover of an interrupted earlier run) without counting it. A new consumer
//! group starts from the earliest offset on Kafka and RocketMQ, so that leftover is only
//! ever the benchmark's own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use surety_core::{Broker, Message, Outcome, Publisher, Subscription, Topology, handler_fn};
use surety_sql::sqlx::{self, Postgres};
use surety_sql::{PgStore, Relay, RelayConfig};
use tokio::sync::Notify;

use crate::measure::{self, Run};
use crate::outbox::{self, exec};
use crate::{Options, Row, fail};

const GROUP: &str = "bench";
/// The header that carries the run id (names starting `surety-` are Surety's own).
const RUN: &str = "bench-run";
/// The inbox's consumer name.
const CONSUMER: &str = "surety-bench";
const INSERT_EFFECT: &str = "INSERT INTO surety_bench_effects (message_id, amount) VALUES ($1, $2)";

/// What the handler does with the messages of the current run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Acknowledge only (the readiness probe).
    Ack,
    /// The effect in a transaction of its own.
    Effect,
    /// The effect and the inbox key in one transaction ([`surety_sql::Inbox::process`]).
    Inbox,
}

#[derive(Default)]
struct Progress {
    run: String,
    mode: Option<Mode>,
    applied: usize,
    expected: usize,
    first: Option<Instant>,
    last: Option<Instant>,
    /// Handler time per applied message (scenario 5).
    effect_times: Vec<Duration>,
    /// Business commit instants by message id, and commit → effect latencies (scenario 6).
    committed: HashMap<String, Instant>,
    end_to_end: Vec<Duration>,
}

struct Sink {
    store: PgStore,
    progress: Mutex<Progress>,
    done: Notify,
}

impl Sink {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts run `run`: its messages are handled in `mode` until `expected` are applied.
    fn start(&self, run: String, mode: Mode, expected: usize) {
        *self.progress() = Progress {
            run,
            mode: Some(mode),
            expected,
            ..Progress::default()
        };
    }

    async fn effect(&self, message: &Message) -> Result<bool, String> {
        let mut tx = self.store.pool().begin().await.map_err(fail("begin"))?;
        sqlx::query(INSERT_EFFECT)
            .bind(message.id().as_str())
            .bind(message.payload().len() as i64)
            .execute(&mut *tx)
            .await
            .map_err(fail("insert the effect"))?;
        tx.commit().await.map_err(fail("commit"))?;
        Ok(true)
    }

    async fn effect_in_inbox(&self, message: &Message) -> Result<bool, String> {
        let id = message.id().as_str().to_owned();
        let amount = message.payload().len() as i64;
        let outcome = self
            .store
            .inbox()
            .process(CONSUMER, message, move |tx| {
                Box::pin(async move {
                    sqlx::query(INSERT_EFFECT)
                        .bind(id)
                        .bind(amount)
                        .execute(&mut *tx)
                        .await
                        .map(|_| ())
                        .map_err(|e| {
                            surety_core::Error::new(
                                surety_core::ErrorKind::Storage,
                                "effect failed",
                            )
                            .with_source(e)
                        })
                })
            })
            .await
            .map_err(fail("inbox"))?;
        Ok(!outcome.is_duplicate())
    }

    async fn handle(&self, message: &Message) -> Result<(), String> {
        let mode = {
            let mut p = self.progress();
            if message.header(RUN) != Some(p.run.as_str()) {
                return Ok(()); // a leftover of another run
            }
            p.first.get_or_insert_with(Instant::now);
            p.mode
        };
        let t = Instant::now();
        let applied = match mode {
            None | Some(Mode::Ack) => true,
            Some(Mode::Effect) => self.effect(message).await?,
            Some(Mode::Inbox) => self.effect_in_inbox(message).await?,
        };
        let took = t.elapsed();
        let mut p = self.progress();
        if !applied || message.header(RUN) != Some(p.run.as_str()) {
            return Ok(());
        }
        let now = Instant::now();
        p.applied += 1;
        p.last = Some(now);
        p.effect_times.push(took);
        if let Some(at) = p.committed.get(message.id().as_str()).copied() {
            p.end_to_end.push(now - at);
        }
        if p.applied >= p.expected {
            self.done.notify_one();
        }
        Ok(())
    }

    /// Waits until the current run has applied what it expects, at most `limit`.
    async fn wait(&self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            {
                let p = self.progress();
                if p.applied >= p.expected {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the consumer applied {} of {} messages of run {} in {limit:?}",
                        p.applied, p.expected, p.run
                    ));
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), self.done.notified()).await;
        }
    }
}

/// A run id unique to this process and run.
fn run_id(n: &mut u64) -> String {
    *n += 1;
    format!("{}-{}", std::process::id(), n)
}

fn tagged(destination: &str, payload: &Bytes, run: &str) -> Message {
    Message::new(destination, payload.clone()).with_header(RUN, run)
}

/// Scenario 5's run: publish `n` tagged messages (untimed work, overlapping the
/// consumption), and time the consumer from its first delivery to its `n`-th effect.
// The arguments are the scenario's fixed settings, passed through as they are.
#[allow(clippy::too_many_arguments)]
async fn consume_run(
    sink: &Sink,
    publisher: &Arc<dyn Publisher>,
    destination: &str,
    payload: &Bytes,
    mode: Mode,
    n: usize,
    window: usize,
    runs: &Mutex<u64>,
) -> Result<Run, String> {
    let run = run_id(&mut runs.lock().unwrap_or_else(|e| e.into_inner()));
    sink.start(run.clone(), mode, n);
    measure::windowed(n, window, |_| {
        let message = tagged(destination, payload, &run);
        async move {
            publisher
                .publish(&message)
                .await
                .map(|_| ())
                .map_err(fail("publish"))
        }
    })
    .await?;
    sink.wait(Duration::from_secs(60) + Duration::from_millis(20 * n as u64))
        .await?;
    let p = sink.progress();
    let (Some(first), Some(last)) = (p.first, p.last) else {
        return Err("no delivery was timed".into());
    };
    Ok(Run {
        elapsed: last - first,
        latencies: p.effect_times.clone(),
    })
}

/// Scenario 6's run: `n` business transactions (an order and its outbox row), one every
/// `gap`; with `fast_path` each commit is followed by `Relay::publish_now` for its row,
/// otherwise a background relay (default settings) publishes. Latency: commit → effect.
#[allow(clippy::too_many_arguments)]
async fn end_to_end_run(
    sink: &Sink,
    store: &PgStore,
    publisher: &Arc<dyn Publisher>,
    destination: &str,
    payload: &Bytes,
    fast_path: bool,
    n: usize,
    gap: Duration,
    runs: &Mutex<u64>,
) -> Result<Run, String> {
    let run = run_id(&mut runs.lock().unwrap_or_else(|e| e.into_inner()));
    sink.start(run.clone(), Mode::Inbox, n);
    let relay = Relay::new(store.clone(), publisher.clone(), RelayConfig::default());
    let background = (!fast_path).then(|| relay.spawn());
    let start = Instant::now();
    for i in 0..n {
        let message = tagged(destination, payload, &run);
        outbox::business_transaction(store, i, Some(&message)).await?;
        sink.progress()
            .committed
            .insert(message.id().as_str().to_owned(), Instant::now());
        if fast_path {
            relay
                .publish_now(std::slice::from_ref(message.id()))
                .await
                .map_err(fail("publish_now"))?;
        }
        let next = start + gap * (i as u32 + 1);
        tokio::time::sleep_until(next.into()).await;
    }
    let waited = sink.wait(Duration::from_secs(60)).await;
    if let Some(worker) = background {
        worker.shutdown().await;
    }
    waited?;
    let p = sink.progress();
    Ok(Run {
        elapsed: start.elapsed(),
        latencies: p.end_to_end.clone(),
    })
}

/// Scenarios 5 and 6 on `broker`; messages go to `<name>-consume`.
pub async fn bench(
    o: &Options,
    broker_name: &'static str,
    broker: Arc<dyn Broker>,
    destination_prefix: &str,
    publisher: &Arc<dyn Publisher>,
) -> Result<Vec<Row>, String> {
    let destination = format!("{destination_prefix}-consume");
    broker
        .declare(&Topology::new(destination.as_str()).group(GROUP))
        .await
        .map_err(fail("declare the consume destination"))?;
    let store = outbox::store::<Postgres>().await?;
    exec(
        &store,
        "CREATE TABLE IF NOT EXISTS surety_bench_effects (message_id TEXT NOT NULL, amount BIGINT NOT NULL)",
    )
    .await?;
    outbox::business_table(&store).await?;
    let clear: measure::Reset<'_> = Box::new(|| {
        let store = &store;
        Box::pin(async move {
            exec(store, "DELETE FROM surety_bench_effects").await?;
            exec(store, "DELETE FROM surety_bench_inbox").await?;
            exec(store, "DELETE FROM surety_bench_orders").await?;
            outbox::clear(store).await
        })
    });
    clear().await?;
    let sink = Arc::new(Sink {
        store: store.clone(),
        progress: Mutex::default(),
        done: Notify::new(),
    });
    let handler = {
        let sink = sink.clone();
        handler_fn(move |delivery| {
            let sink = sink.clone();
            async move {
                sink.handle(&delivery.message).await?;
                Ok(Outcome::Ack)
            }
        })
    };
    let subscription = broker
        .subscriber()
        .await
        .map_err(fail("subscriber"))?
        .subscribe(
            Subscription::new(destination.as_str(), GROUP).concurrency(o.consume_concurrency),
            Arc::new(handler),
        )
        .await
        .map_err(fail("subscribe"))?;
    let runs = Mutex::new(0u64);
    let payload = o.payload_bytes();

    // Ready once a probe comes through (a consumer group joins in seconds on Kafka and
    // RocketMQ); probes repeat, since an early one may go to a partition not yet assigned.
    let probe = run_id(&mut runs.lock().unwrap_or_else(|e| e.into_inner()));
    sink.start(probe.clone(), Mode::Ack, 1);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        publisher
            .publish(&tagged(&destination, &payload, &probe))
            .await
            .map_err(fail("probe"))?;
        if sink.wait(Duration::from_secs(1)).await.is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            subscription.shutdown().await;
            return Err("the consumer received nothing within 90 s".into());
        }
    }

    let mut rows = Vec::new();
    let result = async {
        if o.runs(5) {
            let n = o.consume_messages;
            let (sink, runs, payload, destination) = (&*sink, &runs, &payload, &destination);
            let run = |mode| {
                measure::workload(move |n| {
                    consume_run(
                        sink,
                        publisher,
                        destination,
                        payload,
                        mode,
                        n,
                        o.window,
                        runs,
                    )
                })
            };
            let r = measure::alternate(
                o.repetitions,
                o.warmup().min(n),
                &[(n, run(Mode::Effect)), (n, run(Mode::Inbox))],
                Some(&clear),
            )
            .await?;
            let alone = measure::summarise(&r[0]);
            let inbox = measure::summarise(&r[1]);
            let cost = alone.rate / inbox.rate.max(1e-9);
            let row = |scenario: &str, summary, ratio| Row {
                scenario_no: 5,
                broker: broker_name,
                scenario: scenario.into(),
                messages: n,
                window: o.consume_concurrency,
                payload: o.payload,
                summary,
                ratio,
            };
            rows.push(row(
                "consume + effect (PostgreSQL transaction); latency: handler time",
                alone,
                "1.00 (baseline)".into(),
            ));
            rows.push(row(
                "consume + effect + inbox dedup record, same transaction",
                inbox,
                format!("{cost:.2}× the cost (goal ≤ 1.3)"),
            ));
        }
        if o.runs(6) {
            let n = o.e2e_messages;
            let gap = Duration::from_millis(o.e2e_gap_ms);
            let mut summaries = Vec::new();
            for fast_path in [true, false] {
                let mut all = Vec::new();
                for _ in 0..o.repetitions.max(1) {
                    all.push(
                        end_to_end_run(
                            &sink,
                            &store,
                            publisher,
                            &destination,
                            &payload,
                            fast_path,
                            n,
                            gap,
                            &runs,
                        )
                        .await?,
                    );
                    clear().await?;
                }
                summaries.push(measure::summarise(&all));
            }
            let ratio = summaries[1].p50.as_secs_f64() / summaries[0].p50.as_secs_f64().max(1e-9);
            let relay = RelayConfig::default();
            let row = |scenario: String, summary, ratio| Row {
                scenario_no: 6,
                broker: broker_name,
                scenario,
                messages: n,
                window: 1,
                payload: o.payload,
                summary,
                ratio,
            };
            let mut s = summaries.into_iter();
            rows.push(row(
                format!(
                    "outbox fast path: commit, then Relay::publish_now; a commit every {} ms",
                    o.e2e_gap_ms
                ),
                s.next().expect("two summaries"),
                "p50/p99 commit → effect (no goal)".into(),
            ));
            rows.push(row(
                format!(
                    "relay alone (polls every {} ms, batches of {})",
                    relay.poll_interval.as_millis(),
                    relay.batch_size
                ),
                s.next().expect("two summaries"),
                format!("p50 {ratio:.1}× the fast path's (no goal)"),
            ));
        }
        Ok::<(), String>(())
    }
    .await;
    subscription.shutdown().await;
    clear().await?;
    exec(&store, "DROP TABLE IF EXISTS surety_bench_effects").await?;
    exec(&store, "DROP TABLE IF EXISTS surety_bench_orders").await?;
    store.close().await;
    result?;
    Ok(rows)
}
