//! Scenario 1: a broker restart during confirmed sends and consumption.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_core::{Message, MessageId};

use super::FaultAdapter;
use super::harness::RESTART_MESSAGES;
use super::pg::PgInboxEffects;
use super::{
    DyingConsumer, EffectStore, FaultRow, acceptable_transient, declare, setup, stop,
    subscribe_inbox,
};
use crate::Fixture;
use crate::support::wait_until;

/// The scenario name of a broker restart.
pub const RESTART: &str = "broker-restart-during-sends-and-consumption";

/// How long one publish may take during a restart: a client may hold a send until the
/// broker is back (Kafka buffers it up to its delivery timeout).
pub const RESTART_PUBLISH_LIMIT: Duration = Duration::from_secs(150);

/// Publishes `n` messages with confirm, paced (windows of 10, 100 a second), while an
/// inbox consumer applies them; after 30 % of them are confirmed, runs `restart` (the
/// broker restart). Retryable errors during the outage are retried with the same id.
/// The consumer is left to the adapter's own recovery. Every confirmed id must be
/// applied exactly once. Recovery: from the start of the restart until the first confirm
/// after the restart command returned (the broker was back).
pub async fn broker_restart<R>(
    broker: &str,
    f: &Fixture,
    effects: Arc<dyn EffectStore>,
    n: usize,
    restart: R,
) -> Result<FaultRow, String>
where
    R: std::future::Future<Output = Result<(), String>>,
{
    let mut row = FaultRow::new(RESTART, broker);
    row.messages = n;
    let (dest, group) = declare(f, "fault-restart").await?;
    let consumer = Arc::new(DyingConsumer::inbox(effects.clone(), &group));
    let handle = subscribe_inbox(f, &dest, &group, consumer.clone()).await?;
    let publisher = setup("publisher", f.broker.publisher()).await?;
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(&dest, format!("restart {i}")))
        .collect();

    let oks: Mutex<Vec<(Instant, Instant)>> = Mutex::default();
    let confirmed: Mutex<Vec<MessageId>> = Mutex::default();
    let problems: Mutex<Vec<String>> = Mutex::default();
    let transient = AtomicUsize::new(0);
    let ok_count = AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs(240);
    let restart_window: Mutex<Option<(Instant, Instant)>> = Mutex::default();
    let applied_at_restart = AtomicUsize::new(0);

    let restart_over = AtomicBool::new(false);
    let restarting = async {
        let at = n * 3 / 10;
        if !wait_until(Duration::from_secs(60), || {
            ok_count.load(Ordering::SeqCst) >= at
        })
        .await
        {
            restart_over.store(true, Ordering::SeqCst);
            return Err(format!(
                "only {} of {at} sends confirmed before the restart",
                ok_count.load(Ordering::SeqCst)
            ));
        }
        applied_at_restart.store(consumer.seen_count(), Ordering::SeqCst);
        let began = Instant::now();
        let result = restart.await;
        *restart_window.lock().unwrap() = Some((began, Instant::now()));
        restart_over.store(true, Ordering::SeqCst);
        result
    };
    // The last tenth is held until the restart command has returned, so that sends are
    // confirmed after it even when the broker was back (and every earlier send confirmed)
    // before the command's own readiness check ended, as happens on a loaded machine.
    let held_back = n - n / 10;
    let publishing = async {
        for (i, window) in messages.chunks(10).enumerate() {
            if i * 10 >= held_back {
                wait_until(Duration::from_secs(240), || {
                    restart_over.load(Ordering::SeqCst)
                })
                .await;
            }
            let tasks = window.iter().map(|m| async {
                loop {
                    let started = Instant::now();
                    let result =
                        match tokio::time::timeout(RESTART_PUBLISH_LIMIT, publisher.publish(m))
                            .await
                        {
                            Ok(result) => result,
                            Err(_) => {
                                problems.lock().unwrap().push(format!(
                                    "a publish of {} did not return within {} s",
                                    m.id(),
                                    RESTART_PUBLISH_LIMIT.as_secs()
                                ));
                                return;
                            }
                        };
                    match result {
                        Ok(_) => {
                            oks.lock().unwrap().push((started, Instant::now()));
                            confirmed.lock().unwrap().push(m.id().clone());
                            ok_count.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        Err(e) if acceptable_transient(&e) && Instant::now() < deadline => {
                            transient.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => {
                            problems.lock().unwrap().push(format!(
                                "a publish failed with an error that does not say retry: {e}"
                            ));
                            return;
                        }
                    }
                }
            });
            futures::future::join_all(tasks).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (_, restarted) = tokio::join!(publishing, restarting);
    let confirmed = confirmed.into_inner().unwrap();
    let mut failures = problems.into_inner().unwrap();
    if let Err(why) = restarted {
        failures.push(format!("restart: {why}"));
    }
    // After a restart a consumer group may take a while to rejoin.
    let all = wait_until(Duration::from_secs(120), || {
        confirmed.iter().all(|id| consumer.has_seen(id))
    })
    .await;
    tokio::time::sleep(f.quiet_period).await;
    if let Err(why) = stop(handle).await {
        failures.push(why);
    }

    let counts = effects.applied().await?;
    row.tally_effects(&confirmed, &counts);
    row.delivered_twice = consumer.duplicates();
    let window = *restart_window.lock().unwrap();
    let oks = oks.into_inner().unwrap();
    let mut gap = Duration::ZERO;
    let mut done: Vec<Instant> = oks.iter().map(|(_, d)| *d).collect();
    done.sort();
    for pair in done.windows(2) {
        gap = gap.max(pair[1] - pair[0]);
    }
    if let Some((began, ended)) = window {
        match oks.iter().map(|(_, d)| *d).filter(|d| *d >= ended).min() {
            Some(first) => row.recovery = Some(first - began),
            None => failures.push("no send was confirmed after the restart".into()),
        }
    }
    let at_restart = applied_at_restart.load(Ordering::SeqCst);
    if !all {
        failures.push(format!(
            "the consumer did not resume by the adapter's own recovery: {} of {} confirmed applied ({at_restart} before the restart)",
            confirmed.iter().filter(|id| consumer.has_seen(id)).count(),
            confirmed.len()
        ));
    }
    row.failures = failures;
    row.note = format!(
        "restart command {}, {} retryable errors, longest gap between confirms {:.1} s, {at_restart} applied before the restart, {} never confirmed",
        window.map_or("-".to_string(), |(b, e)| format!(
            "{:.1} s",
            (e - b).as_secs_f64()
        )),
        transient.load(Ordering::SeqCst),
        gap.as_secs_f64(),
        n - confirmed.len(),
    );
    Ok(row)
}

/// Runs [`broker_restart`] with the adapter's restart ([`FaultAdapter::restart`]) and the
/// effects in a PostgreSQL inbox of its own.
pub(super) async fn run_restart(adapter: &str, target: &FaultAdapter) -> Result<FaultRow, String> {
    if target.in_process {
        return Ok(FaultRow::not_run(
            RESTART,
            adapter,
            "in-process broker: a restart would be a new, empty broker",
        ));
    }
    let Some(restart) = &target.restart else {
        return Err(format!("no restart set-up for {adapter}"));
    };
    let effects = Arc::new(PgInboxEffects::create().await?);
    let row = broker_restart(
        adapter,
        &target.fixture,
        effects.clone(),
        RESTART_MESSAGES,
        restart(),
    )
    .await;
    effects.drop_tables().await;
    row
}
