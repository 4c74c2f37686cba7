//! The databases a store runs on, and the SQL fragments in which they differ (the
//! templates of `sql/` name these fragments; `sql/mod.rs` substitutes them).

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

    pub(crate) fn now(self) -> &'static str {
        match self {
            Dialect::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    pub(crate) fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Postgres => "FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        }
    }

    /// The integers of the JSON array bound as `$1`, as a subquery.
    pub(crate) fn ids_in_p1(self) -> &'static str {
        match self {
            Dialect::Postgres => {
                "(SELECT CAST(value AS BIGINT) FROM jsonb_array_elements_text(CAST($1 AS JSONB)))"
            }
            Dialect::Sqlite => "(SELECT value FROM json_each($1))",
        }
    }

    /// The strings of the JSON array bound as `$1`, as a subquery.
    pub(crate) fn texts_in_p1(self) -> &'static str {
        match self {
            Dialect::Postgres => "(SELECT jsonb_array_elements_text(CAST($1 AS JSONB)))",
            Dialect::Sqlite => "(SELECT value FROM json_each($1))",
        }
    }

    pub(crate) fn id_column(self) -> &'static str {
        match self {
            Dialect::Postgres => "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            Dialect::Sqlite => "id INTEGER PRIMARY KEY AUTOINCREMENT",
        }
    }

    pub(crate) fn blob(self) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

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
