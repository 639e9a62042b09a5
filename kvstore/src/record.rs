//! What the kvstore writes to the log: `EPOCH` and `COMMIT` records, one line each. The codec
//! lives in [`protocol::kvlog`] so the logserver can refuse payloads the kvstore could not read;
//! this module re-exports it under the name the kvstore's code uses.

pub use protocol::kvlog::{Record, RecordError};
