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
//! Run: `cargo run --example order_cart [-- --postgres] [--broker kafka://127.0.0.1:9092]`

use std::sync::Arc;
use std::time::Duration;

use surety::sql::sqlx::{self, AssertSqlSafe};
use surety::sql::{InboxOutcome, Relay, RelayConfig, SqlStore, StoreConfig, TableNames};
use surety::{Delivery, Error, ErrorKind, Message, Outcome, Subscription, Topology, handler_fn};

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

/// Runs one statement on whichever pool the store has.
async fn exec(store: &SqlStore, sql: &str) -> Result<(), Error> {
    let sql = AssertSqlSafe(sql.to_owned());
    match (store.pg_pool(), store.sqlite_pool()) {
        (Some(p), _) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
        (_, Some(p)) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
        _ => unreachable!("a store has one pool"),
    }
    .map_err(db)
}

/// The order service: the order row and its message commit together.
async fn place_order(store: &SqlStore, order_id: i64, customer: &str) -> Result<Message, Error> {
    let message = Message::json(ORDERS, &(order_id, customer))?.with_key(customer);
    let insert = "INSERT INTO demo_orders (id, customer) VALUES ($1, $2)";
    macro_rules! in_tx {
        ($pool:expr) => {{
            let mut tx = $pool.begin().await.map_err(db)?;
            sqlx::query(insert)
                .bind(order_id)
                .bind(customer)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            store.outbox().enqueue(&mut *tx, &message).await?;
            tx.commit().await.map_err(db)?;
        }};
    }
    match (store.pg_pool(), store.sqlite_pool()) {
        (Some(p), _) => in_tx!(p),
        (_, Some(p)) => in_tx!(p),
        _ => unreachable!(),
    }
    Ok(message)
}

/// The cart service's effect, in the inbox's transaction.
async fn clear_cart(store: &SqlStore, message: &Message) -> Result<InboxOutcome<u64>, Error> {
    let (_, customer): (i64, String) = message.decode_json()?;
    let delete = "DELETE FROM demo_cart_items WHERE customer = $1";
    macro_rules! process {
        ($conn:ty) => {
            store
                .inbox()
                .process("cart", message, move |tx: &mut $conn| {
                    Box::pin(async move {
                        let done = sqlx::query(delete).bind(customer).execute(&mut *tx).await;
                        done.map(|r| r.rows_affected()).map_err(db)
                    })
                })
                .await
        };
    }
    if store.pg_pool().is_some() {
        process!(sqlx::PgConnection)
    } else {
        process!(sqlx::SqliteConnection)
    }
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
    let (url, file) = if postgres {
        let url = std::env::var("SURETY_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://surety:surety@127.0.0.1:5432/surety".into());
        (url, None)
    } else {
        let path =
            std::env::temp_dir().join(format!("surety-order-cart-{}.db", std::process::id()));
        (format!("sqlite://{}", path.display()), Some(path))
    };
    let store = SqlStore::connect(
        &url,
        StoreConfig::default().tables(TableNames::prefixed("demo")),
    )
    .await?;
    store.migrate().await?;
    exec(&store, "DROP TABLE IF EXISTS demo_orders").await?;
    exec(&store, "DROP TABLE IF EXISTS demo_cart_items").await?;
    exec(
        &store,
        "CREATE TABLE demo_orders (id BIGINT PRIMARY KEY, customer TEXT NOT NULL)",
    )
    .await?;
    exec(
        &store,
        "CREATE TABLE demo_cart_items (customer TEXT NOT NULL, item TEXT NOT NULL)",
    )
    .await?;
    exec(
        &store,
        "INSERT INTO demo_cart_items VALUES ('ada', 'tea'), ('ada', 'cups')",
    )
    .await?;
    exec(&store, "DELETE FROM demo_outbox").await?;
    exec(&store, "DELETE FROM demo_inbox").await?;
    println!(
        "database: {}",
        if postgres { "PostgreSQL" } else { "SQLite" }
    );

    // The URL's user and password (if any) are never printed: only its scheme.
    let broker = surety::connect(broker_url).await?;
    println!("broker: {}", broker.name());
    broker.declare(&Topology::new(ORDERS).group(CART)).await?;

    // 1. Commit, then crash before publishing: the message waits in the outbox.
    let message = place_order(&store, 42, "ada").await?;
    println!(
        "order 42 committed with message {}; the process dies before publishing",
        message.id()
    );

    // The cart service.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cart_store = store.clone();
    let this_run = message.id().clone();
    let handler = handler_fn(move |delivery: Delivery| {
        let (store, tx, this_run) = (cart_store.clone(), tx.clone(), this_run.clone());
        async move {
            // A real broker may still hold messages of an earlier run: acknowledge them.
            if delivery.message.id() != &this_run {
                return Ok(Outcome::Ack);
            }
            let outcome = clear_cart(&store, &delivery.message).await?;
            let _ = tx.send(outcome);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Outcome::Ack)
        }
    });
    let consumer = broker
        .subscriber()
        .await?
        .subscribe(Subscription::new(ORDERS, CART), Arc::new(handler))
        .await?;

    // After the restart, the relay finds the committed message and publishes it.
    let relay = Relay::new(
        store.clone(),
        broker.publisher().await?,
        RelayConfig::default(),
    );
    let stats = relay.drain().await?;
    println!("relay after restart: published {} message(s)", stats.sent);
    let first = tokio::time::timeout(WAIT, rx.recv()).await?;
    println!("cart service: {first:?} (cart items removed)");

    // 3. The broker delivers it again: the inbox skips the effect.
    broker.publisher().await?.publish(&message).await?;
    let second = tokio::time::timeout(WAIT, rx.recv()).await?;
    println!("cart service, second delivery: {second:?}");
    consumer.shutdown().await;

    let ok = matches!(first, Some(InboxOutcome::Applied(2)))
        && matches!(second, Some(InboxOutcome::Duplicate));
    store.close().await;
    if let Some(path) = file {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    if ok {
        println!("ok: published once after the crash, cart cleared once despite two deliveries");
        Ok(())
    } else {
        Err("unexpected outcome".into())
    }
}
