//! Table names and store settings.

use std::time::Duration;

use surety_core::{Error, ErrorKind, Result};

/// Longest table name accepted, so that derived index names stay within PostgreSQL's
/// 63-byte identifier limit.
pub const MAX_TABLE_NAME_LEN: usize = 48;

/// The names of the store's tables. Each is validated before it reaches any SQL: 1 to
/// [`MAX_TABLE_NAME_LEN`] bytes of `[a-z0-9_]`, starting with a letter or `_`. Choose the
/// PostgreSQL schema with the connection's `search_path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableNames {
    /// The outbox: application messages, prepared (half) messages, receipts.
    pub outbox: String,
    /// The inbox: `(consumer_name, message_id)` keys of processed deliveries.
    pub inbox: String,
    /// The applied migrations.
    pub migrations: String,
    /// The audit of dead-letter re-drives (`surety dlq redrive`), see [`crate::DlqAudit`].
    pub audit: String,
}

impl Default for TableNames {
    /// `surety_outbox`, `surety_inbox`, `surety_migrations`, `surety_dlq_audit`.
    fn default() -> Self {
        TableNames::prefixed("surety")
    }
}

impl TableNames {
    /// `<prefix>_outbox`, `<prefix>_inbox`, `<prefix>_migrations`, `<prefix>_dlq_audit`.
    pub fn prefixed(prefix: &str) -> Self {
        TableNames {
            outbox: format!("{prefix}_outbox"),
            inbox: format!("{prefix}_inbox"),
            migrations: format!("{prefix}_migrations"),
            audit: format!("{prefix}_dlq_audit"),
        }
    }

    /// Checks every name; see [`validate_table_name`].
    pub fn validate(&self) -> Result<()> {
        validate_table_name(&self.outbox)?;
        validate_table_name(&self.inbox)?;
        validate_table_name(&self.migrations)?;
        validate_table_name(&self.audit)?;
        let names = [&self.outbox, &self.inbox, &self.migrations, &self.audit];
        let distinct = names
            .iter()
            .enumerate()
            .all(|(i, a)| names[i + 1..].iter().all(|b| a != b));
        if !distinct {
            return Err(Error::new(
                ErrorKind::Configuration,
                "the outbox, inbox, migrations and audit tables need distinct names",
            ));
        }
        Ok(())
    }
}

/// Checks a table name: 1 to [`MAX_TABLE_NAME_LEN`] bytes of lower-case ASCII letters,
/// digits and `_`, starting with a letter or `_`. Only names that pass are ever put into
/// SQL text; every value is a bound parameter.
pub fn validate_table_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TABLE_NAME_LEN
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Configuration,
            format!(
                "table name {name:?} must be 1 to {MAX_TABLE_NAME_LEN} bytes of [a-z0-9_], starting with a letter or _"
            ),
        )
        .with_context("table", name.chars().take(64).collect::<String>()))
    }
}

/// Settings of a [`crate::SqlStore`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The tables.
    pub tables: TableNames,
    /// Largest message accepted at enqueue (payload, key and headers), in bytes.
    pub max_message_size: usize,
    /// How long sent (and, with receipts, completed or failed) outbox rows are kept before
    /// [`crate::SqlStore::cleanup`] deletes them.
    pub sent_retention: Duration,
    /// How long inbox keys are kept: a duplicate arriving later than this is applied again.
    pub inbox_retention: Duration,
    /// Rows deleted per cleanup statement.
    pub cleanup_batch: usize,
    /// SQLite: how long a writer waits for the database lock.
    pub busy_timeout: Duration,
    /// Connections in the pool [`crate::SqlStore::connect`] opens.
    pub max_connections: u32,
    /// Receipts (off by default): when set, a sent row with no consumer receipt after this
    /// long is published again by the relay (see [`crate::Receipts`]).
    pub receipt_timeout: Option<Duration>,
}

impl Default for StoreConfig {
    /// Default tables, 4 MiB messages, 7 days of retention, batches of
    /// 1000, a 5 s busy timeout, 8 connections, receipts off.
    fn default() -> Self {
        StoreConfig {
            tables: TableNames::default(),
            max_message_size: 4 * 1024 * 1024,
            sent_retention: Duration::from_secs(7 * 24 * 3600),
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_batch: 1000,
            busy_timeout: Duration::from_secs(5),
            max_connections: 8,
            receipt_timeout: None,
        }
    }
}

impl StoreConfig {
    /// Replaces the tables.
    pub fn tables(mut self, tables: TableNames) -> Self {
        self.tables = tables;
        self
    }

    /// Replaces the size limit.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Turns receipts on: sent rows without a receipt after `timeout` are published again.
    pub fn receipts(mut self, timeout: Duration) -> Self {
        self.receipt_timeout = Some(timeout);
        self
    }

    /// Replaces the retention of sent outbox rows and of inbox keys.
    pub fn retention(mut self, sent: Duration, inbox: Duration) -> Self {
        self.sent_retention = sent;
        self.inbox_retention = inbox;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated() {
        assert!(TableNames::default().validate().is_ok());
        assert!(TableNames::prefixed("t_123").validate().is_ok());
        for bad in [
            "",
            "1abc",
            "Outbox",
            "out box",
            "x;drop table y",
            "a\"b",
            "s.t",
            &"a".repeat(49),
        ] {
            let e = validate_table_name(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Configuration, "{bad:?}");
        }
        let same = TableNames {
            outbox: "a".into(),
            inbox: "a".into(),
            migrations: "m".into(),
            audit: "d".into(),
        };
        assert!(same.validate().is_err());
        let audit_clash = TableNames {
            audit: "surety_outbox".into(),
            ..TableNames::default()
        };
        assert!(audit_clash.validate().is_err());
        let bad_audit = TableNames {
            audit: "x; drop table y".into(),
            ..TableNames::default()
        };
        assert!(bad_audit.validate().is_err());
    }
}
