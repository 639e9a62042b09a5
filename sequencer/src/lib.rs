//! The sequencer: a durable timestamp oracle, like TiKV's TSO or FoundationDB's sequencer.
//!
//! It hands out strictly increasing timestamps that are never reissued, not even after `kill -9`.
//! [`state`] persists a reserved high-water mark; [`oracle`] hands out timestamps below it and
//! raises it a window at a time in the background, so no request pays for an fsync; [`server`]
//! speaks DKSP (`NEXT`, `NEXT n`, `CURRENT`, `PING`, `STATUS`, `QUIT`).

#![warn(missing_docs)]

pub mod oracle;
pub mod server;
pub mod state;

pub use oracle::Oracle;
pub use state::StateFile;
