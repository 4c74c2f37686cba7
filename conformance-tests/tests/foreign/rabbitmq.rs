//! RabbitMQ's foreign producer: lapin on its own connection, publishing with confirms
//! to the router exchange with the destination as routing key, as any AMQP client
//! publishing to a Surety destination does.

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use surety_conformance::{ForeignMessage, ForeignProducer};
use surety_rabbitmq::RabbitConfig;
use tokio::sync::Mutex;

pub struct RabbitForeign {
    url: String,
    exchange: String,
    /// The connection and its confirming channel, opened again after a broker restart
    /// (the fault runner restarts brokers between scenarios).
    open: Mutex<Option<(Connection, Channel)>>,
}

impl RabbitForeign {
    pub async fn connect(config: &RabbitConfig) -> Result<Self, String> {
        let foreign = RabbitForeign {
            url: config.url.clone(),
            exchange: config.router_exchange.clone(),
            open: Mutex::new(None),
        };
        foreign.channel().await?;
        Ok(foreign)
    }

    async fn channel(&self) -> Result<Channel, String> {
        let mut open = self.open.lock().await;
        if let Some((_, channel)) = open.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(|e| format!("foreign RabbitMQ connection: {e}"))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("foreign RabbitMQ channel: {e}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("foreign RabbitMQ confirms: {e}"))?;
        *open = Some((connection, channel.clone()));
        Ok(channel)
    }
}

#[async_trait]
impl ForeignProducer for RabbitForeign {
    async fn send(&self, destination: &str, message: ForeignMessage) -> Result<(), String> {
        let mut table = FieldTable::default();
        for (name, value) in message.headers {
            let value = match value {
                Some(bytes) => AMQPValue::LongString(LongString::from(bytes)),
                None => AMQPValue::Void,
            };
            table.insert(ShortString::from(name), value);
        }
        let mut properties = BasicProperties::default().with_headers(table);
        if let Some(id) = message.id {
            properties = properties.with_message_id(ShortString::from(id));
        }
        let confirm = self
            .channel()
            .await?
            .basic_publish(
                self.exchange.as_str().into(),
                destination.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.body.unwrap_or_default(),
                properties,
            )
            .await
            .map_err(|e| format!("publish: {e}"))?
            .await
            .map_err(|e| format!("confirm: {e}"))?;
        if !confirm.is_ack() {
            return Err(format!("the broker refused the message: {confirm:?}"));
        }
        if confirm.take_message().is_some() {
            return Err(format!(
                "no queue is bound to {destination}: the message was returned"
            ));
        }
        Ok(())
    }

    /// A header goes in the content header frame, which must fit `frame_max` (128 KiB).
    fn max_header_bytes(&self) -> usize {
        100_000
    }

    fn binary_headers(&self) -> bool {
        true
    }
}
