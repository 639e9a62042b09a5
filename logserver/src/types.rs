//! The Raft type configuration: what a log entry carries and what applying it returns.
//!
//! One Raft entry carries a [`Batch`] of operations, not one: openraft 0.9 fsyncs each
//! `client_write` separately and one at a time, so the DKSP server gathers the `APPEND`s that
//! arrive while a write is in flight into the next batch (group commit). The client-visible log
//! index is *logical*: the state machine numbers `Append` operations densely as it applies them,
//! so Raft's own entries (leader no-ops, membership changes), checkpoint uploads and duplicate
//! appends never show up in `READ`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Cursor;

/// A replica's id in the Raft group (`--id`).
pub type NodeId = u64;

/// A replica's two addresses: Raft traffic between replicas, and DKSP for clients.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Where the replica listens for Raft RPCs from the other replicas.
    pub raft_addr: String,
    /// Where the replica listens for DKSP clients.
    pub dksp_addr: String,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} dksp={}", self.raft_addr, self.dksp_addr)
    }
}

/// One client operation inside a replicated batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Append `payload` once per `(client, seq)`.
    Append {
        /// The writer's id; with `seq` it names the append for exactly-once delivery.
        client: Bytes,
        /// The writer's sequence number for this append.
        seq: u64,
        /// The entry's bytes.
        payload: Bytes,
    },
    /// Part of a checkpoint upload: `data` belongs at `offset` of checkpoint `id`.
    CkptChunk {
        /// The upload's id.
        id: u64,
        /// Where in the upload `data` goes.
        offset: u64,
        /// The chunk's bytes.
        data: Bytes,
    },
    /// Checkpoint `id` (of `len` bytes with CRC32C `crc`) is the state as of logical index
    /// `index`; entries up to `index` may be dropped.
    CkptCommit {
        /// The upload's id.
        id: u64,
        /// The logical index the checkpoint covers.
        index: u64,
        /// The upload's total length in bytes.
        len: u64,
        /// The CRC32C of the whole upload.
        crc: u32,
    },
}

impl Op {
    /// Bytes this op adds to a Raft entry, within a few bytes of its postcard encoding (the
    /// Raft network budgets appends by it). Matches the DKSP batcher's own count.
    pub fn size(&self) -> usize {
        match self {
            Op::Append {
                client, payload, ..
            } => client.len() + payload.len() + 16,
            Op::CkptChunk { data, .. } => data.len() + 16,
            Op::CkptCommit { .. } => 32,
        }
    }
}

/// What a Raft entry carries: operations applied in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Vec<Op>);

/// The outcome of one [`Op`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// Appended at this logical index.
    Appended(u64),
    /// `(client, seq)` was appended before, at this logical index; nothing was appended now.
    Duplicate(u64),
    /// A checkpoint operation took effect.
    Done,
    /// Rejected, with the reason (a checkpoint chunk out of order, a seq too old to check).
    Rejected(String),
}

/// What applying one Raft entry returns: one result per op (empty for Raft's own entries).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult(pub Vec<OpResult>);

openraft::declare_raft_types!(
    /// dtkv's Raft types.
    pub TypeConfig:
        D = Batch,
        R = BatchResult,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A Raft log entry of dtkv's log.
pub type Entry = openraft::Entry<TypeConfig>;
/// A Raft log position: term, leader and index.
pub type LogId = openraft::LogId<NodeId>;
/// A Raft vote: the term and the candidate voted for.
pub type Vote = openraft::Vote<NodeId>;
/// The error openraft's storage traits return.
pub type StorageError = openraft::StorageError<NodeId>;
/// The membership as stored in the log and snapshots.
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
/// What a snapshot covers: its last log id and membership.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
/// The Raft node of one replica.
pub type Raft = openraft::Raft<TypeConfig>;
/// An error from a Raft API call.
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
/// An error from a Raft RPC to another replica.
pub type RpcError<E = openraft::error::Infallible> =
    openraft::error::RPCError<NodeId, Node, RaftError<E>>;
