//! The scenarios' tables on PostgreSQL: the effect store behind `surety-sql`'s inbox
//! ([`PgInboxEffects`]), a store on a scenario's tables, and row counts.
//!
//! Table names are built from a fixed word and a random hex number only, so the SQL
//! assembled from them below is safe.

use std::collections::HashMap;

use futures::future::BoxFuture;
use surety_core::{Message, MessageId};
use surety_sql::sqlx::{self, AssertSqlSafe, PgPool, Row};
use surety_sql::{PgStore, StoreConfig, TableNames};

use super::EffectStore;
use crate::runner::postgres_url;

/// Effects as rows of a table of their own, each written in the inbox's transaction on
/// PostgreSQL, so a row per id counts how often the effect was applied.
pub(super) struct PgInboxEffects {
    pub(super) store: PgStore,
    pub(super) prefix: String,
    effects_table: String,
}

impl PgInboxEffects {
    pub(super) async fn create() -> Result<Self, String> {
        let prefix = format!("faults_{:08x}", rand::random::<u32>());
        let store = PgStore::connect(
            &postgres_url(),
            StoreConfig::default().tables(TableNames::prefixed(&prefix)),
        )
        .await
        .map_err(|e| format!("cannot reach PostgreSQL (SURETY_POSTGRES_URL): {e}"))?;
        store.migrate().await.map_err(|e| format!("migrate: {e}"))?;
        let effects_table = format!("{prefix}_effects");
        let pool = store.pool();
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {effects_table} (message_id TEXT NOT NULL, consumer TEXT NOT NULL)"
        )))
        .execute(pool)
        .await
        .map_err(|e| format!("create the effects table: {e}"))?;
        Ok(PgInboxEffects {
            store,
            prefix,
            effects_table,
        })
    }

    pub(super) fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    /// Drops the scenario's tables; failures only leave tables behind.
    pub(super) async fn drop_tables(&self) {
        let pool = self.store.pool();
        let t = &self.store.config().tables;
        let business = format!("{}_business", self.prefix);
        let started = format!("{}_started", self.prefix);
        for table in [
            &self.effects_table,
            &business,
            &started,
            &t.inbox,
            &t.outbox,
            &t.migrations,
        ] {
            let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
                .execute(pool)
                .await;
        }
    }
}

#[async_trait::async_trait]
impl EffectStore for PgInboxEffects {
    async fn apply(&self, consumer: &str, message: &Message) -> Result<bool, String> {
        let insert = format!(
            "INSERT INTO {} (message_id, consumer) VALUES ($1, $2)",
            self.effects_table
        );
        let (id, who) = (message.id().as_str().to_owned(), consumer.to_owned());
        let outcome = self
            .store
            .inbox()
            .process(consumer, message, move |tx| {
                Box::pin(async move {
                    sqlx::query(AssertSqlSafe(insert))
                        .bind(id)
                        .bind(who)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| {
                            surety_core::Error::new(surety_core::ErrorKind::Storage, "effect")
                                .with_source(e)
                        })?;
                    Ok(())
                }) as BoxFuture<'_, surety_core::Result<()>>
            })
            .await
            .map_err(|e| format!("inbox: {e}"))?;
        Ok(!outcome.is_duplicate())
    }

    async fn applied(&self) -> Result<HashMap<MessageId, usize>, String> {
        let pool = self.store.pool();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT message_id, COUNT(*) AS n FROM {} GROUP BY message_id",
            self.effects_table
        )))
        .fetch_all(pool)
        .await
        .map_err(|e| format!("count effects: {e}"))?;
        let mut out = HashMap::new();
        for row in rows {
            let id: String = row.get("message_id");
            let n: i64 = row.get("n");
            let id = MessageId::parse(id).map_err(|e| format!("stored id: {e}"))?;
            out.insert(id, n as usize);
        }
        Ok(out)
    }
}

pub(super) async fn store_for(prefix: &str) -> Result<PgStore, String> {
    PgStore::connect(
        &postgres_url(),
        StoreConfig::default().tables(TableNames::prefixed(prefix)),
    )
    .await
    .map_err(|e| format!("cannot reach PostgreSQL: {e}"))
}

pub(super) async fn count_rows(pool: &PgPool, sql: String) -> Result<i64, String> {
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .map_err(|e| format!("count rows: {e}"))
}
