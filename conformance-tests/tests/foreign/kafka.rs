//! Kafka's foreign producer: an rdkafka `FutureProducer` with default settings, writing
//! records straight to the destination topic.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use surety_conformance::{ForeignMessage, ForeignProducer};
use surety_kafka::KafkaConfig;

pub struct KafkaForeign {
    producer: FutureProducer,
}

impl KafkaForeign {
    pub fn connect(config: &KafkaConfig) -> Result<Self, String> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap_servers)
            .create()
            .map_err(|e| format!("foreign Kafka producer: {e}"))?;
        Ok(KafkaForeign { producer })
    }
}

#[async_trait]
impl ForeignProducer for KafkaForeign {
    async fn send(&self, destination: &str, message: ForeignMessage) -> Result<(), String> {
        let mut headers = OwnedHeaders::new();
        if let Some(id) = &message.id {
            headers = headers.insert(Header {
                key: "surety-message-id",
                value: Some(id.as_bytes()),
            });
        }
        for (name, value) in &message.headers {
            headers = headers.insert(Header {
                key: name.as_str(),
                value: value.as_deref(),
            });
        }
        let mut record = FutureRecord::<(), [u8]>::to(destination).headers(headers);
        if let Some(body) = &message.body {
            record = record.payload(body.as_slice());
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|(e, _)| format!("send: {e}"))
    }

    /// Well within the broker's default record limit (1 MiB).
    fn max_header_bytes(&self) -> usize {
        500_000
    }

    fn binary_headers(&self) -> bool {
        true
    }
}
