//! What a caught panic said, for logs and dead-letter reasons.

use std::any::Any;

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub(crate) fn panic_text(panic: &Box<dyn Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_owned()
    }
}
