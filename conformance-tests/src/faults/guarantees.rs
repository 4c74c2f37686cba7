//! `docs/guarantees.md`: the fault matrix of a run, with its date, the command that
//! produced it, and what each column and scenario means.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::RESTART;
use super::harness::{
    BAD, CUT, CUT_MESSAGES, HOSTILE, KILL, KILL_MESSAGES, POISON, POISON_MESSAGES, PRODUCER_KILL,
    PRODUCER_MESSAGES, RELAY_BATCH, RELAY_KILL, RELAY_MESSAGES, RESTART_MESSAGES, STALL,
    STALL_MESSAGES, STALL_PAUSE,
};

/// `YYYY-MM-DD` (UTC) of now, from the days since 1970 (civil-from-days).
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Writes the document to `path`.
pub(super) fn write_guarantees(
    path: &Path,
    adapters: &[String],
    matrix: &str,
    passed: bool,
) -> std::io::Result<()> {
    let command = format!(
        "SURETY_ADAPTERS={} SURETY_WRITE_GUARANTEES=1 cargo test --workspace --test faults -- --nocapture",
        adapters.join(",")
    );
    let text = format!(
        "# Guarantee matrix\n\n\
         Produced on {date} by\n\n```sh\n{command}\n```\n\n\
         Result of that run: **{result}**.\n\n{matrix}\n\
         ## What the columns mean\n\n\
         - **messages**: messages the scenario published (or tried to).\n\
         - **lost**: messages whose publish returned `Ok` (or that had to be dead-lettered) and that no consumer ever saw. Must be 0.\n\
         - **applied twice**: effects applied more than once behind `surety-sql`'s inbox on PostgreSQL. Must be 0.\n\
         - **delivered twice**: deliveries beyond the first for one id. Expected after an unknown publish outcome is retried, a consumer dies before its ack, or RocketMQ checks a half message again before it sees the first answer (one extra delivery per extra commit answer, asserted; see docs/rocketmq-interop.md); the message id (and the inbox) absorbs them.\n\
         - **dead-lettered**: distinct poison messages read back from the broker's dead-letter destination.\n\
         - **recovery**: from the fault until the client worked again (restart: first confirm after the broker was back, measured from the start of the restart; cut and stall: first successful publish begun after a cut or after the end of a stall; killed consumer, relay or producer: all effects applied).\n\n\
         ## Scenarios\n\n\
         - `{RESTART}`: {RESTART_MESSAGES} publishes with confirm, paced at 100 a second, while an inbox consumer applies them; after 30 % are confirmed, `scripts/brokers restart <broker>` (RocketMQ: name server and broker); the last 10 % are sent only once the restart command has returned. Retryable errors are retried with the same id; the consumer must come back through the adapter's own recovery. Recovery: from the start of the restart to the first confirm after the broker was back.\n\
         - `{CUT}`: {CUT_MESSAGES} publishes with confirm, 64 in flight, through an in-process TCP proxy that cuts every connection (publisher's and consumer's) three times. Every failure must be a retryable `outcome_unknown`/`unavailable`/`rejected` (the same id is then published again), never a false success; a client that retries inside (Kafka) must have had confirms in flight across the cut. Kafka goes through its `FAULTS` listener (advertised at the proxy); RocketMQ through a name-server proxy that rewrites the broker's address to a second proxy.\n\
         - `{RELAY_KILL}`: {RELAY_MESSAGES} rows in `surety-sql`'s outbox on PostgreSQL; a relay process (`Relay::spawn`, batches of {RELAY_BATCH}, the next batch leased while one publishes) is SIGKILLed once 30 % are sent, with a batch confirmed but not yet marked sent; a second relay takes over both leased batches after the lease. Every row must end `SENT` and every id be applied once behind the inbox; the duplicates delivered are the batch in flight at the kill. Memory: the relay is an in-process task, aborted.\n\
         - `{KILL}`: {KILL_MESSAGES} messages; after a third of the effects, the consumer hangs right after each effect commit (no ack) and is aborted like a killed process; a new consumer in the same group takes the redeliveries through the inbox.\n\
         - `{PRODUCER_KILL}`: a producer process sends {PRODUCER_MESSAGES} half messages; every other local transaction commits a row, the others roll back; the process is SIGKILLed after its local transactions and before Surety commits. A new producer of the same group, whose check-back reads the rows, must resolve them: committed → applied once, rolled back → never delivered. RocketMQ: native half messages and the broker's check-back; RabbitMQ and Kafka: `surety-sql`'s prepared store (`WithSqlHalfMessages`).\n\
         - `{POISON}`: {POISON_MESSAGES} messages, every 10th poison (alternately rejected by the handler and failing until 3 attempts are used up).\n\
         - `{STALL}`: {STALL_MESSAGES} publishes with confirm through the proxies, which hold every byte for {stall} s half-way (longer than the clients' 5 s confirm / request timeouts and RocketMQ's 3 s send timeout), then let them flow again; same rules as the cut, recovery measured from the end of the stall.\n\
         - `{BAD}`: oversized payload, empty / spaced / non-ASCII header names, a newline in a header value, a control character in a key, empty and malformed destinations: each a permanent `invalid_message`; declaring or subscribing to an empty destination is a typed error; nothing reaches a consumer.\n\
         - `{HOSTILE}`: the conformance suite's hostile-input cases, sent by the broker's own client (lapin, rdkafka, RocketMQ's `DefaultMQProducer`) as a producer that is not Surety: Surety's control headers forged on the destination (a year-ahead due time, a foreign origin, 1000 attempts) must be delivered as data, as a first attempt; poison messages with a header just under, at, just over and far over Surety's 8 KiB limit (as far as the broker takes from a producer: RabbitMQ 100 000 bytes, Kafka 500 000, RocketMQ 30 000) must be dead-lettered with the reason and the oversized header removed and named, and one retried with it keeps it; messages without an id or with a garbage one keep one id on every delivery and in their dead letter, bytes that are not text and null headers arrive; one group on two destinations never sees the other's retries or dead letters, and re-driving one leaves the other's alone. Each case ends with a good message that must be delivered once. Memory has no wire for a foreign client.\n\n\
         Each adapter's own tests add malformed envelopes (`malformed_*_from_a_foreign_*` in `adapters/{{kafka,rabbitmq,rocketmq}}/tests/`) and, on Kafka, forged retry headers and an oversized header's re-drive.\n",
        date = today(),
        stall = STALL_PAUSE.as_secs(),
        result = if passed { "pass" } else { "FAIL" },
    );
    std::fs::write(path, text)
}
