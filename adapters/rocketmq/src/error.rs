//! The rocketmq client's errors and send statuses mapped to Surety's error kinds.

use rocketmq_client_rust::{ClientError, SendStatus};
use surety_core::{Error, ErrorKind};

use crate::ADAPTER;

/// Broker response codes (Java `ResponseCode`) that decide the kind.
mod code {
    pub const SYSTEM_ERROR: i32 = 1;
    pub const SYSTEM_BUSY: i32 = 2;
    pub const MESSAGE_ILLEGAL: i32 = 13;
    pub const NO_PERMISSION: i32 = 16;
    pub const TOPIC_NOT_EXIST: i32 = 17;
    pub const SERVICE_NOT_AVAILABLE: i32 = 14;
    pub const FLUSH_DISK_TIMEOUT: i32 = 10;
    pub const SLAVE_NOT_AVAILABLE: i32 = 11;
    pub const FLUSH_SLAVE_TIMEOUT: i32 = 12;
}

/// Maps an error of an operation whose request may have reached the broker (a send):
/// anything that is not a clear answer from the broker leaves the outcome unknown.
pub(crate) fn send_error(e: &ClientError, destination: &str) -> Error {
    let text = e.to_string();
    let kind = match e.broker_response_code() {
        Some(code::TOPIC_NOT_EXIST) => ErrorKind::Unroutable,
        Some(code::MESSAGE_ILLEGAL) => ErrorKind::InvalidMessage,
        Some(code::NO_PERMISSION) => ErrorKind::Rejected,
        Some(code::FLUSH_DISK_TIMEOUT | code::SLAVE_NOT_AVAILABLE | code::FLUSH_SLAVE_TIMEOUT) => {
            ErrorKind::NotDurable
        }
        Some(code @ (code::SYSTEM_BUSY | code::SYSTEM_ERROR | code::SERVICE_NOT_AVAILABLE)) => {
            return Error::new(
                ErrorKind::Rejected,
                format!("the broker refused the message ({}): {text}", refusal(code)),
            )
            .with_retryable(true)
            .with_context("broker_code", code.to_string())
            .with_context("adapter", ADAPTER)
            .with_context("destination", destination);
        }
        Some(_) => ErrorKind::Rejected,
        None if text.contains("No route info") => ErrorKind::Unroutable,
        None if text.contains("connect") || text.contains("Connect") => ErrorKind::Unavailable,
        None => ErrorKind::OutcomeUnknown,
    };
    Error::new(kind, format!("send failed: {text}"))
        .with_context("adapter", ADAPTER)
        .with_context("destination", destination)
}

/// What a temporary refusal means. The client keeps the broker's own remark out of its
/// errors (it may hold user data), so the code is all there is to go on.
fn refusal(code: i32) -> &'static str {
    match code {
        code::SYSTEM_BUSY => {
            "code 2, SYSTEM_BUSY: requests waited too long in the broker's send queue or page cache"
        }
        code::SERVICE_NOT_AVAILABLE => {
            "code 14, SERVICE_NOT_AVAILABLE: the broker is shutting down, is a slave, or its disk is 90 % full"
        }
        _ => "code 1, SYSTEM_ERROR",
    }
}

/// Maps an error of an operation that changes nothing on failure (admin, route look-up).
pub(crate) fn admin_error(e: &ClientError, operation: &str) -> Error {
    let kind = match e.broker_response_code() {
        Some(code::TOPIC_NOT_EXIST) => ErrorKind::Unroutable,
        Some(code::NO_PERMISSION) => ErrorKind::Configuration,
        _ => ErrorKind::Unavailable,
    };
    Error::new(kind, format!("{operation} failed: {e}"))
        .with_context("adapter", ADAPTER)
        .with_context("operation", operation.to_owned())
}

/// `SEND_OK` is the only confirm; the other statuses mean the broker has the message but
/// did not make it durable as configured (flush or replication): retryable, the id
/// absorbs the duplicate.
pub(crate) fn status_error(status: SendStatus, destination: &str) -> Option<Error> {
    let what = match status {
        SendStatus::SendOk => return None,
        SendStatus::FlushDiskTimeout => "FLUSH_DISK_TIMEOUT",
        SendStatus::FlushSlaveTimeout => "FLUSH_SLAVE_TIMEOUT",
        SendStatus::SlaveNotAvailable => "SLAVE_NOT_AVAILABLE",
    };
    Some(
        Error::new(
            ErrorKind::NotDurable,
            format!("the broker stored the message but answered {what}: it may not be durable"),
        )
        .with_context("adapter", ADAPTER)
        .with_context("destination", destination)
        .with_context("send_status", what),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_broker_code_and_is_retryable() {
        let e = send_error(
            &ClientError::broker_operation_failed(
                "SEND_MESSAGE",
                code::SERVICE_NOT_AVAILABLE,
                "disk full",
            ),
            "orders",
        );
        assert_eq!(e.kind(), ErrorKind::Rejected);
        assert!(e.is_retryable());
        assert!(e.to_string().contains("SERVICE_NOT_AVAILABLE"), "{e}");
        let e = send_error(
            &ClientError::broker_operation_failed("SEND_MESSAGE", code::TOPIC_NOT_EXIST, ""),
            "orders",
        );
        assert_eq!(e.kind(), ErrorKind::Unroutable);
    }

    #[test]
    fn only_send_ok_confirms() {
        assert!(status_error(SendStatus::SendOk, "t").is_none());
        for s in [
            SendStatus::FlushDiskTimeout,
            SendStatus::FlushSlaveTimeout,
            SendStatus::SlaveNotAvailable,
        ] {
            let e = status_error(s, "t").unwrap();
            assert_eq!(e.kind(), ErrorKind::NotDurable);
            assert!(e.is_retryable());
        }
    }
}
