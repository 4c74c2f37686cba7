//! SQLite (feature `sqlite`, bundled): one writer at a time, so one relay per database
//! file; pools open in WAL mode with the configured busy timeout.

use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::Sqlite;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult};
use surety_core::Result;

use super::Backend;
use super::private::Native;
use crate::config::StoreConfig;
use crate::dialect::Dialect;
use crate::error::{bad_url, storage};

impl Backend for Sqlite {
    const DIALECT: Dialect = Dialect::Sqlite;
}

impl Native for Sqlite {
    fn open<'a>(url: &'a str, config: &'a StoreConfig) -> BoxFuture<'a, Result<sqlx::SqlitePool>> {
        Box::pin(async move {
            if Dialect::of_url(url) != Some(Dialect::Sqlite) {
                return Err(bad_url("expected a sqlite: URL"));
            }
            // The file is created if missing.
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|_| bad_url("the SQLite URL does not parse"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(config.busy_timeout);
            SqlitePoolOptions::new()
                .max_connections(config.max_connections.max(1))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(|e| storage("open SQLite", e))
        })
    }

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }
}
