//! Bad input: what an application must never get through `publish`, `declare` or
//! `subscribe`.

use std::sync::Arc;

use surety_core::{ErrorKind, Message, Subscription, Topology};

use super::{FaultRow, declare, fail, stop, subscribe};
use crate::Fixture;
use crate::support::Collector;

/// Oversized payloads, invalid header names and values, empty and malformed destinations:
/// each must be a non-retryable `InvalidMessage` error from `publish`; declaring or
/// subscribing to an empty destination must be a typed error; nothing reaches a consumer.
pub async fn bad_input(broker: &str, f: &Fixture) -> Result<FaultRow, String> {
    let mut row = FaultRow::new("bad-input", broker);
    let (dest, group) = declare(f, "fault-bad").await?;
    let limit = f
        .broker
        .capabilities()
        .max_message_size
        .ok_or("the adapter declares no message size limit")?;
    let bad = [
        (
            "oversized payload",
            Message::new(&dest, vec![0u8; limit + 1]),
        ),
        (
            "empty header name",
            Message::new(&dest, "x").with_header("", "v"),
        ),
        (
            "header name with a space",
            Message::new(&dest, "x").with_header("bad name", "v"),
        ),
        (
            "non-ASCII header name",
            Message::new(&dest, "x").with_header("naïve", "v"),
        ),
        (
            "header value with a newline",
            Message::new(&dest, "x").with_header("h", "a\nb"),
        ),
        (
            "key with a control character",
            Message::new(&dest, "x").with_key("k\u{0}"),
        ),
        ("empty destination", Message::new("", "x")),
        ("destination with a space", Message::new("bad dest", "x")),
    ];
    row.messages = bad.len();
    let publisher = f.broker.publisher().await.map_err(fail("publisher"))?;
    for (what, m) in &bad {
        match publisher.publish(m).await {
            Ok(_) => row.failures.push(format!("{what}: confirmed")),
            Err(e) if e.kind() == ErrorKind::InvalidMessage && !e.is_retryable() => {}
            Err(e) => row.failures.push(format!(
                "{what}: expected a permanent invalid_message, got {e}"
            )),
        }
    }
    match f.broker.declare(&Topology::new("")).await {
        Ok(()) => row
            .failures
            .push("declaring an empty destination succeeded".into()),
        Err(e) if e.is_retryable() => row.failures.push(format!(
            "declaring an empty destination: a retryable error {e}"
        )),
        Err(_) => {}
    }
    match f.broker.subscriber().await {
        Ok(s) => match s
            .subscribe(Subscription::new("", &group), Arc::new(Collector::acking()))
            .await
        {
            Ok(h) => {
                let _ = stop(h).await;
                row.failures
                    .push("subscribing to an empty destination succeeded".into());
            }
            Err(e) if e.is_retryable() => row.failures.push(format!(
                "subscribing to an empty destination: a retryable error {e}"
            )),
            Err(_) => {}
        },
        Err(e) => return Err(format!("subscriber: {e}")),
    }
    let consumed = Collector::acking();
    let handle = subscribe(
        f,
        Subscription::new(&dest, &group),
        Arc::new(consumed.clone()),
    )
    .await?;
    tokio::time::sleep(f.quiet_period).await;
    if let Err(why) = stop(handle).await {
        row.failures.push(why);
    }
    if !consumed.is_empty() {
        row.failures.push(format!(
            "{} invalid messages reached a consumer",
            consumed.len()
        ));
    }
    Ok(row)
}
