//! lapin errors turned into Surety's portable kinds.

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use surety_core::{Error, ErrorKind};

use crate::ADAPTER;

/// Whether the broker refused a declaration because it differs from what exists
/// (406 PRECONDITION_FAILED), refused access (403), or did not find something (404).
fn is_topology_refusal(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(
            AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED | AMQPSoftError::NOTFOUND
        )
    ))
}

/// An error of a topology operation (`declare`, bind, consume set-up): a refusal by the
/// broker is a configuration error, anything else means the broker could not be reached.
pub(crate) fn topology(what: &str, e: lapin::Error) -> Error {
    if is_topology_refusal(&e) {
        Error::new(
            ErrorKind::Configuration,
            format!("RabbitMQ refused to {what}"),
        )
        .with_context("adapter", ADAPTER)
        .with_source(e)
    } else {
        unavailable(what, e)
    }
}

/// Whether the broker answered 404 NOT_FOUND (a passive declaration of something that
/// does not exist).
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
    ))
}

/// Whether the broker refused the connection's credentials (403 ACCESS_REFUSED while
/// opening the connection: wrong password, unknown user, or no access to the vhost).
pub(crate) fn is_access_refused(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
    ))
}

/// The broker could not be reached or the channel was not usable: nothing was sent.
pub(crate) fn unavailable(what: &str, e: lapin::Error) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("RabbitMQ unavailable: cannot {what}"),
    )
    .with_context("adapter", ADAPTER)
    .with_source(e)
}

/// The request may have reached the broker but its answer was lost.
pub(crate) fn outcome_unknown(what: &str, e: lapin::Error) -> Error {
    Error::new(
        ErrorKind::OutcomeUnknown,
        format!("the outcome of {what} is unknown: the channel failed before the broker answered"),
    )
    .with_context("adapter", ADAPTER)
    .with_source(e)
}
