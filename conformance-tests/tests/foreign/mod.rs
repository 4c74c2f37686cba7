//! The producers that are not Surety, one per broker: the raw client each adapter wraps,
//! configured from the same environment as the adapter under test.

mod kafka;
mod rabbitmq;
mod rocketmq;

pub use kafka::KafkaForeign;
pub use rabbitmq::RabbitForeign;
pub use rocketmq::RocketForeign;
