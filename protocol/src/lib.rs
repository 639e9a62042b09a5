//! DKSP, the dtkv line protocol: one request per `\n`-terminated line, one reply line per
//! request, in order (multi-line replies end in `END`). The whole language is specified in
//! `docs/dksp.md`; this crate is its one implementation:
//!
//! - [`token`]: splitting a line into arguments and quoting them back (any byte string can be an
//!   argument).
//! - [`codec`]: line framing with a length limit that survives oversized lines.
//! - [`kv`], [`seq`], [`log`]: typed requests of each process; [`response`]: the reply lines all
//!   of them share.
//! - [`connection`], [`server`]: the buffered connection and accept loop the servers share;
//!   [`handler`]: the connection loop (read, parse, dispatch, replies in order) they share.
//! - [`record`]: checksummed `[len][crc32c][postcard]` records on disk and atomic file
//!   replacement, shared by the logserver and the sequencer.
//! - [`kvlog`]: the kvstore's log records and checkpoint format, and the checks the logserver
//!   makes with them (so that it refuses what the kvstore could not read).
//! - [`client`]: an async client with typed helpers.
//! - [`trust`]: cluster membership (mutual TLS or a shared secret's challenge–response) and
//!   the TLS stream.
//! - [`hops`]: the opt-in per-hop commit timestamps behind `--trace-hops` and `HOPS`.

#![warn(missing_docs)]

pub mod client;
pub mod cmd;
pub mod codec;
pub mod connection;
pub mod handler;
pub mod hops;
pub mod kv;
pub mod kvlog;
pub mod log;
pub mod log_client;
pub mod record;
pub mod response;
pub mod seq;
pub mod server;
pub mod token;
pub mod trust;

pub use client::{Client, ClientError, CommitOutcome};
pub use codec::{Frame, LineCodec, DEFAULT_MAX_LINE};
pub use connection::Connection;
pub use log_client::LogClient;
pub use response::{ErrorCode, Response, ServerError};
