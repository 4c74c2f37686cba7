//! The commands, on `surety-sql`'s public API.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use surety_core::{Error, ErrorKind, MessageId};
use surety_sql::sqlx::{self, AssertSqlSafe, Pool, Postgres, Sqlite};
use surety_sql::{Backend, Dialect, EntryState, OutboxEntry, SqlStore, StoreConfig, TableNames};

use crate::output::{Failure, cell, human, print_json, print_table};
use crate::{Cli, Command, DbArgs, InboxCommand, OutboxCommand, database_url};
use surety_core::redact::redact_url;

type Outcome = std::result::Result<(), Failure>;

/// Inbox keys older than this are never touched by `purge-completed` (the store's
/// cleanup deletes both; this keeps its inbox half out of reach without overflowing the
/// database's clock arithmetic).
const KEEP_INBOX: Duration = Duration::from_secs(1000 * 365 * 24 * 3600);

/// Runs a command on the local message table (`migrate`, `outbox ...`, `inbox ...`).
pub(crate) async fn run(cli: &Cli) -> Outcome {
    let url = database_url(&cli.db)?;
    match Dialect::of_url(&url) {
        Some(Dialect::Postgres) => run_on::<Postgres>(cli, &url).await,
        Some(Dialect::Sqlite) => run_on::<Sqlite>(cli, &url).await,
        None => Err(Failure::from_error(&unknown_database(), Some(&url))),
    }
}

/// The error for a database URL that is neither PostgreSQL nor SQLite.
pub(crate) fn unknown_database() -> Error {
    Error::new(
        ErrorKind::Configuration,
        "expected a postgres://, postgresql:// or sqlite: database URL",
    )
}

/// The database commands, on the database the URL names.
async fn run_on<DB: Reads>(cli: &Cli, url: &str) -> Outcome {
    // Every driver error passes through here, so none can carry the password out.
    let fail = |e: Error| Failure::from_error(&e, Some(url));
    match &cli.command {
        Command::Migrate => {
            let store = connect::<DB>(url, &cli.db, StoreConfig::default()).await?;
            store.migrate().await.map_err(fail)?;
            let tables = &store.config().tables;
            if cli.json {
                print_json(&json!({
                    "migrated": true,
                    "database": redact_url(url),
                    "dialect": store.dialect().as_str(),
                    "tables": tables_json(tables),
                }));
            } else {
                println!(
                    "schema up to date on {} ({}): {}, {}, {}",
                    redact_url(url),
                    store.dialect().as_str(),
                    tables.outbox,
                    tables.inbox,
                    tables.migrations
                );
            }
        }
        Command::Outbox { command } => match command {
            OutboxCommand::Status => {
                let store = connect::<DB>(url, &cli.db, StoreConfig::default()).await?;
                outbox_status(&store, cli.json).await.map_err(fail)?;
            }
            OutboxCommand::Dead { limit, after } => {
                let store = connect::<DB>(url, &cli.db, StoreConfig::default()).await?;
                let rows = store
                    .outbox()
                    .list(EntryState::Dead, *after, (*limit).max(1))
                    .await
                    .map_err(fail)?;
                print_dead(&rows, *limit, cli.json);
            }
            OutboxCommand::Redrive {
                id,
                all,
                destination,
            } => {
                let store = connect::<DB>(url, &cli.db, StoreConfig::default()).await?;
                redrive(
                    &store,
                    id.as_deref(),
                    *all,
                    destination.as_deref(),
                    cli.json,
                )
                .await
                .map_err(|e| match e {
                    RedriveError::Surety(e) => fail(e),
                    RedriveError::NotDead(id) => Failure::operational(
                        "not_found",
                        format!("no dead outbox row with message id {id}"),
                    ),
                })?;
            }
            OutboxCommand::PurgeCompleted { older_than } => {
                let config = StoreConfig::default().retention(*older_than, KEEP_INBOX);
                let store = connect::<DB>(url, &cli.db, config).await?;
                let stats = store.cleanup().await.map_err(fail)?;
                if cli.json {
                    print_json(&json!({
                        "deleted_sent_rows": stats.outbox_rows,
                        "older_than_ms": older_than.as_millis() as u64,
                    }));
                } else {
                    println!(
                        "deleted {} sent rows older than {}",
                        stats.outbox_rows,
                        human(*older_than)
                    );
                }
            }
        },
        Command::Inbox {
            command: InboxCommand::Status,
        } => {
            let store = connect::<DB>(url, &cli.db, StoreConfig::default()).await?;
            inbox_status(&store, cli.json).await.map_err(fail)?;
        }
        Command::Verify { .. } | Command::Dlq { .. } => unreachable!("dispatched in main"),
    }
    Ok(())
}

/// A store on `url` with the command's table prefix and a single connection.
async fn connect<DB: Backend>(
    url: &str,
    db: &DbArgs,
    config: StoreConfig,
) -> Result<SqlStore<DB>, Failure> {
    let config = config.tables(TableNames::prefixed(&db.table_prefix));
    // One connection is all a command needs; fewer to open against a busy database.
    let config = StoreConfig {
        max_connections: 1,
        ..config
    };
    SqlStore::connect(url, config)
        .await
        .map_err(|e| Failure::from_error(&e, Some(url)))
}

fn tables_json(t: &TableNames) -> serde_json::Value {
    json!({"outbox": t.outbox, "inbox": t.inbox, "migrations": t.migrations})
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The database clock in milliseconds since the Unix epoch, as the store computes it (row
/// times come from the database clock, so ages must too).
fn now_sql(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
        _ => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

fn db_error(operation: &'static str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            ErrorKind::Unavailable
        }
        _ => ErrorKind::Storage,
    };
    Error::new(kind, format!("{operation} failed"))
        .with_context("operation", operation)
        .with_source(e)
}

/// The read-only summaries the store has no method for, written once for both databases:
/// sqlx's bounds are proven by the blanket impl for each database. Each `sql` must only
/// contain table names that `TableNames::validate` accepted (the store checks them at
/// connect).
trait Reads: Backend {
    /// `(destination, state, rows)`.
    fn per_destination(pool: &Pool<Self>, sql: String) -> Rows<'_, (String, String, i64)>;
    /// `(age in ms)`, one row.
    fn oldest(pool: &Pool<Self>, sql: String) -> Rows<'_, (Option<i64>,)>;
    /// `(consumer, keys, oldest age ms, newest age ms)`.
    fn consumers(pool: &Pool<Self>, sql: String) -> Rows<'_, (String, i64, i64, i64)>;
}

/// The rows of a read, on their way.
type Rows<'a, R> = Pin<Box<dyn Future<Output = Result<Vec<R>, sqlx::Error>> + Send + 'a>>;

impl<DB> Reads for DB
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'r> (String, String, i64): sqlx::FromRow<'r, DB::Row>,
    for<'r> (Option<i64>,): sqlx::FromRow<'r, DB::Row>,
    for<'r> (String, i64, i64, i64): sqlx::FromRow<'r, DB::Row>,
{
    fn per_destination(pool: &Pool<DB>, sql: String) -> Rows<'_, (String, String, i64)> {
        Box::pin(sqlx::query_as(AssertSqlSafe(sql)).fetch_all(pool))
    }

    fn oldest(pool: &Pool<DB>, sql: String) -> Rows<'_, (Option<i64>,)> {
        Box::pin(sqlx::query_as(AssertSqlSafe(sql)).fetch_all(pool))
    }

    fn consumers(pool: &Pool<DB>, sql: String) -> Rows<'_, (String, i64, i64, i64)> {
        Box::pin(sqlx::query_as(AssertSqlSafe(sql)).fetch_all(pool))
    }
}

async fn outbox_status<DB: Reads>(store: &SqlStore<DB>, as_json: bool) -> surety_core::Result<()> {
    let tables = &store.config().tables;
    let counts = store.counts().await?;
    let lag = store.lag().await?;
    let per_destination = DB::per_destination(
        store.pool(),
        format!(
            "SELECT destination, state, COUNT(*) FROM {} GROUP BY destination, state ORDER BY destination",
            tables.outbox
        ),
    )
    .await
    .map_err(|e| db_error("count outbox rows per destination", e))?;
    let oldest = DB::oldest(
        store.pool(),
        format!(
            "SELECT {now} - MIN(enqueued_at) FROM {t} WHERE state = 'PENDING'",
            now = now_sql(store.dialect()),
            t = tables.outbox
        ),
    )
    .await
    .map_err(|e| db_error("find the oldest pending row", e))?;
    let oldest_pending = oldest
        .first()
        .and_then(|(ms,)| *ms)
        .map(|ms| Duration::from_millis(ms.max(0) as u64));

    let state_names: Vec<&str> = EntryState::ALL.iter().map(|s| s.as_str()).collect();
    let mut destinations: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (destination, state, n) in per_destination {
        let entry = destinations.entry(destination).or_insert_with(|| {
            state_names
                .iter()
                .map(|s| ((*s).to_owned(), 0u64))
                .collect()
        });
        *entry.entry(state).or_default() += n.max(0) as u64;
    }
    let total: BTreeMap<&str, u64> = EntryState::ALL
        .iter()
        .map(|s| (s.as_str(), counts.get(s).copied().unwrap_or(0)))
        .collect();

    if as_json {
        print_json(&json!({
            "dialect": store.dialect().as_str(),
            "table": tables.outbox,
            "counts": total,
            "destinations": destinations
                .iter()
                .map(|(d, c)| json!({"destination": d, "counts": c}))
                .collect::<Vec<_>>(),
            "oldest_pending_age_ms": oldest_pending.map(|d| d.as_millis() as u64),
            "relay_lag_ms": lag.as_millis() as u64,
        }));
        return Ok(());
    }
    println!("outbox {} ({})", tables.outbox, store.dialect().as_str());
    let mut header = vec!["DESTINATION"];
    header.extend(&state_names);
    let mut rows: Vec<Vec<String>> = destinations
        .iter()
        .map(|(d, c)| {
            let mut row = vec![d.clone()];
            row.extend(state_names.iter().map(|s| c[*s].to_string()));
            row
        })
        .collect();
    let mut total_row = vec!["(total)".to_owned()];
    total_row.extend(state_names.iter().map(|s| total[s].to_string()));
    rows.push(total_row);
    print_table(&header, &rows);
    println!();
    match oldest_pending {
        Some(age) => println!("oldest pending row: enqueued {} ago", human(age)),
        None => println!("oldest pending row: none"),
    }
    println!("relay lag (oldest due pending row waiting): {}", human(lag));
    Ok(())
}

fn print_dead(rows: &[OutboxEntry], limit: usize, as_json: bool) {
    let next = (rows.len() >= limit).then(|| rows.last().map(|r| r.position()));
    if as_json {
        print_json(&json!({
            "dead": rows.iter().map(|r| json!({
                "position": r.position(),
                "message_id": r.message.id().as_str(),
                "destination": r.message.destination(),
                "key": r.message.key(),
                "attempts": r.attempts,
                "checks": r.checks,
                "producer_group": r.producer_group,
                "last_error": r.last_error,
                "enqueued_at_ms": millis(r.enqueued_at),
                "updated_at_ms": millis(r.updated_at),
            })).collect::<Vec<_>>(),
            "next_after": next.flatten(),
        }));
        return;
    }
    if rows.is_empty() {
        println!("no dead rows");
        return;
    }
    let now = SystemTime::now();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.position().to_string(),
                r.message.id().to_string(),
                r.message.destination().to_owned(),
                r.attempts.to_string(),
                human(now.duration_since(r.updated_at).unwrap_or_default()),
                cell(r.last_error.as_deref().unwrap_or(""), 80),
            ]
        })
        .collect();
    print_table(
        &[
            "POSITION",
            "MESSAGE_ID",
            "DESTINATION",
            "ATTEMPTS",
            "DEAD_FOR",
            "LAST_ERROR",
        ],
        &table,
    );
    if let Some(Some(last)) = next {
        println!("more may follow: --after {last}");
    }
}

enum RedriveError {
    Surety(Error),
    NotDead(String),
}

impl From<Error> for RedriveError {
    fn from(e: Error) -> Self {
        RedriveError::Surety(e)
    }
}

async fn redrive<DB: Backend>(
    store: &SqlStore<DB>,
    id: Option<&str>,
    all: bool,
    destination: Option<&str>,
    as_json: bool,
) -> Result<(), RedriveError> {
    let outbox = store.outbox();
    let (count, ids) = match (id, all, destination) {
        (Some(id), _, _) => {
            let parsed = MessageId::parse(id)?;
            if !outbox.redrive(&parsed).await? {
                return Err(RedriveError::NotDead(id.to_owned()));
            }
            (1, vec![id.to_owned()])
        }
        (None, true, None) => (outbox.redrive_all().await?, Vec::new()),
        (None, true, Some(destination)) => {
            // The store re-drives one id or all of them; a destination means walking the
            // dead rows and re-driving the matching ones one by one.
            let mut ids = Vec::new();
            let mut after = 0;
            loop {
                let page = outbox.list(EntryState::Dead, after, 500).await?;
                let Some(last) = page.last() else { break };
                after = last.position();
                for row in &page {
                    if row.message.destination() == destination
                        && outbox.redrive(row.message.id()).await?
                    {
                        ids.push(row.message.id().to_string());
                    }
                }
                if !as_json && !ids.is_empty() {
                    eprintln!("re-driven so far: {}", ids.len());
                }
            }
            (ids.len() as u64, ids)
        }
        (None, false, _) => unreachable!("clap requires an id or --all"),
    };
    if as_json {
        print_json(&json!({"redriven": count, "message_ids": ids}));
    } else {
        println!("re-drove {count} dead row(s) to PENDING; the relay publishes them next");
    }
    Ok(())
}

async fn inbox_status<DB: Reads>(store: &SqlStore<DB>, as_json: bool) -> surety_core::Result<()> {
    let tables = &store.config().tables;
    let rows = DB::consumers(
        store.pool(),
        format!(
            "SELECT consumer_name, COUNT(*), {now} - MIN(processed_at), {now} - MAX(processed_at) FROM {t} GROUP BY consumer_name ORDER BY consumer_name",
            now = now_sql(store.dialect()),
            t = tables.inbox
        ),
    )
    .await
    .map_err(|e| db_error("summarise the inbox", e))?;
    let age = |ms: i64| Duration::from_millis(ms.max(0) as u64);
    if as_json {
        print_json(&json!({
            "dialect": store.dialect().as_str(),
            "table": tables.inbox,
            "consumers": rows.iter().map(|(c, n, oldest, newest)| json!({
                "consumer": c,
                "keys": n,
                "oldest_age_ms": age(*oldest).as_millis() as u64,
                "newest_age_ms": age(*newest).as_millis() as u64,
            })).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    println!("inbox {} ({})", tables.inbox, store.dialect().as_str());
    if rows.is_empty() {
        println!("no processed keys");
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(c, n, oldest, newest)| {
            vec![
                c.clone(),
                n.to_string(),
                human(age(*oldest)),
                human(age(*newest)),
            ]
        })
        .collect();
    print_table(&["CONSUMER", "KEYS", "OLDEST", "NEWEST"], &table);
    Ok(())
}

/// `90s`, `30m`, `12h`, `7d`, `500ms`; a bare number is seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 30m, 12h or 7d"))?;
    let ms_per = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        other => return Err(format!("unknown unit {other:?}: use ms, s, m, h, d or w")),
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("7 days").is_err());
        assert!(parse_duration("x").is_err());
    }
}
