//! `surety dlq list|show|redrive|audit`: the broker-side dead letters of a consumer
//! group, through the adapter's [`surety_core::DeadLetters`], with an audit record of
//! every re-drive.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use surety_core::{DeadLetter, MessageId, RedriveSelection, headers};
use surety_sql::sqlx::{Postgres, Sqlite};
use surety_sql::{
    AuditRecord, Backend, Dialect, DlqAudit, RedriveAudit, SqlStore, StoreConfig, TableNames,
};

use crate::output::{Failure, cell, human, print_json, print_table};
use crate::{Cli, DlqCommand, DlqTarget};
use surety_core::redact::redact_url;

type Outcome = std::result::Result<(), Failure>;

/// Bytes of a payload shown by `show` (and in `--json` listings).
const PREVIEW_BYTES: usize = 256;

pub(crate) async fn run(cli: &Cli, command: &DlqCommand) -> Outcome {
    match command {
        DlqCommand::List { target, limit } => list(target, *limit, cli.json).await,
        DlqCommand::Show { id, target, scan } => show(target, id, *scan, cli.json).await,
        DlqCommand::Redrive {
            ids,
            all,
            target,
            actor,
            audit_log,
        } => {
            let actor = actor
                .clone()
                .filter(|a| !a.trim().is_empty())
                .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
                .ok_or_else(|| {
                    Failure::operational(
                        "configuration",
                        "who is re-driving? pass --actor NAME (USER is not set)",
                    )
                })?;
            let selection = if *all {
                RedriveSelection::All
            } else {
                let mut parsed = Vec::new();
                for id in ids {
                    parsed.push(
                        MessageId::parse(id.as_str()).map_err(|e| Failure::from_error(&e, None))?,
                    );
                }
                RedriveSelection::Ids(parsed)
            };
            let sink = AuditSink::open(cli, audit_log).await?;
            redrive(target, &selection, &actor, &sink, cli.json).await
        }
        DlqCommand::Audit { limit, audit_log } => {
            let sink = AuditSink::open(cli, audit_log).await?;
            audit(&sink, *limit, cli.json).await
        }
    }
}

/// Connects and returns the adapter's dead letters; errors are scrubbed of the URL's
/// password.
async fn dead_letters(
    target: &DlqTarget,
) -> Result<
    (
        &'static str,
        std::sync::Arc<dyn surety_core::DeadLetters>,
        String,
    ),
    Failure,
> {
    let fail = |e: surety_core::Error| Failure::from_error(&e, Some(&target.broker));
    let broker = surety::connect(&target.broker).await.map_err(fail)?;
    let adapter = broker.name();
    let dead = broker.dead_letters().await.map_err(fail)?;
    let name = broker.dead_letter_destination(&target.destination, &target.group);
    Ok((adapter, dead, name))
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A printable view of a payload: text (control characters escaped) when it is UTF-8,
/// else hex; never more than [`PREVIEW_BYTES`] bytes of it. Returns (encoding, preview).
fn preview(payload: &[u8]) -> (&'static str, String) {
    let cut = &payload[..payload.len().min(PREVIEW_BYTES)];
    let more = if payload.len() > cut.len() { "..." } else { "" };
    // A cut may split a UTF-8 sequence: accept a valid prefix that ends at most 3 bytes early.
    let text = match std::str::from_utf8(cut) {
        Ok(t) => Some(t),
        Err(e) if payload.len() > cut.len() && cut.len() - e.valid_up_to() < 4 => {
            std::str::from_utf8(&cut[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    match text {
        Some(t) => ("utf8", format!("{}{more}", t.escape_debug())),
        None => {
            let hex: Vec<String> = cut.iter().map(|b| format!("{b:02x}")).collect();
            ("hex", format!("{}{more}", hex.join(" ")))
        }
    }
}

fn letter_json(d: &DeadLetter) -> Value {
    let m = &d.message;
    let (encoding, text) = preview(m.payload());
    json!({
        "message_id": m.id().as_str(),
        "reason": d.reason,
        "attempts": d.attempts,
        "original_destination": d.original_destination,
        "group": m.header(headers::CONSUMER_GROUP),
        "position": d.position,
        "key": m.key(),
        "created_at_ms": millis(m.created_at()),
        "headers": m.headers(),
        "payload_bytes": m.payload().len(),
        "payload_encoding": encoding,
        "payload_preview": text,
    })
}

async fn list(target: &DlqTarget, limit: usize, as_json: bool) -> Outcome {
    let (adapter, dead, name) = dead_letters(target).await?;
    let letters = dead
        .list(&target.destination, &target.group, limit.max(1))
        .await
        .map_err(|e| Failure::from_error(&e, Some(&target.broker)))?;
    if as_json {
        print_json(&json!({
            "broker": redact_url(&target.broker),
            "adapter": adapter,
            "destination": target.destination,
            "group": target.group,
            "dead_letter_destination": name,
            "count": letters.len(),
            "limit": limit.max(1),
            "dead_letters": letters.iter().map(letter_json).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    println!(
        "dead letters of group {} on {} ({adapter}: {name})",
        target.group, target.destination
    );
    if letters.is_empty() {
        println!("none");
        return Ok(());
    }
    let now = SystemTime::now();
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|d| {
            vec![
                d.message.id().to_string(),
                d.attempts.map_or("-".into(), |a| a.to_string()),
                cell(d.original_destination.as_deref().unwrap_or("-"), 40),
                human(
                    now.duration_since(d.message.created_at())
                        .unwrap_or_default(),
                ),
                d.message.payload().len().to_string(),
                cell(d.reason.as_deref().unwrap_or("-"), 80),
            ]
        })
        .collect();
    print_table(
        &["MESSAGE_ID", "ATTEMPTS", "ORIGIN", "AGE", "BYTES", "REASON"],
        &rows,
    );
    if letters.len() >= limit.max(1) {
        println!(
            "(first {} shown; more may follow: raise --limit)",
            letters.len()
        );
    }
    Ok(())
}

async fn show(target: &DlqTarget, id: &str, scan: usize, as_json: bool) -> Outcome {
    let wanted = MessageId::parse(id).map_err(|e| Failure::from_error(&e, None))?;
    let (adapter, dead, name) = dead_letters(target).await?;
    let letters = dead
        .list(&target.destination, &target.group, scan.max(1))
        .await
        .map_err(|e| Failure::from_error(&e, Some(&target.broker)))?;
    let Some(d) = letters.iter().find(|d| d.message.id() == &wanted) else {
        return Err(Failure::not_found(format!(
            "no dead letter with message id {id} among the first {} of {name}",
            letters.len()
        )));
    };
    if as_json {
        let mut doc = letter_json(d);
        doc["adapter"] = json!(adapter);
        doc["dead_letter_destination"] = json!(name);
        print_json(&doc);
        return Ok(());
    }
    let m = &d.message;
    let (encoding, text) = preview(m.payload());
    let line = |k: &str, v: &str| println!("{k:<22}{v}");
    line("message id", m.id().as_str());
    line("adapter", adapter);
    line("dead-letter dest.", &name);
    line(
        "original destination",
        d.original_destination.as_deref().unwrap_or("-"),
    );
    line("group", m.header(headers::CONSUMER_GROUP).unwrap_or("-"));
    line(
        "attempts",
        &d.attempts.map_or("-".into(), |a| a.to_string()),
    );
    line("reason", &cell(d.reason.as_deref().unwrap_or("-"), 2048));
    line("position", d.position.as_deref().unwrap_or("-"));
    line("key", m.key().unwrap_or("-"));
    line("created at (ms)", &millis(m.created_at()).to_string());
    println!("headers");
    for (k, v) in m.headers() {
        println!("  {} = {}", cell(k, 128), cell(v, 512));
    }
    line(
        "payload",
        &format!("{} bytes, shown as {encoding}", m.payload().len()),
    );
    println!("  {text}");
    Ok(())
}

/// Where re-drives are recorded: the database's audit table, or a JSON-lines file.
enum AuditSink {
    Table { audit: AuditTable, table: String },
    File { path: PathBuf },
}

/// The audit table on the database the URL names.
enum AuditTable {
    Postgres(DlqAudit<Postgres>),
    Sqlite(DlqAudit<Sqlite>),
}

impl AuditTable {
    /// Opens the table and checks that it exists, before anything is re-driven (or its
    /// record would have nowhere to go).
    async fn open(url: &str, config: StoreConfig) -> surety_core::Result<AuditTable> {
        async fn on<DB: Backend>(
            url: &str,
            config: StoreConfig,
        ) -> surety_core::Result<DlqAudit<DB>> {
            let audit = SqlStore::<DB>::connect(url, config).await?.dlq_audit();
            audit.list(0, 1).await?;
            Ok(audit)
        }
        match Dialect::of_url(url) {
            Some(Dialect::Postgres) => on(url, config).await.map(AuditTable::Postgres),
            Some(Dialect::Sqlite) => on(url, config).await.map(AuditTable::Sqlite),
            None => Err(crate::commands::unknown_database()),
        }
    }

    async fn record(&self, entry: &RedriveAudit) -> surety_core::Result<AuditRecord> {
        match self {
            AuditTable::Postgres(audit) => audit.record(entry).await,
            AuditTable::Sqlite(audit) => audit.record(entry).await,
        }
    }

    async fn list(&self, after: i64, limit: usize) -> surety_core::Result<Vec<AuditRecord>> {
        match self {
            AuditTable::Postgres(audit) => audit.list(after, limit).await,
            AuditTable::Sqlite(audit) => audit.list(after, limit).await,
        }
    }
}

impl AuditSink {
    /// The table when a database is configured (checked now, before anything is
    /// re-driven), else the file.
    async fn open(cli: &Cli, file: &Path) -> Result<AuditSink, Failure> {
        let Ok(url) = crate::database_url(&cli.db) else {
            return Ok(AuditSink::File {
                path: file.to_owned(),
            });
        };
        let tables = TableNames::prefixed(&cli.db.table_prefix);
        let table = tables.audit.clone();
        let config = StoreConfig {
            max_connections: 1,
            ..StoreConfig::default().tables(tables)
        };
        let audit = AuditTable::open(&url, config)
            .await
            .map_err(|e| Failure::from_error(&e, Some(&url)))?;
        Ok(AuditSink::Table { audit, table })
    }

    fn describe(&self) -> String {
        match self {
            AuditSink::Table { table, .. } => format!("table {table}"),
            AuditSink::File { path } => format!("file {}", path.display()),
        }
    }

    /// Appends the records (after the broker confirmed every re-drive in them).
    async fn record(&self, entries: &[RedriveAudit]) -> surety_core::Result<()> {
        match self {
            AuditSink::Table { audit, .. } => {
                for e in entries {
                    audit.record(e).await?;
                }
                Ok(())
            }
            AuditSink::File { path } => {
                let io = |e: std::io::Error| {
                    surety_core::Error::new(
                        surety_core::ErrorKind::Storage,
                        format!("cannot append to the audit log {}", path.display()),
                    )
                    .with_source(e)
                };
                let mut file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io)?;
                let at = millis(SystemTime::now());
                let mut text = String::new();
                for e in entries {
                    text.push_str(
                        &json!({
                            "redriven_at_ms": at,
                            "actor": e.actor,
                            "adapter": e.adapter,
                            "message_id": e.message_id,
                            "from": e.from_destination,
                            "to": e.to_destination,
                            "group": e.group,
                        })
                        .to_string(),
                    );
                    text.push('\n');
                }
                // One write per batch, then flushed to disk: the record outlives a crash.
                file.write_all(text.as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)
            }
        }
    }

    /// The most recent `limit` records, oldest first.
    async fn read(&self, limit: usize) -> surety_core::Result<Vec<Value>> {
        match self {
            AuditSink::Table { audit, .. } => {
                let mut all = Vec::new();
                let mut after = 0;
                loop {
                    let page = audit.list(after, 1000).await?;
                    let Some(last) = page.last() else { break };
                    after = last.position;
                    all.extend(page.into_iter().map(|r| {
                        json!({
                            "position": r.position,
                            "redriven_at_ms": millis(r.redriven_at),
                            "actor": r.entry.actor,
                            "adapter": r.entry.adapter,
                            "message_id": r.entry.message_id,
                            "from": r.entry.from_destination,
                            "to": r.entry.to_destination,
                            "group": r.entry.group,
                        })
                    }));
                }
                let skip = all.len().saturating_sub(limit);
                Ok(all.split_off(skip))
            }
            AuditSink::File { path } => {
                let file = match std::fs::File::open(path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => {
                        return Err(surety_core::Error::new(
                            surety_core::ErrorKind::Storage,
                            format!("cannot read the audit log {}", path.display()),
                        )
                        .with_source(e));
                    }
                };
                let mut all = Vec::new();
                for line in BufReader::new(file).lines() {
                    let line = line.map_err(|e| {
                        surety_core::Error::new(
                            surety_core::ErrorKind::Storage,
                            format!("cannot read the audit log {}", path.display()),
                        )
                        .with_source(e)
                    })?;
                    // A line cut by a crash mid-write is skipped, not fatal.
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        all.push(v);
                    }
                }
                let skip = all.len().saturating_sub(limit);
                Ok(all.split_off(skip))
            }
        }
    }
}

async fn redrive(
    target: &DlqTarget,
    selection: &RedriveSelection,
    actor: &str,
    sink: &AuditSink,
    as_json: bool,
) -> Outcome {
    let (adapter, dead, name) = dead_letters(target).await?;
    eprintln!(
        "re-driving {} of {name} ({adapter}) ...",
        match selection {
            RedriveSelection::All => "every dead letter".to_owned(),
            RedriveSelection::Ids(ids) => format!("{} message id(s)", ids.len()),
        }
    );
    let report = dead
        .redrive(&target.destination, &target.group, selection)
        .await
        .map_err(|e| Failure::from_error(&e, Some(&target.broker)))?;
    // Every receipt is a publish the broker confirmed: now the audit record.
    let entries: Vec<RedriveAudit> = report
        .redriven
        .iter()
        .map(|r| RedriveAudit {
            actor: actor.to_owned(),
            adapter: adapter.to_owned(),
            message_id: r.message_id.to_string(),
            from_destination: name.clone(),
            to_destination: r.destination.clone(),
            group: target.group.clone(),
        })
        .collect();
    let recorded = sink.record(&entries).await;
    if as_json {
        print_json(&json!({
            "adapter": adapter,
            "dead_letter_destination": name,
            "redriven": report.redriven.iter().map(|r| json!({
                "message_id": r.message_id.as_str(),
                "destination": r.destination,
                "position": r.position,
            })).collect::<Vec<_>>(),
            "not_found": report.not_found.iter().map(|id| id.as_str()).collect::<Vec<_>>(),
            "audit": sink.describe(),
            "audited": recorded.is_ok(),
        }));
    } else {
        println!(
            "re-drove {} dead letter(s) of {name} with the attempt count reset (audit: {})",
            report.redriven.len(),
            sink.describe()
        );
        for r in &report.redriven {
            println!("  {} -> {}", r.message_id, r.destination);
        }
    }
    if let Err(e) = recorded {
        let ids: Vec<&str> = report
            .redriven
            .iter()
            .map(|r| r.message_id.as_str())
            .collect();
        let mut f = Failure::from_error(&e, None);
        f.text = format!(
            "the re-drive succeeded but its audit record could not be written ({}); re-driven by {actor}: {}",
            f.text,
            ids.join(", ")
        );
        return Err(f);
    }
    if !report.not_found.is_empty() {
        let ids: Vec<&str> = report.not_found.iter().map(|id| id.as_str()).collect();
        return Err(Failure::not_found(format!(
            "not in {name}: {}",
            ids.join(", ")
        )));
    }
    Ok(())
}

async fn audit(sink: &AuditSink, limit: usize, as_json: bool) -> Outcome {
    let records = sink
        .read(limit.max(1))
        .await
        .map_err(|e| Failure::from_error(&e, None))?;
    if as_json {
        print_json(&json!({"audit": sink.describe(), "records": records}));
        return Ok(());
    }
    println!("dead-letter re-drives ({})", sink.describe());
    if records.is_empty() {
        println!("none");
        return Ok(());
    }
    let now = millis(SystemTime::now());
    let text = |v: &Value, k: &str| cell(v[k].as_str().unwrap_or("-"), 60);
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let at = r["redriven_at_ms"].as_u64().unwrap_or(0);
            vec![
                format!(
                    "{} ago",
                    human(Duration::from_millis(now.saturating_sub(at)))
                ),
                text(r, "actor"),
                text(r, "adapter"),
                text(r, "message_id"),
                text(r, "from"),
                text(r, "to"),
            ]
        })
        .collect();
    print_table(
        &["WHEN", "ACTOR", "ADAPTER", "MESSAGE_ID", "FROM", "TO"],
        &rows,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_safe_for_binary_and_control_characters() {
        assert_eq!(preview(b"hello"), ("utf8", "hello".to_owned()));
        assert_eq!(
            preview(b"a\x1b[31mred\n"),
            ("utf8", "a\\u{1b}[31mred\\n".to_owned())
        );
        assert_eq!(preview(&[0xff, 0x00, 0x10]), ("hex", "ff 00 10".to_owned()));
        let long = "é".repeat(PREVIEW_BYTES);
        let (enc, text) = preview(long.as_bytes());
        assert_eq!(enc, "utf8");
        assert!(text.ends_with("..."));
        assert!(text.len() <= PREVIEW_BYTES + 3);
    }
}
