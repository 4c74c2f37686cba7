//! One URL picks the broker: `surety::connect(url)`.

use std::sync::Arc;

use crate::{Broker, Error, ErrorKind, Result};

/// Connects to the broker named by `url` and returns it behind the `Broker` contract,
/// with the capability layer in front ([`crate::CapabilityCheck`]: a call the adapter
/// does not support fails there, with an `Unsupported` error).
///
/// | scheme | adapter | cargo feature |
/// |---|---|---|
/// | `memory:` | in-process broker | `memory` |
/// | `amqp://user:pass@host:port/vhost`, `amqps://...` | RabbitMQ | `rabbitmq` |
/// | `kafka://host:port[,host:port]` | Apache Kafka | `kafka` |
/// | `rocketmq://host:port[;host:port][?access_key=..&secret_key=..]` | Apache RocketMQ (name servers) | `rocketmq` |
///
/// A scheme whose adapter is not compiled in is a configuration error that names the
/// feature to enable. The URL is never echoed whole in errors, since it may carry
/// credentials.
pub async fn connect(url: &str) -> Result<Arc<dyn Broker>> {
    adapter(url).await.map(crate::CapabilityCheck::wrap)
}

/// The adapter behind `url`, without the capability layer.
async fn adapter(url: &str) -> Result<Arc<dyn Broker>> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
    match scheme {
        #[cfg(feature = "memory")]
        "memory" => Ok(Arc::new(surety_memory::MemoryBroker::new())),
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => Ok(Arc::new(
            surety_rabbitmq::RabbitBroker::connect(surety_rabbitmq::RabbitConfig::from_url(url)?)
                .await?,
        )),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(
            surety_kafka::KafkaBroker::connect(surety_kafka::KafkaConfig::from_url(url)?).await?,
        )),
        #[cfg(feature = "rocketmq")]
        "rocketmq" => Ok(Arc::new(
            surety_rocketmq::RocketMqBroker::connect(surety_rocketmq::RocketMqConfig::from_url(
                url,
            )?)
            .await?,
        )),
        // Reached for the schemes whose feature is off in this build.
        #[allow(unreachable_patterns)]
        known @ ("memory" | "amqp" | "amqps" | "kafka" | "rocketmq") => Err(Error::new(
            ErrorKind::Configuration,
            format!(
                "the {known}: scheme needs the {} feature of surety",
                feature_for(known)
            ),
        )),
        _ => Err(Error::new(
            ErrorKind::Configuration,
            "unknown broker URL scheme; expected memory:, amqp:, amqps:, kafka: or rocketmq:",
        )
        .with_context("scheme", scheme)),
    }
}

fn feature_for(scheme: &str) -> &'static str {
    match scheme {
        "amqp" | "amqps" => "rabbitmq",
        "kafka" => "kafka",
        "rocketmq" => "rocketmq",
        _ => "memory",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_schemes_are_configuration_errors_without_the_url() {
        let e = connect("nats://user:secret@host")
            .await
            .err()
            .expect("an error");
        assert_eq!(e.kind(), ErrorKind::Configuration);
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_url_gives_the_memory_broker() {
        let broker = connect("memory:").await.unwrap();
        assert_eq!(broker.name(), "memory");
    }
}
