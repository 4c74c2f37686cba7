//! For adapter authors: the middle tier every adapter shares.
//!
//! Applications never need this module. An adapter translates Surety's contracts to one
//! broker and leaves the rest here, written once:
//!
//! - [`publish`]: implement [`Sender`] (one confirmed send); [`Publish`] adds validation,
//!   the publish span, metrics, bounded retries and error context. Surety's own writes
//!   (retry copies, dead letters) go through [`PublishPath::run`].
//! - [`consume`]: implement [`Settle`] (ack, redeliver, dead-letter, hold) and hand each
//!   delivery to [`ConsumePath::deliver`], which runs the handler and decides.
//! - [`redrive`]: implement [`DeadLetterLog`] (scan and remove); [`DeadLetterQueue`]
//!   lists and re-drives.
//!
//! - The message builders and runners adapters share: [`dead_letter_message`],
//!   [`redrive_message`], [`header_safe`], [`validate_destination`], [`wire_text`] (bytes
//!   from the wire as header text, never dropped), and
//!   [`run_local_transaction`] / [`run_check_back`], which turn a panic in application code
//!   into `Unknown` inside their spans.
//!
//! Refusing unsupported calls is not an adapter's job either: `crate::CapabilityCheck`
//! does it in front of every adapter.

pub mod consume;
pub mod publish;
pub mod redrive;

pub use crate::dead_letter::{MAX_REASON_LEN, dead_letter_message, header_safe, redrive_message};
pub use crate::message::validate_destination;
pub use crate::transaction::{DEFAULT_CHECK_BACK_TIMEOUT, run_check_back, run_local_transaction};
pub use crate::wire::wire_text;
pub use consume::{ConsumePath, Disposition, Settle};
pub use publish::{Publish, PublishPath, Sender};
pub use redrive::{DeadLetterLog, DeadLetterPass, DeadLetterQueue, PassScope, StoredDeadLetter};
