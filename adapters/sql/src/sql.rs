//! How statement templates become SQL, and the dialects.
//!
//! Each module keeps the statements of its part of a row's life as templates (`store.rs`:
//! migrations and retention; `outbox.rs`: insert and reads; `lease.rs`: relay leases;
//! `transitions.rs`: every state change; `checker.rs`: check-back leases; `inbox.rs`;
//! `audit.rs`) and renders them once per store through [`Render`], the one place text is
//! substituted. Templates name tables as `{outbox}`, `{inbox}`, `{migrations}`, `{audit}`,
//! the outbox's column list as `{columns}`, and the dialect differences as `{now}` (the
//! database clock in milliseconds since the Unix epoch), `{skip_locked}` (`FOR UPDATE SKIP
//! LOCKED` on PostgreSQL, nothing on SQLite, whose single writer serialises claims) and
//! `{ids_in_p1}` / `{texts_in_p1}` (the elements of a JSON array bound as `$1`, so a whole
//! batch is one statement with one parameter). Only validated table names and these fixed
//! fragments are substituted; every value is a bound parameter (`$1`, `$2`, ..., which
//! both PostgreSQL and SQLite accept).

use std::sync::Arc;

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

use crate::config::TableNames;

/// The database behind a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// PostgreSQL: many relays, row leases with `FOR UPDATE SKIP LOCKED`.
    Postgres,
    /// SQLite: one writer at a time, so one relay per database file.
    Sqlite,
}

impl Dialect {
    /// `postgres` or `sqlite`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::Sqlite => "sqlite",
        }
    }

    /// The database a URL names by its scheme (`postgres://` or `postgresql://`,
    /// `sqlite:`), for tools that learn the database at run time; `None` for any other.
    /// Whether that database's feature is compiled in is the caller's choice.
    pub fn of_url(url: &str) -> Option<Dialect> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Dialect::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Dialect::Sqlite)
        } else {
            None
        }
    }

    fn now(self) -> &'static str {
        match self {
            Dialect::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Postgres => "FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        }
    }

    /// The integers of the JSON array bound as `$1`, as a subquery.
    fn ids_in_p1(self) -> &'static str {
        match self {
            Dialect::Postgres => {
                "(SELECT CAST(value AS BIGINT) FROM jsonb_array_elements_text(CAST($1 AS JSONB)))"
            }
            Dialect::Sqlite => "(SELECT value FROM json_each($1))",
        }
    }

    /// The strings of the JSON array bound as `$1`, as a subquery.
    fn texts_in_p1(self) -> &'static str {
        match self {
            Dialect::Postgres => "(SELECT jsonb_array_elements_text(CAST($1 AS JSONB)))",
            Dialect::Sqlite => "(SELECT value FROM json_each($1))",
        }
    }

    fn id_column(self) -> &'static str {
        match self {
            Dialect::Postgres => "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            Dialect::Sqlite => "id INTEGER PRIMARY KEY AUTOINCREMENT",
        }
    }

    fn blob(self) -> &'static str {
        match self {
            Dialect::Postgres => "BYTEA",
            Dialect::Sqlite => "BLOB",
        }
    }

    /// The statement that opens a write transaction: SQLite takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two writers never deadlock upgrading a read lock.
    pub(crate) fn begin_write(self) -> &'static str {
        match self {
            Dialect::Postgres => "BEGIN",
            Dialect::Sqlite => "BEGIN IMMEDIATE",
        }
    }
}

/// Renders templates for one dialect and one set of validated table names.
pub(crate) struct Render<'a> {
    dialect: Dialect,
    tables: &'a TableNames,
}

impl Render<'_> {
    /// The statement of `template`, with every placeholder substituted.
    pub(crate) fn sql(&self, template: &str) -> SqlStr {
        let (d, t) = (self.dialect, self.tables);
        // Only validated identifiers and the fixed fragments above are substituted.
        let text = template
            .replace("{columns}", crate::entry::COLUMNS)
            .replace("{outbox}", &t.outbox)
            .replace("{inbox}", &t.inbox)
            .replace("{migrations}", &t.migrations)
            .replace("{audit}", &t.audit)
            .replace("{now}", d.now())
            .replace("{skip_locked}", d.skip_locked())
            .replace("{ids_in_p1}", d.ids_in_p1())
            .replace("{texts_in_p1}", d.texts_in_p1())
            .replace("{id_column}", d.id_column())
            .replace("{blob}", d.blob());
        AssertSqlSafe(Arc::<str>::from(text)).into_sql_str()
    }

    pub(crate) fn dialect(&self) -> Dialect {
        self.dialect
    }
}

/// The rendered statements of one store, grouped by the module that runs them.
#[derive(Clone, Debug)]
pub(crate) struct Sql {
    pub store: crate::store::Statements,
    pub outbox: crate::outbox::Statements,
    pub lease: crate::lease::Statements,
    pub transitions: crate::transitions::Statements,
    pub checks: crate::checker::Statements,
    pub inbox: crate::inbox::Statements,
    pub audit: crate::audit::Statements,
}

impl Sql {
    /// Renders every template for `dialect`. `tables` must have been validated.
    pub(crate) fn render(dialect: Dialect, tables: &TableNames) -> Sql {
        let r = Render { dialect, tables };
        Sql {
            store: crate::store::Statements::render(&r),
            outbox: crate::outbox::Statements::render(&r),
            lease: crate::lease::Statements::render(&r),
            transitions: crate::transitions::Statements::render(&r),
            checks: crate::checker::Statements::render(&r),
            inbox: crate::inbox::Statements::render(&r),
            audit: crate::audit::Statements::render(&r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_leaves_no_placeholder() {
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            let sql = Sql::render(dialect, &TableNames::prefixed("app"));
            let text = format!("{sql:?}");
            assert!(!text.contains("{columns}"), "{text}");
            for name in [
                "{outbox}",
                "{inbox}",
                "{migrations}",
                "{audit}",
                "{now}",
                "{skip_locked}",
                "{ids_in_p1}",
                "{texts_in_p1}",
                "{id_column}",
                "{blob}",
            ] {
                assert!(!text.contains(name), "{name} left in {text}");
            }
            for (_, _, m) in sql.store.migrations.iter() {
                assert!(!m.as_str().contains('{'), "{}", m.as_str());
                assert!(m.as_str().contains("app_"));
            }
        }
        let pg = Sql::render(Dialect::Postgres, &TableNames::default());
        assert!(
            pg.lease
                .claim_due
                .as_str()
                .contains("FOR UPDATE SKIP LOCKED")
        );
        let lite = Sql::render(Dialect::Sqlite, &TableNames::default());
        assert!(!lite.lease.claim_due.as_str().contains("FOR UPDATE"));
    }

    #[test]
    fn urls_name_their_database() {
        assert_eq!(
            Dialect::of_url("postgres://u@h/db"),
            Some(Dialect::Postgres)
        );
        assert_eq!(
            Dialect::of_url("postgresql://h/db"),
            Some(Dialect::Postgres)
        );
        assert_eq!(Dialect::of_url("sqlite://x.db"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of_url("sqlite::memory:"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of_url("mysql://h/db"), None);
    }
}
