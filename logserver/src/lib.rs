//! The logserver: dtkv's durable write-ahead log, three replicas kept in agreement by openraft.
//!
//! - [`types`]: the Raft type configuration; a Raft entry is a batch of client operations.
//! - [`log_store`]: our segmented, checksummed log on disk (openraft's `RaftLogStorage`).
//! - [`state_machine`]: the applied log as clients see it: logical indices, exactly-once
//!   dedupe, checkpoints and compaction (openraft's `RaftStateMachine`).
//! - [`network`]: Raft RPCs between replicas, postcard frames over TCP.
//! - [`server`]: DKSP for clients, with group commit of concurrent `APPEND`s.
//! - [`membership`]: which `ADD_REPLICA`/`REMOVE_REPLICA` changes the leader makes (a majority
//!   of reachable voters kept, no shrinking below three without `FORCE`).

#![warn(missing_docs)]

pub mod log_store;
pub mod membership;
pub mod network;
pub mod pipeline;
pub mod server;
pub mod state_machine;
pub mod types;
