//! PostgreSQL (feature `postgres`): several relays share the rows through
//! `FOR UPDATE SKIP LOCKED` leases.

use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::Postgres;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgQueryResult};
use surety_core::Result;

use super::Backend;
use super::private::Native;
use crate::config::StoreConfig;
use crate::dialect::Dialect;
use crate::error::{bad_url, storage};

impl Backend for Postgres {
    const DIALECT: Dialect = Dialect::Postgres;
}

impl Native for Postgres {
    fn open<'a>(url: &'a str, config: &'a StoreConfig) -> BoxFuture<'a, Result<sqlx::PgPool>> {
        Box::pin(async move {
            if Dialect::of_url(url) != Some(Dialect::Postgres) {
                return Err(bad_url("expected a postgres:// or postgresql:// URL"));
            }
            let options = PgConnectOptions::from_str(url)
                .map_err(|_| bad_url("the PostgreSQL URL does not parse"))?;
            PgPoolOptions::new()
                .max_connections(config.max_connections.max(1))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(|e| storage("connect to PostgreSQL", e))
        })
    }

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }
}
