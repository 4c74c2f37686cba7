//! `surety`: the operator tool for Surety's local message table (outbox and inbox on
//! PostgreSQL or SQLite).
//!
//! ```text
//! surety migrate                                   apply the schema (idempotent)
//! surety outbox status                             rows per state and per destination,
//!                                                  oldest pending age, relay lag
//! surety outbox dead [--limit N] [--after POS]     dead rows with attempts and last error
//!                                                  (paged: pass the last POSITION as --after)
//! surety outbox redrive <MESSAGE_ID>               one dead row back to PENDING, attempts 0
//! surety outbox redrive --all [--destination D]    every dead row (of one destination)
//! surety outbox purge-completed --older-than 7d    delete SENT rows untouched that long
//! surety inbox status                              processed keys per consumer
//! surety verify --broker URL [--case NAME]...      conformance cases against a broker
//! surety dlq list --broker URL --destination D --group G [--limit N]
//!                                                  a group's broker-side dead letters
//! surety dlq show <MESSAGE_ID> --broker URL --destination D --group G
//!                                                  one of them: headers, reason, payload
//! surety dlq redrive (<MESSAGE_ID>...|--all) --broker URL --destination D --group G
//!                    [--actor NAME] [--audit-log FILE]
//!                                                  back to the original destination,
//!                                                  attempts reset, audited
//! surety dlq audit [--limit N] [--audit-log FILE]  who re-drove what, when
//! ```
//!
//! **Connection.** `--database-url` or `SURETY_DATABASE_URL` (falling back to
//! `SURETY_POSTGRES_URL`): `postgres://user:pass@host/db` or `sqlite://path.db`.
//! `--table-prefix` or `SURETY_TABLE_PREFIX` (default `surety`) names the tables
//! `<prefix>_outbox`, `<prefix>_inbox` and `<prefix>_migrations`, as
//! `surety_sql::TableNames::prefixed` does. Passwords are never printed: URLs are shown
//! with the password replaced by `***`, and error text is scrubbed of it too.
//!
//! **Verify.** `--broker` (or `SURETY_BROKER_URL`) picks the adapter by scheme:
//! `memory:`, `amqp://`/`amqps://` (RabbitMQ), `kafka://host:port`,
//! `rocketmq://namesrv:port`. Each case of `surety-conformance` runs in turn on fresh
//! destination names (progress on stderr); cases needing a capability the adapter lacks
//! are "not supported". On RabbitMQ and Kafka the half-message cases need a database
//! (`--database-url`): they then run on `surety-sql`'s prepared-message store in tables
//! prefixed `surety_verify`, apart from the application's outbox. Exit 1 if a case fails.
//!
//! **Dead letters.** `dlq` works on any adapter that implements
//! [`surety_core::Broker::dead_letters`] (RabbitMQ's dead-letter queue, Kafka's DLQ
//! topic, RocketMQ's `%DLQ%` group, memory); `--broker` or `SURETY_BROKER_URL` names it as
//! for `verify`. Listing removes nothing. A re-drive publishes each message with confirm
//! to its original destination (same id, attempt count reset) before removing the dead
//! letter, then records who (`--actor`, default `$USER`), what (message id, from, to,
//! adapter) and when: in the table `<prefix>_dlq_audit` when a database is configured
//! (created by `surety migrate`; checked before anything is re-driven), else appended as
//! JSON lines to `--audit-log` (`SURETY_DLQ_AUDIT_LOG`, default `surety-dlq-audit.jsonl`).
//!
//! **Output.** A table by default; `--json` prints one JSON document on stdout (errors
//! as `{"error": {...}}` on stderr), for scripts.
//!
//! **Exit codes.** `0` success; `1` operational failure (database unreachable, bad
//! URL, no dead row with that id...), printed as the typed Surety error with its kind
//! and retry verdict; `2` usage error (unknown flag, missing argument); `3` not found:
//! `dlq show` found no such id, or `dlq redrive` did not find some of the ids (the ones
//! found were re-driven and audited).
//!
//! The commands use `surety-sql`'s public API (`SqlStore::migrate`, `counts`, `lag`,
//! `Outbox::dead`, `redrive`, `SqlStore::cleanup`); the per-destination counts, the
//! oldest pending age and the inbox summary are read-only queries on the validated
//! table names, because the store has no method for them.

mod commands;
mod dlq;
mod output;
mod verify;

use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// The surety operator tool.
#[derive(Parser, Debug)]
#[command(name = "surety", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(flatten)]
    pub db: DbArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Where the local message table is.
#[derive(Args, Debug, Clone)]
pub(crate) struct DbArgs {
    /// Database URL: postgres://user:pass@host/db or sqlite://file.db (without it,
    /// SURETY_POSTGRES_URL is tried).
    #[arg(
        long,
        global = true,
        env = "SURETY_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// Table prefix: tables are <prefix>_outbox, <prefix>_inbox, <prefix>_migrations.
    #[arg(
        long,
        global = true,
        env = "SURETY_TABLE_PREFIX",
        default_value = "surety"
    )]
    pub table_prefix: String,
}

/// The database URL from `--database-url`, `SURETY_DATABASE_URL` or `SURETY_POSTGRES_URL`.
pub(crate) fn database_url(db: &DbArgs) -> Result<String, output::Failure> {
    db.database_url
        .clone()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            std::env::var("SURETY_POSTGRES_URL")
                .ok()
                .filter(|u| !u.is_empty())
        })
        .ok_or_else(|| {
            output::Failure::operational(
                "configuration",
                "no database: pass --database-url or set SURETY_DATABASE_URL (or SURETY_POSTGRES_URL)",
            )
        })
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Apply the outbox and inbox schema (safe to run again).
    Migrate,
    /// Inspect and repair the transactional outbox.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Inspect the idempotent inbox.
    Inbox {
        #[command(subcommand)]
        command: InboxCommand,
    },
    /// Broker-side dead letters of a consumer group: list, show, re-drive, audit.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Run the conformance cases against a broker and print the guarantee matrix.
    Verify {
        /// memory:, amqp://user:pass@host:5672/vhost, kafka://host:9092 or
        /// rocketmq://namesrv:9876.
        #[arg(long, env = "SURETY_BROKER_URL", hide_env_values = true)]
        broker: String,
        /// Run only this case (repeatable); all cases by default.
        #[arg(long = "case", value_name = "NAME")]
        cases: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum OutboxCommand {
    /// Rows per state and per destination, oldest pending age, relay lag.
    Status,
    /// Dead rows (attempts used up), oldest first, with their last error.
    Dead {
        /// Rows per page.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Show rows after this POSITION (the last one of the previous page).
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// Put dead rows back to PENDING with their attempts reset; the relay publishes them.
    Redrive {
        /// The message id of one dead row.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead row.
        #[arg(long)]
        all: bool,
        /// With --all: only the dead rows of this destination.
        #[arg(long)]
        destination: Option<String>,
    },
    /// Delete SENT rows last updated longer ago than --older-than.
    PurgeCompleted {
        /// Age such as 90s, 30m, 12h, 7d (a bare number is seconds).
        #[arg(long, value_parser = commands::parse_duration)]
        older_than: std::time::Duration,
    },
}

/// Which dead letters: a broker, a destination and one of its consumer groups.
#[derive(Args, Debug, Clone)]
pub(crate) struct DlqTarget {
    /// amqp://user:pass@host:5672/vhost, kafka://host:9092 or rocketmq://namesrv:9876.
    #[arg(long, env = "SURETY_BROKER_URL", hide_env_values = true)]
    pub broker: String,
    /// The destination the group consumes (not its dead-letter destination).
    #[arg(long)]
    pub destination: String,
    /// The consumer group whose dead letters these are.
    #[arg(long)]
    pub group: String,
}

#[derive(Subcommand, Debug)]
pub(crate) enum DlqCommand {
    /// Dead letters, oldest first, with reason and attempts (listing removes nothing).
    List {
        #[command(flatten)]
        target: DlqTarget,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One dead letter: headers, reason, attempts, payload preview (binary shown as hex).
    Show {
        /// Its message id.
        id: String,
        #[command(flatten)]
        target: DlqTarget,
        /// Look among this many dead letters, oldest first.
        #[arg(long, default_value_t = 10_000)]
        scan: usize,
    },
    /// Publish dead letters back to their original destination (attempts reset, same id),
    /// confirmed, and record who did it. Exit 3 if an id was not found.
    Redrive {
        /// Message ids to re-drive.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every dead letter of the group.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        target: DlqTarget,
        /// Who is re-driving, for the audit record (default: $USER).
        #[arg(long)]
        actor: Option<String>,
        /// JSON-lines audit file, used when no database is configured.
        #[arg(
            long,
            env = "SURETY_DLQ_AUDIT_LOG",
            default_value = "surety-dlq-audit.jsonl"
        )]
        audit_log: std::path::PathBuf,
    },
    /// The re-drive audit records, newest last (the database's table when a database is
    /// configured, else the JSON-lines file).
    Audit {
        /// At most this many (the most recent).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// JSON-lines audit file, used when no database is configured.
        #[arg(
            long,
            env = "SURETY_DLQ_AUDIT_LOG",
            default_value = "surety-dlq-audit.jsonl"
        )]
        audit_log: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum InboxCommand {
    /// Processed keys per consumer, with the oldest and newest.
    Status,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Usage errors exit with 2 (clap's default) before anything connects.
    let cli = Cli::parse();
    if let Command::Outbox {
        command:
            OutboxCommand::Redrive {
                all: false,
                destination: Some(_),
                ..
            },
    } = &cli.command
    {
        // clap's `requires` treats an absent bool flag as present (it has a default), so
        // this rule is checked here; `exit` prints the usage and exits with 2.
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--destination is only valid with --all",
            )
            .exit();
    }
    let outcome = match &cli.command {
        Command::Verify { broker, cases } => verify::run(&cli, broker, cases).await,
        Command::Dlq { command } => dlq::run(&cli, command).await,
        _ => commands::run(&cli).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::print_error(&e, cli.json);
            ExitCode::from(e.exit_code)
        }
    }
}
