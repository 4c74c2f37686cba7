//! Scenarios 2 and 7: the connection cut, or stalled, during confirmed sends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use surety_core::{Message, MessageId, Subscription};

use super::{FaultAdapter, FaultRow, acceptable_transient, declare, setup, stop, subscribe};
use crate::Fixture;
use crate::fault_proxy::{FaultProxy, ProxyOptions};
use crate::support::{Collector, wait_until};

/// How long one publish may take before the scenario calls it hung: well above the
/// confirm and connect timeouts the runner configures.
pub const PUBLISH_HANG_LIMIT: Duration = Duration::from_secs(30);

/// What the proxy does to the connections while messages are published.
#[derive(Clone, Copy, Debug)]
pub enum NetworkFault {
    /// Close every connection, `times` times, evenly spread over the publishes.
    Cut {
        /// How many cuts.
        times: usize,
    },
    /// Hold every byte for `pause` (longer than the client's timeouts), once, half-way.
    Stall {
        /// How long no byte flows.
        pause: Duration,
    },
}

impl NetworkFault {
    /// The scenario name of the fault.
    pub fn scenario(self) -> &'static str {
        match self {
            NetworkFault::Cut { .. } => "connection-cut-during-confirmed-sends",
            NetworkFault::Stall { .. } => "stall-beyond-client-timeouts",
        }
    }

    fn times(self) -> usize {
        match self {
            NetworkFault::Cut { times } => times,
            NetworkFault::Stall { .. } => 1,
        }
    }
}

/// Publishes `n` messages with confirm through `proxy` (the `proxied` fixture's broker
/// connects through it) while the proxy breaks the connections (`fault`); consumes on
/// `consumer` (the proxied fixture too, to cut consumers as well, or one that bypasses
/// the proxy). Every publish that returned `Ok` must be consumed;
/// every failure must be a retryable "outcome unknown" / "unavailable" / "rejected"
/// (then the same id is published again); the publisher must work again after each
/// fault. Recovery is measured from the cut, or from the end of the stall.
pub async fn network_fault_during_confirmed_sends(
    broker: &str,
    proxied: &Fixture,
    consumer: &Fixture,
    proxies: &[&FaultProxy],
    n: usize,
    fault: NetworkFault,
) -> Result<FaultRow, String> {
    let accepted = || -> usize { proxies.iter().map(|p| p.accepted_connections()).sum() };
    let mut row = FaultRow::new(fault.scenario(), broker);
    let cuts = fault.times();
    row.messages = n;
    let (dest, group) = declare(consumer, "fault-cut").await?;
    let consumed = Collector::acking();
    let consuming = subscribe(
        consumer,
        Subscription::new(&dest, &group).concurrency(16),
        Arc::new(consumed.clone()),
    )
    .await?;
    let publisher = setup("publisher through the proxy", proxied.broker.publisher()).await?;
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(&dest, format!("cut {i}")).with_header("seq", i.to_string()))
        .collect();

    // (attempt started, attempt finished) of every successful publish.
    let oks: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let confirmed: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let transient = Arc::new(AtomicUsize::new(0));
    let ok_count = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(90);

    let cutter = {
        let ok_count = ok_count.clone();
        // (fault began, fault ended) of every fault.
        let cut_times: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
        let times = cut_times.clone();
        let task = async move {
            for k in 1..=cuts {
                let at = k * n / (cuts + 1);
                if !wait_until(Duration::from_secs(60), || {
                    ok_count.load(Ordering::SeqCst) >= at
                })
                .await
                {
                    break;
                }
                let began = Instant::now();
                match fault {
                    NetworkFault::Cut { .. } => proxies.iter().for_each(|p| p.cut_all()),
                    NetworkFault::Stall { pause } => {
                        proxies.iter().for_each(|p| p.stall(true));
                        tokio::time::sleep(pause).await;
                        proxies.iter().for_each(|p| p.stall(false));
                    }
                }
                times.lock().unwrap().push((began, Instant::now()));
            }
        };
        (task, cut_times)
    };
    let (cut_task, cut_times) = cutter;
    let accepted_before = accepted();

    let publishing = async {
        // Windows of 64 publishes in flight, each retried on its own with the same id.
        for window in messages.chunks(64) {
            let tasks = window.iter().map(|m| {
                let publisher = publisher.clone();
                let (oks, confirmed, problems, transient, ok_count) = (
                    oks.clone(),
                    confirmed.clone(),
                    problems.clone(),
                    transient.clone(),
                    ok_count.clone(),
                );
                async move {
                    loop {
                        let started = Instant::now();
                        // A publish must answer (at worst "outcome unknown") within its
                        // confirm timeout; one that hangs is a broken contract, recorded,
                        // and its message published again so the ledger still counts.
                        let result =
                            match tokio::time::timeout(PUBLISH_HANG_LIMIT, publisher.publish(m))
                                .await
                            {
                                Ok(result) => result,
                                Err(_) => {
                                    problems.lock().unwrap().push(format!(
                                        "a publish of {} did not return within {} s",
                                        m.id(),
                                        PUBLISH_HANG_LIMIT.as_secs()
                                    ));
                                    if Instant::now() >= deadline {
                                        return;
                                    }
                                    continue;
                                }
                            };
                        match result {
                            Ok(receipt) => {
                                if receipt.message_id != *m.id() {
                                    problems.lock().unwrap().push(format!(
                                        "the receipt for {} names {}",
                                        m.id(),
                                        receipt.message_id
                                    ));
                                }
                                oks.lock().unwrap().push((started, Instant::now()));
                                confirmed.lock().unwrap().push(m.id().clone());
                                ok_count.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Err(e) if acceptable_transient(&e) => {
                                transient.fetch_add(1, Ordering::SeqCst);
                                if Instant::now() >= deadline {
                                    problems.lock().unwrap().push(format!(
                                        "{} still failing at the deadline: {e}",
                                        m.id()
                                    ));
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(e) => {
                                problems.lock().unwrap().push(format!(
                                    "a publish failed with an error that does not say retry: {e}"
                                ));
                                return;
                            }
                        }
                    }
                }
            });
            futures::future::join_all(tasks).await;
        }
    };
    tokio::join!(publishing, cut_task);

    let confirmed = confirmed.lock().unwrap().clone();
    let expected = confirmed.clone();
    wait_until(consumer.delivery_timeout, || {
        consumed.ledger().lost(&expected) == 0
    })
    .await;
    tokio::time::sleep(consumer.quiet_period).await;
    let stopped = stop(consuming).await;

    let ledger = consumed.ledger();
    row.lost = ledger.lost(&confirmed);
    row.delivered_twice = ledger.duplicated_among(&confirmed);
    row.failures = problems.lock().unwrap().clone();
    if let Err(why) = stopped {
        row.failures.push(why);
    }
    let cut_times = cut_times.lock().unwrap().clone();
    if cut_times.len() < cuts {
        row.failures.push(format!(
            "only {} of {cuts} faults happened (publishing stopped)",
            cut_times.len()
        ));
    }
    let oks = oks.lock().unwrap().clone();
    let mut worst = Duration::ZERO;
    // Publishes in flight across a fault: begun before it ended, confirmed after it began.
    let straddled = oks
        .iter()
        .filter(|(started, done)| {
            cut_times
                .iter()
                .any(|(began, ended)| started <= ended && done >= began)
        })
        .count();
    let reconnected = accepted().saturating_sub(accepted_before);
    for (_, cut) in &cut_times {
        match oks
            .iter()
            .filter(|(started, _)| started >= cut)
            .map(|(_, done)| done.duration_since(*cut))
            .min()
        {
            Some(d) => worst = worst.max(d),
            None => row
                .failures
                .push("no publish succeeded after a fault: the publisher did not recover".into()),
        }
    }
    row.recovery = (!cut_times.is_empty()).then_some(worst);
    let transient = transient.load(Ordering::SeqCst);
    // Clients that retry inside (Kafka's idempotent producer) may hide a fault from the
    // caller; the fault still counts when confirms were in flight across it.
    if transient == 0 && straddled == 0 {
        row.failures.push(
            "no publish saw an error or was in flight across a fault: the scenario proved nothing"
                .into(),
        );
    }
    let unconfirmed = n - confirmed.len();
    row.note = format!(
        "{}, {transient} retryable errors, {straddled} confirms in flight across a fault, {reconnected} new connections after the first fault{}",
        match fault {
            NetworkFault::Cut { .. } => format!("{} cuts", cut_times.len()),
            NetworkFault::Stall { pause } =>
                format!("{} stall of {} s", cut_times.len(), pause.as_secs_f64()),
        },
        if unconfirmed > 0 {
            format!(", {unconfirmed} never confirmed")
        } else {
            String::new()
        }
    );
    Ok(row)
}

/// Runs `fault` on the adapter connected through its fault proxies
/// ([`FaultAdapter::proxied`]); `target`'s own fixture is the direct connection.
pub(super) async fn run_network_fault(
    adapter: &str,
    target: &FaultAdapter,
    n: usize,
    fault: NetworkFault,
) -> Result<FaultRow, String> {
    let direct = &target.fixture;
    if target.in_process {
        return Ok(FaultRow::not_run(
            fault.scenario(),
            adapter,
            "in-process broker: there is no connection to cut",
        ));
    }
    let Some(proxied) = &target.proxied else {
        return Err(format!("no proxied set-up for {adapter}"));
    };
    let (broker, proxies) = proxied().await?;
    let proxied = Fixture::new(broker)
        .quiet_period(direct.quiet_period)
        .delivery_timeout(direct.delivery_timeout);
    // Cuts hit the consumers too (they must reconnect and the unacked deliveries come
    // again); a stall is measured on the publisher alone.
    let consumer = match fault {
        NetworkFault::Cut { .. } => &proxied,
        NetworkFault::Stall { .. } => direct,
    };
    let refs: Vec<&FaultProxy> = proxies.iter().collect();
    let mut row =
        network_fault_during_confirmed_sends(adapter, &proxied, consumer, &refs, n, fault).await?;
    // The scenario means something only if the client's traffic went through every proxy
    // (not around it, to an address the broker advertised).
    for p in &proxies {
        if p.accepted_connections() == 0 {
            row.failures.push(format!(
                "no connection went through the proxy on {}: the client bypassed it",
                p.addr()
            ));
        }
    }
    Ok(row)
}

/// Resolves `host:port`, for a proxy's upstream or listening address.
pub async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))
}

/// Starts a [`FaultProxy`] forwarding to `upstream` (`host:port`) as `options` say.
pub async fn start_proxy(upstream: &str, options: ProxyOptions) -> Result<FaultProxy, String> {
    let listen = options.listen;
    FaultProxy::start_with(resolve(upstream).await?, options)
        .await
        .map_err(|e| match listen {
            Some(at) => format!("start the fault proxy on {at}: {e}"),
            None => format!("start the fault proxy: {e}"),
        })
}
