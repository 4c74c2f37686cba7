//! The inbox's dedup record (`inbox.rs`).

use sqlx::SqlStr;

use super::Render;

const INBOX_INSERT: &str = "INSERT INTO {inbox} (consumer_name, message_id, processed_at)
    VALUES ($1, $2, {now})
    ON CONFLICT (consumer_name, message_id) DO NOTHING";

/// The inbox's statements.
#[derive(Clone, Debug)]
pub(crate) struct Statements {
    pub(crate) insert: SqlStr,
}

impl Statements {
    pub(crate) fn render(r: &Render<'_>) -> Self {
        Statements {
            insert: r.sql(INBOX_INSERT),
        }
    }
}
