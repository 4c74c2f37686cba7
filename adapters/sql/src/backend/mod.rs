//! The databases a store runs on, as types: [`Backend`] is implemented for
//! `sqlx::Postgres` (feature `postgres`) and `sqlx::Sqlite` (feature `sqlite`), so a
//! store, its outbox and its inbox are typed by their database the way a sqlx `Pool` is,
//! and a connection of the wrong database does not compile.
//!
//! Why two private traits: every statement of the crate is written once, generically, in
//! the module of the row's life it belongs to. Generic sqlx code needs bounds that a trait
//! cannot make implied (`&mut DB::Connection: Executor`, `i64: Encode<DB>`, ...), and
//! spelling them on the public API would make every generic caller repeat them. So
//! [`private::Driver`] holds the few primitives the statements need (run, fetch, read a
//! column), implemented once for every database that satisfies sqlx's bounds; a generic
//! caller only writes `DB: Backend`. What genuinely differs per database (opening a pool,
//! counting affected rows) is [`private::Native`], implemented in `postgres.rs` and
//! `sqlite.rs`, each compiled only with its feature.

use futures::future::BoxFuture;
use sqlx::{Database, Pool, SqlStr};
use surety_core::Result;

use crate::config::StoreConfig;
use crate::dialect::Dialect;

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

pub(crate) use private::{Arg, On};

/// A database a [`crate::SqlStore`] runs on: `sqlx::Postgres` (feature `postgres`) or
/// `sqlx::Sqlite` (feature `sqlite`). Sealed.
///
/// Code that works on either database is generic over it:
///
/// ```no_run
/// use surety_sql::{Backend, SqlStore};
/// async fn pending<DB: Backend>(store: &SqlStore<DB>) -> surety_core::Result<u64> {
///     let counts = store.counts().await?;
///     Ok(counts.get(&surety_sql::EntryState::Pending).copied().unwrap_or(0))
/// }
/// ```
pub trait Backend: private::Driver {
    /// Which database this is.
    const DIALECT: Dialect;
}

pub(crate) mod private {
    use super::*;

    /// What differs per database beyond sqlx's generic API.
    pub trait Native: Database {
        /// Opens a pool from a URL of this database, with the store's settings. A URL of
        /// another database is a `Configuration` error; the URL is never echoed.
        fn open<'a>(url: &'a str, config: &'a StoreConfig) -> BoxFuture<'a, Result<Pool<Self>>>;

        /// Rows a statement changed.
        fn rows_affected(result: &Self::QueryResult) -> u64;
    }

    /// A value bound to a statement parameter.
    #[derive(Clone, Copy, Debug)]
    pub enum Arg<'a> {
        /// `BIGINT` / `INTEGER`.
        Int(i64),
        /// `TEXT`.
        Text(&'a str),
        /// `TEXT`, or `NULL`.
        OptText(Option<&'a str>),
        /// `BYTEA` / `BLOB`.
        Bytes(&'a [u8]),
    }

    /// Where a statement runs: on the store's pool (a transaction of its own), or on an
    /// open connection (usually the application's transaction, `&mut *tx`).
    pub enum On<'a, DB: Database> {
        /// The store's pool.
        Pool(&'a Pool<DB>),
        /// An open connection.
        Conn(&'a mut DB::Connection),
    }

    /// The primitives every statement of the crate is built from.
    pub trait Driver: Native {
        /// Runs a statement; returns the rows it changed.
        fn execute<'a>(
            on: On<'a, Self>,
            sql: &SqlStr,
            args: &[Arg<'_>],
        ) -> BoxFuture<'a, std::result::Result<u64, sqlx::Error>>;

        /// Runs a statement and returns its rows.
        fn fetch<'a>(
            on: On<'a, Self>,
            sql: &SqlStr,
            args: &[Arg<'_>],
        ) -> BoxFuture<'a, std::result::Result<Vec<Self::Row>, sqlx::Error>>;

        /// Runs a script of statements without parameters (migrations).
        fn script<'a>(
            on: On<'a, Self>,
            sql: &SqlStr,
        ) -> BoxFuture<'a, std::result::Result<(), sqlx::Error>>;

        /// An integer column (`None` for `NULL`).
        fn int(row: &Self::Row, column: usize) -> std::result::Result<Option<i64>, sqlx::Error>;

        /// A text column (`None` for `NULL`).
        fn text(row: &Self::Row, column: usize)
        -> std::result::Result<Option<String>, sqlx::Error>;

        /// A binary column (`None` for `NULL`).
        fn bytes(
            row: &Self::Row,
            column: usize,
        ) -> std::result::Result<Option<Vec<u8>>, sqlx::Error>;
    }

    type Query<DB> = sqlx::query::Query<'static, DB, <DB as Database>::Arguments>;

    /// Binds `args` in order. Values are encoded here, so the query owns them.
    fn bind<DB>(sql: &SqlStr, args: &[Arg<'_>]) -> Query<DB>
    where
        DB: Database,
        for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        let mut query = sqlx::query(sql.clone());
        for arg in args {
            query = match *arg {
                Arg::Int(v) => query.bind(v),
                Arg::Text(v) => query.bind(v),
                Arg::OptText(v) => query.bind(v),
                Arg::Bytes(v) => query.bind(v),
            };
        }
        query
    }

    /// Written once for every database whose sqlx driver has what the statements need:
    /// the bounds are proven here, for each concrete database, and not by callers.
    impl<DB> Driver for DB
    where
        DB: Native,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        DB::Arguments: sqlx::IntoArguments<DB>,
        for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
        for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'r> String: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
        for<'r> Vec<u8>: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
        usize: sqlx::ColumnIndex<DB::Row>,
    {
        fn execute<'a>(
            on: On<'a, Self>,
            sql: &SqlStr,
            args: &[Arg<'_>],
        ) -> BoxFuture<'a, std::result::Result<u64, sqlx::Error>> {
            let query = bind::<DB>(sql, args);
            Box::pin(async move {
                let done = match on {
                    On::Pool(pool) => query.execute(pool).await?,
                    On::Conn(conn) => query.execute(conn).await?,
                };
                Ok(DB::rows_affected(&done))
            })
        }

        fn fetch<'a>(
            on: On<'a, Self>,
            sql: &SqlStr,
            args: &[Arg<'_>],
        ) -> BoxFuture<'a, std::result::Result<Vec<DB::Row>, sqlx::Error>> {
            let query = bind::<DB>(sql, args);
            Box::pin(async move {
                match on {
                    On::Pool(pool) => query.fetch_all(pool).await,
                    On::Conn(conn) => query.fetch_all(conn).await,
                }
            })
        }

        fn script<'a>(
            on: On<'a, Self>,
            sql: &SqlStr,
        ) -> BoxFuture<'a, std::result::Result<(), sqlx::Error>> {
            let script = sqlx::raw_sql(sql.clone());
            Box::pin(async move {
                match on {
                    On::Pool(pool) => script.execute(pool).await.map(|_| ()),
                    On::Conn(conn) => script.execute(conn).await.map(|_| ()),
                }
            })
        }

        fn int(row: &DB::Row, column: usize) -> std::result::Result<Option<i64>, sqlx::Error> {
            sqlx::Row::try_get(row, column)
        }

        fn text(row: &DB::Row, column: usize) -> std::result::Result<Option<String>, sqlx::Error> {
            sqlx::Row::try_get(row, column)
        }

        fn bytes(
            row: &DB::Row,
            column: usize,
        ) -> std::result::Result<Option<Vec<u8>>, sqlx::Error> {
            sqlx::Row::try_get(row, column)
        }
    }
}
