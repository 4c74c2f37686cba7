//! Metrics are part of the contract: the events a user alerts on are recorded by every
//! adapter under the names and labels docs/metrics.md documents.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use surety_core::{ErrorKind, Message, Outcome, Subscription, SubscriptionHandle, telemetry};

use super::CaseResult;
use super::steps::{fast_retry, fresh, publish_all, publisher, start};
use crate::recorder::{Recording, recording};
use crate::support::{Collector, unique_name, wait_until};
use crate::{Fixture, Observed};

/// A counter, the labels of the series this case caused (beside `adapter`), and the
/// least value it must reach.
type Expected = (&'static str, Vec<(&'static str, String)>, u64);

/// The metrics an adapter records for publishing and consuming, with their labels, as
/// docs/metrics.md lists them (a test in this crate checks that the page agrees).
pub const ADAPTER_METRICS: &[(&str, &[&str])] = &[
    (telemetry::PUBLISHED, &["adapter", "destination"]),
    (telemetry::CONFIRMED, &["adapter", "destination"]),
    (
        telemetry::PUBLISH_FAILED,
        &["adapter", "destination", "kind"],
    ),
    (telemetry::PUBLISH_SECONDS, &["adapter"]),
    (telemetry::DELIVERED, &["adapter", "group"]),
    (telemetry::ACKED, &["adapter", "group"]),
    (telemetry::RETRIED, &["adapter", "group"]),
    (telemetry::DEAD_LETTERED, &["adapter", "group"]),
    (telemetry::DEAD_LETTER_FAILED, &["adapter", "group"]),
];

/// Causes a confirmed publish, a failed one, a delivery acked, one retried, one
/// dead-lettered and one whose dead letter fails, then checks that each documented metric
/// was recorded with exactly its documented labels.
pub(super) async fn metrics_recorded(f: Fixture) -> CaseResult {
    let recording = recording()?;
    let adapter = f.broker.name();
    let (dest, groups) = fresh(&f, "metrics", &["g", "dlq-down"]).await?;
    let (group, failing_group) = (&groups[0], &groups[1]);

    // Publish: one confirmed, one refused (nobody declared the destination).
    let publisher = publisher(&f).await?;
    let ok = Message::new(&dest, "ok");
    let retried = Message::new(&dest, "retry once");
    let poison = Message::new(&dest, "poison");
    publish_all(
        publisher.as_ref(),
        &[ok.clone(), retried.clone(), poison.clone()],
    )
    .await?;
    let nowhere = unique_name("nowhere");
    match publisher.publish(&Message::new(&nowhere, "lost?")).await {
        Err(e) if e.kind() == ErrorKind::Unroutable => {}
        other => {
            return Err(format!(
                "publish to {nowhere}: want unroutable, got {other:?}"
            ));
        }
    }

    // Consume: ack, a retry then an ack, a dead letter; and in a second group, a dead
    // letter whose destination does not exist.
    let retry_id = retried.id().clone();
    let poison_id = poison.id().clone();
    let first_try = Arc::new(AtomicBool::new(true));
    let collector = Collector::with(move |d| {
        if *d.message.id() == poison_id {
            return Ok(Outcome::reject("poison"));
        }
        if *d.message.id() == retry_id && first_try.swap(false, Ordering::SeqCst) {
            return Err("fails once".into());
        }
        Ok(Outcome::Ack)
    });
    let policy = fast_retry(3);
    let mut handles: Vec<SubscriptionHandle> = vec![
        start(
            &f,
            Subscription::new(&dest, group).retry(policy.clone()),
            &collector,
        )
        .await?,
    ];
    let rejecting = Collector::with(|_| Ok(Outcome::reject("poison")));
    handles.push(
        start(
            &f,
            Subscription::new(&dest, failing_group)
                .retry(policy)
                .dead_letter_to(unique_name("missing-dlq"))
                .concurrency(1),
            &rejecting,
        )
        .await?,
    );

    let expected: Vec<Expected> = vec![
        (telemetry::PUBLISHED, vec![("destination", dest.clone())], 3),
        (telemetry::CONFIRMED, vec![("destination", dest.clone())], 3),
        (
            telemetry::PUBLISHED,
            vec![("destination", nowhere.clone())],
            1,
        ),
        (
            telemetry::PUBLISH_FAILED,
            vec![
                ("destination", nowhere.clone()),
                ("kind", "unroutable".into()),
            ],
            1,
        ),
        (telemetry::DELIVERED, vec![("group", group.clone())], 4),
        (telemetry::ACKED, vec![("group", group.clone())], 2),
        (telemetry::RETRIED, vec![("group", group.clone())], 1),
        (telemetry::DEAD_LETTERED, vec![("group", group.clone())], 1),
        (
            telemetry::DEAD_LETTER_FAILED,
            vec![("group", failing_group.clone())],
            1,
        ),
    ];
    let count = |r: &Recording, name: &str, labels: &[(&str, String)]| -> u64 {
        let mut with: Vec<(&str, &str)> = vec![("adapter", adapter)];
        with.extend(labels.iter().map(|(k, v)| (*k, v.as_str())));
        r.counter(name, &with)
    };
    let all_seen = wait_until(f.delivery_timeout, || {
        expected
            .iter()
            .all(|(name, labels, at_least)| count(recording, name, labels) >= *at_least)
    })
    .await;
    for handle in handles {
        handle.shutdown().await;
    }
    let mut missing = Vec::new();
    for (name, labels, at_least) in &expected {
        let got = count(recording, name, labels);
        if got < *at_least {
            missing.push(format!("{name}{labels:?}: {got}, want at least {at_least}"));
        }
    }
    let timed = recording.histogram_count(telemetry::PUBLISH_SECONDS, &[("adapter", adapter)]);
    if timed == 0 {
        missing.push(format!("{}: no value recorded", telemetry::PUBLISH_SECONDS));
    }
    if !all_seen || !missing.is_empty() {
        return Err(format!("metrics not recorded: {}", missing.join("; ")));
    }

    // Every series this case caused carries exactly the documented labels.
    for (name, documented) in ADAPTER_METRICS {
        let mine: Vec<_> = recording
            .series(name, &[("adapter", adapter)])
            .into_iter()
            .filter(|labels| {
                labels
                    .get("destination")
                    .is_none_or(|d| *d == dest || *d == nowhere)
                    && labels
                        .get("group")
                        .is_none_or(|g| g == group || g == failing_group)
            })
            .collect();
        for labels in mine {
            let names: Vec<&str> = labels.keys().map(String::as_str).collect();
            let mut want = documented.to_vec();
            want.sort_unstable();
            if names != want {
                return Err(format!(
                    "{name} recorded with labels {names:?}; docs/metrics.md says {want:?}"
                ));
            }
        }
    }
    Ok(Observed {
        messages: 4,
        ..Observed::default()
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::ADAPTER_METRICS;

    /// The labels each metric has in docs/metrics.md's table, read from the page.
    fn documented() -> Vec<(String, BTreeSet<String>)> {
        let page = include_str!("../../../docs/metrics.md");
        page.lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                let labels = cells
                    .get(3)?
                    .split(',')
                    .map(|l| l.trim().trim_matches('`').to_owned())
                    .filter(|l| !l.is_empty())
                    .collect();
                Some((name.to_owned(), labels))
            })
            .collect()
    }

    #[test]
    fn the_case_checks_the_labels_the_page_documents() {
        let page = documented();
        for (name, labels) in ADAPTER_METRICS {
            let want: BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
            let found = page.iter().find(|(n, _)| n == name);
            assert_eq!(
                found.map(|(_, l)| l),
                Some(&want),
                "{name}: docs/metrics.md and the metrics case disagree"
            );
        }
    }
}
