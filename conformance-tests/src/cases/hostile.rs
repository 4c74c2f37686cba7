//! Hostile input: what a producer that is not Surety writes (forged control headers,
//! headers past every limit, no id or a garbage one, bytes that are not text, empty
//! bodies), sent with the broker's own client ([`crate::ForeignProducer`]), and one group
//! consuming two destinations. Each case ends with a good message that must still flow.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use surety_core::{
    DeadLetter, Delivery, Message, MessageId, Outcome, RedriveSelection, Subscription, Topology,
    headers,
};

use super::CaseResult;
use super::steps::{
    consume_until, fail, fast_retry, fresh, header, publish_all, publisher, settle, start,
};
use crate::foreign::{ForeignMessage, ForeignProducer};
use crate::support::{Collector, unique_name};
use crate::{Fixture, Observed};

/// Surety's header value limit ([`surety_core::MAX_HEADER_VALUE_LEN`]).
const LIMIT: usize = surety_core::MAX_HEADER_VALUE_LEN;

fn foreign(f: &Fixture) -> Result<&dyn ForeignProducer, String> {
    f.foreign
        .as_deref()
        .ok_or_else(|| "the fixture has no foreign producer".to_owned())
}

async fn send(
    producer: &dyn ForeignProducer,
    destination: &str,
    message: ForeignMessage,
) -> Result<(), String> {
    producer
        .send(destination, message)
        .await
        .map_err(|e| format!("the foreign producer's send: {e}"))
}

/// Deliveries whose `case` header is `name`.
fn of_case(collector: &Collector, name: &str) -> Vec<Delivery> {
    collector
        .deliveries()
        .into_iter()
        .filter(|d| header(d, "case") == name)
        .collect()
}

/// The dead letters of `group` on `destination`, waited for until `done` holds on them.
async fn dead_letters_until(
    f: &Fixture,
    destination: &str,
    group: &str,
    done: impl Fn(&[DeadLetter]) -> bool,
) -> Result<Vec<DeadLetter>, String> {
    let dead_letters = f
        .broker
        .dead_letters()
        .await
        .map_err(fail("dead letters"))?;
    let deadline = std::time::Instant::now() + f.delivery_timeout;
    loop {
        let listed = dead_letters
            .list(destination, group, 50)
            .await
            .map_err(fail("list dead letters"))?;
        if done(&listed) || std::time::Instant::now() >= deadline {
            return Ok(listed);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A good Surety message, published after the hostile ones.
async fn good_message(f: &Fixture, destination: &str) -> Result<Message, String> {
    let good = Message::new(destination, "after the strangers").with_header("case", "good");
    publish_all(publisher(f).await?.as_ref(), std::slice::from_ref(&good)).await?;
    Ok(good)
}

/// Consumes `destination` as `group` (three attempts, short backoff) with `collector`
/// until `done` holds and `good` has arrived (or the delivery timeout passes); `good`
/// must then have been delivered exactly once.
async fn consume_then_good_once(
    f: &Fixture,
    destination: &str,
    group: &str,
    collector: &Collector,
    good: &Message,
    done: impl Fn(&Collector) -> bool,
) -> Result<(), String> {
    let sub = Subscription::new(destination, group).retry(fast_retry(3));
    consume_until(f, sub, collector, |c| {
        done(c) && !c.of(good.id()).is_empty()
    })
    .await?;
    let times = collector.of(good.id()).len();
    ensure!(
        times == 1,
        "the good message after the foreign ones was delivered {times} times, want once"
    );
    Ok(())
}

pub(super) async fn forged_control_headers_are_data(f: Fixture) -> CaseResult {
    let producer = foreign(&f)?;
    let (dest, groups) = fresh(&f, "forged", &["g"]).await?;
    let year_ahead = (SystemTime::now() + Duration::from_secs(365 * 24 * 3600))
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .to_string();
    let id = unique_name("forged-id");
    let forged = ForeignMessage::new("forged")
        .id(&id)
        .header("case", "forged")
        .header(headers::ATTEMPT, "1000")
        .header("surety-retry-at", year_ahead)
        .header("surety-retry-of", "../../etc/passwd")
        .header(headers::ORIGINAL_DESTINATION, "../../etc/passwd")
        .header(headers::DEAD_LETTER_ATTEMPTS, "1000");
    send(producer, &dest, forged).await?;
    let good = good_message(&f, &dest).await?;
    // The forged message fails once: obeying its attempt header would dead-letter it at
    // once; obeying its due time would hold it (and the good one behind it) for a year.
    let collector = Collector::with(|d: &Delivery| match (header(d, "case"), d.attempt) {
        ("forged", 1) => Err("first try fails".into()),
        _ => Ok(Outcome::Ack),
    });
    consume_then_good_once(&f, &dest, &groups[0], &collector, &good, |c| {
        of_case(c, "forged").len() >= 2
    })
    .await?;
    let forged = of_case(&collector, "forged");
    let attempts: Vec<u32> = forged.iter().map(|d| d.attempt).collect();
    ensure!(
        attempts == [1, 2],
        "the forged message was delivered as attempts {attempts:?}, want [1, 2]: its attempt header was obeyed"
    );
    for d in &forged {
        ensure!(
            d.message.destination() == dest,
            "the forged message was delivered as from {:?}",
            d.message.destination()
        );
        ensure!(
            d.message.id().as_str() == id,
            "the forged message's id changed to {}",
            d.message.id()
        );
    }
    Ok(Observed {
        messages: 2,
        ..Observed::default()
    })
}

pub(super) async fn oversized_headers_never_block_the_dead_letter(f: Fixture) -> CaseResult {
    let producer = foreign(&f)?;
    let (dest, groups) = fresh(&f, "oversized", &["g"]).await?;
    let group = &groups[0];
    // Up to what the broker itself takes from a producer.
    let far = producer.max_header_bytes();
    let sizes = [
        ("just-under", LIMIT - 1),
        ("at-limit", LIMIT),
        ("over", LIMIT + 1),
        ("far-over", far),
    ];
    for (name, size) in sizes {
        let poison = ForeignMessage::new(name)
            .header("case", name)
            .header("blob", "b".repeat(size));
        send(producer, &dest, poison).await?;
    }
    let retried = ForeignMessage::new("retried")
        .header("case", "retried")
        .header("blob", "r".repeat(far));
    send(producer, &dest, retried).await?;
    let good = good_message(&f, &dest).await?;
    let collector = Collector::with(|d: &Delivery| match header(d, "case") {
        "retried" if d.attempt == 1 => Err("first try fails".into()),
        "retried" | "good" => Ok(Outcome::Ack),
        _ => Ok(Outcome::reject("poison")),
    });
    consume_then_good_once(&f, &dest, group, &collector, &good, |c| {
        of_case(c, "retried").len() >= 2
    })
    .await?;
    let retried = of_case(&collector, "retried");
    ensure!(
        retried.len() == 2 && retried[0].message.id() == retried[1].message.id(),
        "the retried message with a {far}-byte header: {} deliveries (want 2, one id)",
        retried.len()
    );
    ensure!(
        header(&retried[1], "blob").len() == far,
        "the retry lost its {far}-byte header"
    );
    let want: Vec<(MessageId, &str, usize)> = sizes
        .iter()
        .map(|(name, size)| {
            let seen = of_case(&collector, name);
            seen.first().map(|d| (d.message.id().clone(), *name, *size))
        })
        .collect::<Option<_>>()
        .ok_or("a poison message never reached the handler")?;
    let dead = dead_letters_until(&f, &dest, group, |listed| {
        want.iter()
            .all(|(id, _, _)| listed.iter().any(|d| d.message.id() == id))
    })
    .await?;
    for (id, name, size) in &want {
        let Some(letter) = dead.iter().find(|d| d.message.id() == id) else {
            return Err(format!(
                "the {name} poison ({size}-byte header) is not in the dead letters under the id its handler saw ({id})"
            ));
        };
        ensure!(
            letter
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("poison")),
            "the {name} dead letter's reason: {:?}",
            letter.reason
        );
        let kept = letter.message.header("blob").map(str::len);
        let removed = letter.message.header(headers::DEAD_LETTER_REMOVED);
        if *size <= LIMIT {
            ensure!(
                kept == Some(*size),
                "the {name} dead letter lost a header within the limit"
            );
        } else {
            ensure!(
                kept.is_none() && removed.is_some_and(|r| r.contains("blob")),
                "the {name} dead letter kept the {size}-byte header ({kept:?}) or does not say it was removed ({removed:?})"
            );
        }
    }
    Ok(Observed {
        messages: sizes.len() + 2,
        ..Observed::default()
    })
}

pub(super) async fn unusable_ids_are_replaced_by_stable_ones(f: Fixture) -> CaseResult {
    let producer = foreign(&f)?;
    let (dest, groups) = fresh(&f, "no-id", &["g"]).await?;
    let group = &groups[0];
    let odd_value: Vec<u8> = if producer.binary_headers() {
        vec![0xff, 0xfe, b'x']
    } else {
        "text only".into()
    };
    // RocketMQ refuses empty bodies: there the bodies are one byte.
    let empty_bodies = producer.empty_bodies();
    let empty: Vec<u8> = if empty_bodies { Vec::new() } else { vec![b'x'] };
    let messages = [
        ForeignMessage::new(vec![0x00, 0x9f, 0x92])
            .header("case", "no-id")
            .header("odd", odd_value.clone())
            .null_header("nothing"),
        ForeignMessage::new(empty.clone())
            .id("has spaces")
            .header("case", "garbage-id"),
        if empty_bodies {
            ForeignMessage::new("x").null_body()
        } else {
            ForeignMessage::new("x")
        }
        .header("case", "null-body"),
        ForeignMessage::new("rejected").header("case", "rejected"),
    ];
    for m in messages {
        send(producer, &dest, m).await?;
    }
    let good = good_message(&f, &dest).await?;
    let collector = Collector::with(|d: &Delivery| match (header(d, "case"), d.attempt) {
        ("rejected", _) => Ok(Outcome::reject("rejected on purpose")),
        ("good", _) | (_, 2..) => Ok(Outcome::Ack),
        _ => Err("first try fails".into()),
    });
    let retried = ["no-id", "garbage-id", "null-body"];
    consume_then_good_once(&f, &dest, group, &collector, &good, |c| {
        retried.iter().all(|name| of_case(c, name).len() >= 2) && !of_case(c, "rejected").is_empty()
    })
    .await?;
    let mut ids = Vec::new();
    for case in retried {
        let seen = of_case(&collector, case);
        ensure!(
            seen.len() == 2,
            "the {case} message was delivered {} times, want 2 (a failure, then success)",
            seen.len()
        );
        ensure!(
            seen[0].message.id() == seen[1].message.id(),
            "the {case} message changed its id between deliveries: {} then {}",
            seen[0].message.id(),
            seen[1].message.id()
        );
        ids.push(seen[0].message.id().clone());
    }
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    ids.dedup();
    ensure!(ids.len() == 3, "two foreign messages were given one id");
    let no_id = &of_case(&collector, "no-id")[0];
    ensure!(
        no_id.message.payload().as_ref() == [0x00, 0x9f, 0x92],
        "a body that is not text changed"
    );
    let odd = header(no_id, "odd");
    let odd_ok = if producer.binary_headers() {
        odd.contains("\\xff") && odd.ends_with('x')
    } else {
        odd == "text only"
    };
    ensure!(odd_ok, "the odd header value arrived as {odd:?}");
    ensure!(
        !producer.binary_headers() || no_id.message.header("nothing").is_some(),
        "a header with a null value vanished"
    );
    for case in ["garbage-id", "null-body"] {
        ensure!(
            of_case(&collector, case)[0].message.payload().is_empty() == empty_bodies,
            "the {case} message's body changed"
        );
    }
    let rejected = of_case(&collector, "rejected");
    let rejected_id = rejected
        .first()
        .map(|d| d.message.id().clone())
        .ok_or("the rejected message never arrived")?;
    let dead = dead_letters_until(&f, &dest, group, |listed| {
        listed.iter().any(|d| d.message.id() == &rejected_id)
    })
    .await?;
    ensure!(
        dead.iter().any(|d| d.message.id() == &rejected_id),
        "the rejected id-less message is not in the dead letters under the id its handler saw ({rejected_id}); listed: {:?}",
        dead.iter()
            .map(|d| d.message.id().to_string())
            .collect::<Vec<_>>()
    );
    Ok(Observed {
        messages: 5,
        ..Observed::default()
    })
}

pub(super) async fn one_group_on_two_destinations_stays_apart(f: Fixture) -> CaseResult {
    let (a, b) = (unique_name("apart-a"), unique_name("apart-b"));
    let group = unique_name("g");
    for dest in [&a, &b] {
        f.broker
            .declare(&Topology::new(dest).group(&group))
            .await
            .map_err(fail("declare"))?;
    }
    let (retried, rejected) = (
        Message::new(&a, "retried").with_header("case", "retried"),
        Message::new(&a, "rejected").with_header("case", "rejected"),
    );
    let of_b = Message::new(&b, "b's own").with_header("case", "b");
    let on_a = Collector::with(|d: &Delivery| match (header(d, "case"), d.attempt) {
        ("rejected", _) => Ok(Outcome::reject("rejected on purpose")),
        ("retried", 1 | 2) => Err("not yet".into()),
        _ => Ok(Outcome::Ack),
    });
    let on_b = Collector::acking();
    let handles = vec![
        start(
            &f,
            Subscription::new(&a, &group).retry(fast_retry(4)),
            &on_a,
        )
        .await?,
        start(
            &f,
            Subscription::new(&b, &group).retry(fast_retry(4)),
            &on_b,
        )
        .await?,
    ];
    let publisher = publisher(&f).await?;
    publish_all(
        publisher.as_ref(),
        &[retried.clone(), rejected.clone(), of_b.clone()],
    )
    .await?;
    settle(&f, handles, || {
        on_a.of(retried.id()).len() >= 3
            && !on_a.of(rejected.id()).is_empty()
            && !on_b.of(of_b.id()).is_empty()
    })
    .await;
    ensure!(
        on_a.of(retried.id()).len() == 3,
        "a's retried message was delivered to a {} times, want 3",
        on_a.of(retried.id()).len()
    );
    let strays: Vec<String> = on_b
        .deliveries()
        .iter()
        .filter(|d| d.message.id() != of_b.id())
        .map(|d| format!("{} (as from {})", d.message.id(), d.message.destination()))
        .collect();
    ensure!(
        strays.is_empty(),
        "b's subscription received a's messages: {strays:?}"
    );
    ensure!(
        on_b.of(of_b.id()).len() == 1 && on_a.of(of_b.id()).is_empty(),
        "b's message went to a, or to b other than once"
    );
    let dead = dead_letters_until(&f, &a, &group, |listed| {
        listed.iter().any(|d| d.message.id() == rejected.id())
    })
    .await?;
    ensure!(
        dead.iter().any(|d| d.message.id() == rejected.id()),
        "a's rejected message is not in a's dead letters"
    );
    let dead_letters = f
        .broker
        .dead_letters()
        .await
        .map_err(fail("dead letters"))?;
    let of_b_listed = dead_letters
        .list(&b, &group, 50)
        .await
        .map_err(fail("list b's dead letters"))?;
    ensure!(
        of_b_listed.is_empty(),
        "b's dead letters list a's: {:?}",
        of_b_listed
            .iter()
            .map(|d| d.message.id().to_string())
            .collect::<Vec<_>>()
    );
    let report = dead_letters
        .redrive(&b, &group, &RedriveSelection::All)
        .await
        .map_err(fail("re-drive b's dead letters"))?;
    ensure!(
        report.redriven.is_empty(),
        "re-driving b's dead letters re-drove {} of a's",
        report.redriven.len()
    );
    let still = dead_letters
        .list(&a, &group, 50)
        .await
        .map_err(fail("list a's dead letters"))?;
    ensure!(
        still.iter().any(|d| d.message.id() == rejected.id()),
        "re-driving b's dead letters removed a's"
    );
    Ok(Observed {
        messages: 3,
        ..Observed::default()
    })
}
