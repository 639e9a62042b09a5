//! The kvstore: the client-facing MVCC store with snapshot isolation (port 10000).
//!
//! It keeps no durable state of its own: every commit is a record in the replicated log, and
//! on start it rebuilds itself from the latest checkpoint plus the log after it.
//!
//! - [`mvcc`]: the multi-version store and its garbage collection.
//! - [`record`]: the log records, as readable DKSP text.
//! - [`engine`]: timestamps, snapshots, first-committer-wins, group commit, fencing, recovery,
//!   checkpoints.
//! - [`follow`]: `TAIL`s the log to notice at once that a newer kvstore took over.
//! - [`lifecycle`]: starting, replaying, serving or fenced; the epoch and the applied index,
//!   shared by the engine and the follower.
//! - [`limits`]: per-transaction and server-wide limits on buffered writes and snapshot age.
//! - [`server`]: sessions and the DKSP commands, `AUTH` and the permission checks.
//! - [`users`]: the users file (`--users`): password hashes, key-prefix grants, the admin right.

#![warn(missing_docs)]

pub mod engine;
pub mod follow;
pub mod lifecycle;
pub mod limits;
pub mod mvcc;
pub mod record;
pub mod server;
pub mod users;
