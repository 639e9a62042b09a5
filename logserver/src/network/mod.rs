//! Raft RPCs between replicas: postcard frames over TCP.
//!
//! Each message is one frame of a length-delimited codec. A request is a [`RaftRpc`]; the reply
//! is the receiving Raft's whole `Result`, so a remote Raft error reaches openraft as
//! `RPCError::RemoteError` rather than being flattened into a network failure. postcard is not
//! self-describing, which is fine here: both ends are the same binary version, and every
//! openraft type on the wire round-trips (tested).
//!
//! - `client`: [`PeerClient`], what openraft calls to reach one peer. Appends go through the
//!   peer's [`crate::pipeline::Pipeline`] (several in flight, new entries sent as the log store
//!   writes them); heartbeats on a connection of their own; votes and snapshot chunks one
//!   exchange per call.
//! - [`serve()`]: the other side, which hands a connection's requests to Raft in order and
//!   merges appends that queued up behind a flush into one.
//!
//! **Frame cap.** Both ends refuse a frame longer than [`NetConfig::max_frame`] from its length
//! header, before reading or reserving anything for it, and close that connection. The cap is
//! the largest legitimate frame plus a margin: one Raft entry (a DKSP batch, at most
//! `server::BATCH_BYTES` plus one request line), an append of [`NetConfig::append_bytes`], or a
//! snapshot chunk, whichever is largest. Every replica must run with the same `--max-line`.
//!
//! **Large appends.** openraft 0.9 gives every `AppendEntries` the heartbeat interval (50 ms)
//! as its deadline and drops the call when it passes; it reads up to `max_payload_entries`
//! entries per call, each up to ~12 MiB. A call that cannot finish in 50 ms used to be dropped
//! with its connection, then resent in full from the same point, and never finished: the
//! follower heard nothing, campaigned, and its higher term deposed every leader that had to
//! send it the same entries (an election storm that survived restarts). So a request carries
//! entries up to [`NetConfig::append_bytes`] (always at least one), each has a deadline that
//! scales with the bytes ahead of it (1 s + bytes / `min_rate`), not openraft's, and a call
//! that returns before its entries are acknowledged leaves them in flight: the next call
//! waits for them instead of sending them again.
//!
//! Errors map to what openraft does with them:
//! - the peer cannot be dialled (refused, connect timeout) -> `Unreachable`, which makes the
//!   replication stream back off for [`PeerClient`]'s `backoff()` before retrying;
//! - any failure on an established connection, an undecodable reply, or a deadline
//!   expiring -> `Network`, retried on the next heartbeat over a fresh connection;
//! - the remote Raft answered `Err` -> `RemoteError`.

mod client;
mod serve;
#[cfg(test)]
mod tests;

pub use client::PeerClient;
pub use serve::serve;

use protocol::trust::Stream;
use serde::{Deserialize, Serialize};
use std::io;
use std::time::Duration;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::pipeline::Feed;
use crate::types::{Entry, Node, NodeId, TypeConfig};
use openraft::network::RaftNetworkFactory;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

/// Default bytes of entries per `AppendEntries` (`--raft-append-bytes`).
pub const DEFAULT_APPEND_BYTES: usize = 1024 * 1024;

/// Default slowest transfer rate assumed for an exchange's deadline, bytes/s
/// (`--raft-min-rate`). A 12 MiB entry then gets 1.5 s beyond `EXCHANGE_BASE`: far more than
/// loopback or a LAN needs with a follower's fdatasync, short enough that a peer that stopped
/// reading is given up on and redialled within a couple of seconds.
pub const DEFAULT_MIN_RATE: u64 = 8 * 1024 * 1024;

/// Default snapshot chunk (`--snapshot-chunk-bytes`, openraft's `snapshot_max_chunk_size`).
pub const DEFAULT_SNAPSHOT_CHUNK: usize = 2 * 1024 * 1024;

/// Margin over the largest legitimate frame: postcard's per-entry and per-op framing, the
/// snapshot's metadata, the request's vote and log ids.
const FRAME_MARGIN: usize = 1024 * 1024;

/// The part of an append exchange's deadline that does not depend on its size: a follower's
/// fdatasync under load can take hundreds of ms, and giving up on it only means sending the
/// same entries again. Waiting costs nothing meanwhile: heartbeats pass on their own
/// connection and each call reports the progress made so far.
pub(crate) const EXCHANGE_BASE: Duration = Duration::from_secs(1);

/// A dead peer on a LAN refuses at once; a longer wait only delays noticing a partitioned one.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Retry interval after `Unreachable`. openraft's default is 500 ms, which would leave a
/// restarted replica without entries for half a second; dialling loopback or a LAN is cheap.
pub(crate) const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(100);

/// The Raft network's limits, the same on every replica.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// An `AppendEntries` carries entries up to this many bytes (always at least one).
    pub append_bytes: usize,
    /// Slowest transfer rate, bytes/s, assumed when giving an exchange its deadline.
    pub min_rate: u64,
    /// Largest frame accepted in either direction; see [`max_frame`].
    pub max_frame: usize,
    /// Appends in flight per follower at most (see [`crate::pipeline`]).
    pub pipeline_depth: usize,
    /// How this replica proves membership to its peers (TLS, the cluster secret).
    pub trust: protocol::trust::Trust,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            append_bytes: DEFAULT_APPEND_BYTES,
            min_rate: DEFAULT_MIN_RATE,
            max_frame: max_frame(
                protocol::DEFAULT_MAX_LINE,
                DEFAULT_APPEND_BYTES,
                DEFAULT_SNAPSHOT_CHUNK,
            ),
            pipeline_depth: crate::pipeline::DEFAULT_DEPTH,
            trust: protocol::trust::Trust::none(),
        }
    }
}

/// The frame cap for replicas run with these flags: the largest of one entry (a batch closes
/// once it holds `BATCH_BYTES`, so it is below that plus one more op, and an op is at most one
/// request line of `max_line`), one append's byte budget and one snapshot chunk, plus a margin.
pub fn max_frame(max_line: usize, append_bytes: usize, snapshot_chunk: usize) -> usize {
    crate::server::BATCH_BYTES
        .saturating_add(max_line)
        .max(append_bytes)
        .max(snapshot_chunk)
        .saturating_add(FRAME_MARGIN)
}

/// Bytes an entry adds to an `AppendEntries`, close enough to its postcard size to budget by.
pub(crate) fn entry_bytes(e: &Entry) -> usize {
    let payload = match &e.payload {
        openraft::EntryPayload::Normal(batch) => batch.0.iter().map(|op| op.size()).sum(),
        // A few node addresses.
        openraft::EntryPayload::Membership(_) => 1024,
        openraft::EntryPayload::Blank => 0,
    };
    payload + 32
}

/// One request frame. The reply frame is the postcard of the matching `Raft` method's
/// `Result`.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// Entries to append, or a heartbeat (no entries).
    Append(AppendEntriesRequest<TypeConfig>),
    /// A candidate's request for this replica's vote.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot for a replica that must catch up from one.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

pub(crate) fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
}

/// Creates a [`PeerClient`] per target; openraft asks for one per replication stream, per
/// snapshot stream and per election round.
#[derive(Clone, Default)]
pub struct Network {
    /// Per-peer overrides of the Raft address to dial (`--raft-route`, a testing hook): the
    /// fault-injection tests put a proxy on every replica-to-replica link, so each replica
    /// must dial its own proxy for a peer while the membership keeps the peer's real address.
    pub routes: std::collections::BTreeMap<NodeId, String>,
    /// The limits every peer client gets.
    pub config: NetConfig,
    /// The local log store's appends, which the leader's pipelines send on at once.
    pub feed: Option<Feed>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        // No dialling here: this must not block or fail, and the peer may well be down.
        let addr = self.routes.get(&target).unwrap_or(&node.raft_addr).clone();
        let mut client = PeerClient::new(target, addr, self.config.clone());
        client.feed = self.feed.clone();
        client
    }
}

/// One connection to or from a peer: length-delimited frames.
pub(crate) type Conn = Framed<Stream, LengthDelimitedCodec>;

/// Dials a peer's Raft port within [`CONNECT_TIMEOUT`] and proves membership (TLS or the
/// cluster secret's handshake, see [`protocol::trust`]), then frames the stream.
pub(crate) async fn dial(addr: &str, net: &NetConfig) -> io::Result<Conn> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut s = net.trust.dial(addr).await?;
        net.trust.raft_prove(&mut s).await?;
        Ok::<_, io::Error>(s)
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {addr} timed out"),
        )
    })??;
    Ok(Framed::new(stream, codec(net.max_frame)))
}
