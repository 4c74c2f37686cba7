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
//! **Output.** A table by default; `--json` prints one JSON document on stdout (errors
//! as `{"error": {...}}` on stderr), for scripts.
//!
//! **Exit codes.** `0` success; `1` operational failure (database unreachable, bad
//! URL, no dead row with that id...), printed as the typed Surety error with its kind
//! and retry verdict; `2` usage error (unknown flag, missing argument).
//!
//! The commands use `surety-sql`'s public API (`SqlStore::migrate`, `counts`, `lag`,
//! `Outbox::dead`, `redrive`, `SqlStore::cleanup`); the per-destination counts, the
//! oldest pending age and the inbox summary are read-only queries on the validated
//! table names, because the store has no method for them.

mod commands;
mod output;
mod redact;
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
    match commands::run(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::print_error(&e, cli.json);
            ExitCode::from(1)
        }
    }
}
