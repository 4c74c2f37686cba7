//! sqlx errors as Surety errors: kind `Unavailable` (database unreachable) or `Storage`,
//! with a retry verdict.

use surety_core::{Error, ErrorKind};

pub(crate) const ADAPTER: &str = "sql";

/// Maps a database error. Connection loss (kind `Unavailable`), timeouts, lock contention and read-only
/// databases are retryable; constraint violations and bad configuration are not.
pub(crate) fn storage(operation: &'static str, e: sqlx::Error) -> Error {
    let retryable = match &e {
        sqlx::Error::Configuration(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::Decode(_) => false,
        sqlx::Error::Database(db) => !matches!(
            db.kind(),
            sqlx::error::ErrorKind::UniqueViolation
                | sqlx::error::ErrorKind::ForeignKeyViolation
                | sqlx::error::ErrorKind::NotNullViolation
                | sqlx::error::ErrorKind::CheckViolation
        ),
        _ => true,
    };
    // The database cannot be reached: the caller sees `Unavailable`, as for a broker.
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => ErrorKind::Unavailable,
        _ => ErrorKind::Storage,
    };
    Error::new(kind, format!("{operation} failed"))
        .with_retryable(retryable)
        .with_context("adapter", ADAPTER)
        .with_context("operation", operation)
        .with_source(e)
}

/// Whether `e` is a unique-key violation.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// A URL the store cannot use: `what` says what was expected. The URL may hold a password,
/// so it is never echoed.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) fn bad_url(what: &str) -> Error {
    Error::new(ErrorKind::Configuration, what.to_owned()).with_context("adapter", ADAPTER)
}

/// A stored row that does not decode (written by something else, or corrupted).
pub(crate) fn corrupt(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Storage, what)
        .with_retryable(false)
        .with_context("adapter", ADAPTER)
}
