//! Every statement the crate runs, as templates, and how they become SQL.
//!
//! One file here per part of a row's life, named after the module that runs its
//! statements (`migrations.rs` for `store.rs`: migrations and retention; `outbox.rs`:
//! insert and reads; `lease.rs`: relay leases; `transitions.rs`: every state change;
//! `checks.rs` for `checker.rs`: check-back leases; `inbox.rs`; `audit.rs`). The text
//! lives apart from the code that runs it so that the store can hold every rendered
//! statement without its modules importing each other in a cycle. Templates are
//! rendered once per store through [`Render`], the one place text is substituted. Templates name tables as `{outbox}`, `{inbox}`, `{migrations}`, `{audit}`,
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
use crate::dialect::Dialect;

mod audit;
mod checks;
mod inbox;
mod lease;
mod migrations;
mod outbox;
pub(crate) mod transitions;

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
    pub store: migrations::Statements,
    pub outbox: outbox::Statements,
    pub lease: lease::Statements,
    pub transitions: transitions::Statements,
    pub checks: checks::Statements,
    pub inbox: inbox::Statements,
    pub audit: audit::Statements,
}

impl Sql {
    /// Renders every template for `dialect`. `tables` must have been validated.
    pub(crate) fn render(dialect: Dialect, tables: &TableNames) -> Sql {
        let r = Render { dialect, tables };
        Sql {
            store: migrations::Statements::render(&r),
            outbox: outbox::Statements::render(&r),
            lease: lease::Statements::render(&r),
            transitions: transitions::Statements::render(&r),
            checks: checks::Statements::render(&r),
            inbox: inbox::Statements::render(&r),
            audit: audit::Statements::render(&r),
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
}
