//! order -> cart: the canonical Surety example, on the embedded default (SQLite + the
//! in-memory broker); `--postgres` uses PostgreSQL (SURETY_POSTGRES_URL) and
//! `--broker <url>` a real broker (`amqp://…`, `kafka://…`, `rocketmq://…`, see
//! `surety::connect`).
//!
//! 1. The order service commits an order and its outbox message in one transaction, then
//!    "crashes" before publishing. A relay started afterwards publishes the message.
//! 2. The cart service consumes it through the inbox and clears the customer's cart.
//! 3. The broker delivers the message a second time: the inbox absorbs the duplicate.
//!
//! The services are written once for both databases: `Shop` is generic over the store's
//! database, as sqlx code is, and `main` picks `Postgres` or `Sqlite`.
//!
//! Run: `cargo run --example order_cart [-- --postgres] [--broker kafka://127.0.0.1:9092]`

use std::sync::Arc;
use std::time::Duration;

use surety::sql::sqlx::{self, AssertSqlSafe, Postgres, Sqlite};
use surety::sql::{
    Backend, Inbox, InboxOutcome, Relay, RelayConfig, SqlStore, StoreConfig, TableNames,
};
use surety::{Delivery, Error, ErrorKind, Message, Subscription, Topology};

/// The destination and consumer group of the example (on a real broker they persist
/// between runs, hence names unlikely to clash with an application's).
const ORDERS: &str = "surety-demo-orders";
const CART: &str = "surety-demo-cart";

/// Long enough for a consumer group to join on a real broker.
const WAIT: Duration = Duration::from_secs(60);

type Fail = Box<dyn std::error::Error + Send + Sync>;

fn db(e: sqlx::Error) -> Error {
    Error::new(ErrorKind::Storage, "example query failed").with_source(e)
}

#[tokio::main]
async fn main() -> Result<(), Fail> {
    let args: Vec<String> = std::env::args().collect();
    let postgres = args.iter().any(|a| a == "--postgres");
    let broker_url = args
        .iter()
        .position(|a| a == "--broker")
        .and_then(|i| args.get(i + 1))
        .map_or("memory:", String::as_str);
    let config = StoreConfig::default().tables(TableNames::prefixed("demo"));
    let ok = if postgres {
        let url = std::env::var("SURETY_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://surety:surety@127.0.0.1:5432/surety".into());
        let shop = Shop::<Postgres>::open(&url, config).await?;
        println!("database: PostgreSQL");
        shop.run(broker_url).await?
    } else {
        let path =
            std::env::temp_dir().join(format!("surety-order-cart-{}.db", std::process::id()));
        let url = format!("sqlite://{}", path.display());
        let shop = Shop::<Sqlite>::open(&url, config).await?;
        println!("database: SQLite");
        let ok = shop.run(broker_url).await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        ok?
    };
    if ok {
        println!("ok: published once after the crash, cart cleared once despite two deliveries");
        Ok(())
    } else {
        Err("unexpected outcome".into())
    }
}

/// The order and cart services on one store.
struct Shop<DB: Backend> {
    store: SqlStore<DB>,
}

/// The example's own SQL is sqlx code generic over the database: the `where` clause says
/// what sqlx needs from it (both PostgreSQL and SQLite have it), once for every method.
impl<DB: Backend> Shop<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    /// The store, migrated, and the business tables, fresh.
    async fn open(url: &str, config: StoreConfig) -> Result<Self, Error> {
        let store = SqlStore::connect(url, config).await?;
        store.migrate().await?;
        let shop = Shop { store };
        shop.exec("DROP TABLE IF EXISTS demo_orders").await?;
        shop.exec("DROP TABLE IF EXISTS demo_cart_items").await?;
        shop.exec("CREATE TABLE demo_orders (id BIGINT PRIMARY KEY, customer TEXT NOT NULL)")
            .await?;
        shop.exec("CREATE TABLE demo_cart_items (customer TEXT NOT NULL, item TEXT NOT NULL)")
            .await?;
        shop.exec("INSERT INTO demo_cart_items VALUES ('ada', 'tea'), ('ada', 'cups')")
            .await?;
        shop.exec("DELETE FROM demo_outbox").await?;
        shop.exec("DELETE FROM demo_inbox").await?;
        Ok(shop)
    }

    /// Runs one statement of the example's own.
    async fn exec(&self, sql: &str) -> Result<(), Error> {
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(self.store.pool())
            .await
            .map(|_| ())
            .map_err(db)
    }

    /// The order service: the order row and its message commit together.
    async fn place_order(&self, order_id: i64, customer: &str) -> Result<Message, Error> {
        let message = Message::json(ORDERS, &(order_id, customer))?.with_key(customer);
        let mut tx = self.store.pool().begin().await.map_err(db)?;
        sqlx::query("INSERT INTO demo_orders (id, customer) VALUES ($1, $2)")
            .bind(order_id)
            .bind(customer.to_owned())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        self.store.outbox().enqueue(&mut tx, &message).await?;
        tx.commit().await.map_err(db)?;
        Ok(message)
    }

    /// The cart service's effect, in the inbox's transaction: the items it removed.
    async fn clear_cart(delivery: &Delivery, tx: &mut DB::Connection) -> Result<u64, Error> {
        let (_, customer): (i64, String) = delivery.message.decode_json()?;
        let removed = sqlx::query("DELETE FROM demo_cart_items WHERE customer = $1 RETURNING item")
            .bind(customer)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        Ok(removed.len() as u64)
    }

    /// The story; whether it came out as it should.
    async fn run(self, broker_url: &str) -> Result<bool, Fail> {
        // The URL's user and password (if any) are never printed: only its scheme.
        let broker = surety::connect(broker_url).await?;
        println!("broker: {}", broker.name());
        broker.declare(&Topology::new(ORDERS).group(CART)).await?;

        // 1. Commit, then crash before publishing: the message waits in the outbox.
        let message = self.place_order(42, "ada").await?;
        println!(
            "order 42 committed with message {}; the process dies before publishing",
            message.id()
        );

        // 2. The cart service: the inbox decorates its effect into the subscription's
        //    handler (effect and inbox key in one transaction, duplicates skipped).
        let (seen, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
        let this_run = message.id().clone();
        let earlier = this_run.clone();
        let cart = Inbox::handler(&self.store, "cart", move |delivery: &Delivery, tx| {
            // A real broker may still hold messages of an earlier run: they change nothing.
            let earlier_run = delivery.message.id() != &earlier;
            Box::pin(async move {
                if earlier_run {
                    return Ok(0);
                }
                Self::clear_cart(delivery, tx).await
            })
        })?
        .on_outcome(move |delivery, outcome: &InboxOutcome<u64>| {
            if delivery.message.id() == &this_run {
                let _ = seen.send(outcome.clone());
            }
        });
        let consumer = broker
            .subscriber()
            .await?
            .subscribe(Subscription::new(ORDERS, CART), Arc::new(cart))
            .await?;

        // After the restart, the relay finds the committed message and publishes it.
        let relay = Relay::new(
            self.store.clone(),
            broker.publisher().await?,
            RelayConfig::default(),
        );
        let stats = relay.drain().await?;
        println!("relay after restart: published {} message(s)", stats.sent);
        let first = tokio::time::timeout(WAIT, outcomes.recv()).await?;
        println!("cart service: {first:?} (cart items removed)");

        // 3. The broker delivers it again: the inbox skips the effect.
        broker.publisher().await?.publish(&message).await?;
        let second = tokio::time::timeout(WAIT, outcomes.recv()).await?;
        println!("cart service, second delivery: {second:?}");
        consumer.shutdown().await;
        self.store.close().await;

        Ok(matches!(first, Some(InboxOutcome::Applied(2)))
            && matches!(second, Some(InboxOutcome::Duplicate)))
    }
}
