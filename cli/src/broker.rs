//! A broker from a URL: the scheme picks the adapter.

use std::sync::Arc;

use surety_core::{Broker, Error, ErrorKind};

/// The adapters a URL can name, for messages.
pub(crate) const SCHEMES: &str = "memory:, amqp://, amqps://, kafka:// or rocketmq://";

/// Connects to the broker behind `url` (`amqp://`/`amqps://` RabbitMQ, `kafka://`,
/// `rocketmq://`, `memory:` an empty in-process broker). Errors never hold the URL.
pub(crate) async fn connect(url: &str) -> surety_core::Result<(&'static str, Arc<dyn Broker>)> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
    match scheme {
        "memory" => Ok(("memory", Arc::new(surety_memory::MemoryBroker::new()))),
        "amqp" | "amqps" => {
            let config = surety_rabbitmq::RabbitConfig::from_url(url)?;
            let broker = surety_rabbitmq::RabbitBroker::connect(config).await?;
            Ok(("rabbitmq", Arc::new(broker)))
        }
        "kafka" => {
            let config = surety_kafka::KafkaConfig::from_url(url)?;
            let broker = surety_kafka::KafkaBroker::connect(config).await?;
            Ok(("kafka", Arc::new(broker)))
        }
        "rocketmq" => {
            let config = surety_rocketmq::RocketMqConfig::from_url(url)?;
            let broker = surety_rocketmq::RocketMqBroker::connect(config).await?;
            Ok(("rocketmq", Arc::new(broker)))
        }
        _ => Err(Error::new(
            ErrorKind::Configuration,
            format!("expected a {SCHEMES} broker URL"),
        )),
    }
}
