//! Raft RPCs between replicas: postcard frames over TCP.
//!
//! Each message is one frame of a length-delimited codec. A request is a [`RaftRpc`]; the reply
//! is the receiving Raft's whole `Result`, so a remote Raft error reaches openraft as
//! `RPCError::RemoteError` rather than being flattened into a network failure. postcard is not
//! self-describing, which is fine here: both ends are the same binary version, and every
//! openraft type on the wire round-trips (tested below).
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
//! send it the same entries (an election storm that survived restarts, since the entries were
//! in the log). So for appends:
//! - one call sends entries up to [`NetConfig::append_bytes`] (always at least one) and answers
//!   `PartialSuccess` for what it sent; openraft continues from there at once;
//! - the exchange runs in its own task with a deadline that scales with its size
//!   (1 s + bytes / `min_rate`), not openraft's; the call waits for it only until
//!   openraft's `soft_ttl`. An exchange still running then stays in flight: the call answers
//!   `PartialSuccess` up to the last entry the follower is known to hold (or a network error
//!   when that is no progress), and the next call first waits for the one in flight;
//! - entries the follower is known to hold under the same leader vote ([`PeerClient`]'s
//!   `acked`: it answered `Success` for them, which a follower does only once they are
//!   durable) are trimmed from the front of the next request, with `prev_log_id` moved up to
//!   match. By Raft's log matching property that request means the same to the follower.
//!   A follower that lost them anyway (wiped) answers `Conflict`, which clears `acked`.
//!
//! Heartbeats (no entries) keep the short deadline. Votes and snapshot chunks are one exchange
//! per call within the call's `hard_ttl` (a snapshot chunk gets `install_snapshot_timeout`).
//!
//! The client side connects lazily (openraft creates clients for peers that may not be up
//! yet) and keeps one connection per client, owned by whichever exchange is running. A call
//! cancelled by openraft leaves its exchange task to finish or time out with the connection;
//! the next call dials afresh, so it can never read the previous call's late reply. A pooled
//! connection with anything readable before we have sent (EOF from a restarted peer, say) is
//! replaced rather than used, so a peer's restart does not cost a failed call.
//!
//! Errors map to what openraft does with them:
//! - the peer cannot be dialled (refused, connect timeout) -> `Unreachable`, which makes the
//!   replication stream back off for [`PeerClient`]'s `backoff()` before retrying;
//! - any failure on an established connection, an undecodable reply, or the deadline
//!   expiring -> `Network`, retried on the next heartbeat over a fresh connection;
//! - the remote Raft answered `Err` -> `RemoteError`.

use futures::{FutureExt, SinkExt, StreamExt};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::pipeline::{Fault, Feed, PipeConfig, Pipeline};
use crate::types::{Entry, Node, NodeId, Raft, RaftError, RpcError, TypeConfig};

/// Default bytes of entries per `AppendEntries` (`--raft-append-bytes`).
pub const DEFAULT_APPEND_BYTES: usize = 1024 * 1024;

/// Default slowest transfer rate assumed for an exchange's deadline, bytes/s
/// (`--raft-min-rate`). A 12 MiB entry then gets 1.5 s beyond [`EXCHANGE_BASE`]: far more than
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
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(100);

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
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
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

type Conn = Framed<TcpStream, LengthDelimitedCodec>;

/// What an exchange task hands back: the connection if it is still in step, and the reply.
type Outcome = (Option<Conn>, Result<bytes::BytesMut, Failure>);

/// Why an exchange failed, before mapping to openraft's error types.
#[derive(Debug)]
enum Failure {
    Unreachable(io::Error),
    Network(io::Error),
}

impl Failure {
    fn into_rpc<E: std::error::Error>(self) -> RpcError<E> {
        match self {
            Failure::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            Failure::Network(e) => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

/// Raft RPCs to one peer over one lazily opened connection.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    config: NetConfig,
    /// The idle connection for votes and snapshot chunks, if any; an exchange takes it and
    /// gives it back.
    conn: Option<Conn>,
    /// The connection heartbeats use; see [`Self::heartbeat`].
    hb_conn: Option<Conn>,
    /// Appends, started by the first one; see [`crate::pipeline`].
    pipeline: Option<Pipeline>,
    feed: Option<Feed>,
}

/// Dials `addr`, sends `body` over `conn` (or a new connection) and reads one reply frame.
async fn exchange(conn: Option<Conn>, addr: &str, body: bytes::Bytes, max_frame: usize) -> Outcome {
    let conn = conn.and_then(|mut c| {
        // Between exchanges a peer has nothing to say, so anything readable now is EOF, an
        // error or junk: in practice the peer restarted. Redialling now keeps that from
        // costing a failed call and a heartbeat interval.
        c.next().now_or_never().is_none().then_some(c)
    });
    let mut conn = match conn {
        Some(c) => c,
        None => match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                // Best effort: without it heartbeats wait on Nagle, but they still work.
                let _ = s.set_nodelay(true);
                Framed::new(s, codec(max_frame))
            }
            Ok(Err(e)) => return (None, Err(Failure::Unreachable(e))),
            Err(_) => {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out"),
                );
                return (None, Err(Failure::Unreachable(e)));
            }
        },
    };
    let reply: io::Result<bytes::BytesMut> = async {
        conn.send(body).await?;
        match conn.next().await {
            Some(frame) => frame,
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection",
            )),
        }
    }
    .await;
    match reply {
        Ok(frame) => (Some(conn), Ok(frame)),
        // The stream may be mid-frame or out of step with us; only a new one is known good.
        Err(e) => (None, Err(Failure::Network(e))),
    }
}

fn decode<R: DeserializeOwned>(frame: &[u8]) -> Result<R, Failure> {
    postcard::from_bytes(frame).map_err(|e| {
        Failure::Network(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("undecodable reply: {e}"),
        ))
    })
}

type AppendReply = Result<AppendEntriesResponse<NodeId>, RaftError>;

impl PeerClient {
    fn new(target: NodeId, addr: String, config: NetConfig) -> PeerClient {
        PeerClient {
            target,
            addr,
            config,
            conn: None,
            hb_conn: None,
            pipeline: None,
            feed: None,
        }
    }

    /// Starts an exchange of `rpc` over `conn` (or a new connection) in its own task, ending
    /// it after `deadline`.
    fn spawn(
        &self,
        conn: Option<Conn>,
        rpc: &RaftRpc,
        deadline: Duration,
    ) -> Result<JoinHandle<Outcome>, Failure> {
        let body = postcard::to_stdvec(rpc).map_err(|e| Failure::Network(io::Error::other(e)))?;
        if body.len() > self.config.max_frame {
            // Only replicas run with different --max-line get here; say so rather than let
            // the codec's error hide it.
            return Err(Failure::Network(io::Error::other(format!(
                "raft frame of {} bytes to {} exceeds the {}-byte cap: are all replicas run \
                 with the same --max-line?",
                body.len(),
                self.target,
                self.config.max_frame
            ))));
        }
        let addr = self.addr.clone();
        let max_frame = self.config.max_frame;
        Ok(tokio::spawn(async move {
            let body = bytes::Bytes::from(body);
            match tokio::time::timeout(deadline, exchange(conn, &addr, body, max_frame)).await {
                Ok(outcome) => outcome,
                Err(_) => (
                    None,
                    Err(Failure::Network(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("raft rpc to {addr} timed out after {deadline:?}"),
                    ))),
                ),
            }
        }))
    }

    /// Takes back a finished exchange's connection and decodes its reply.
    fn collect<R: DeserializeOwned>(
        &mut self,
        joined: Result<Outcome, tokio::task::JoinError>,
    ) -> Result<R, Failure> {
        let (conn, frame) =
            joined.unwrap_or_else(|e| (None, Err(Failure::Network(io::Error::other(e)))));
        self.conn = conn;
        let reply = frame.and_then(|f| decode(&f));
        if reply.is_err() {
            self.conn = None;
        }
        reply
    }

    /// Replicates openraft's range through the pipeline and answers with what the follower
    /// holds of it: `Success` for all, `PartialSuccess` as soon as it holds part, else what
    /// went wrong, or a network error if nothing came back within openraft's `soft_ttl` (the
    /// pipeline keeps going; the next call waits for the same entries, not sending them again).
    async fn append(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        // Answer before openraft's own deadline drops us: then what we learn is not lost.
        let waited = option.soft_ttl();
        let until = Instant::now() + waited;
        if rpc.entries.is_empty() {
            return self.heartbeat(rpc, option, until).await;
        }
        let (vote, prev) = (rpc.vote, rpc.prev_log_id);
        let last = rpc.entries.last().map(|e| e.log_id.index);
        let (target, addr, feed) = (self.target, &self.addr, self.feed.as_ref());
        let config = PipeConfig {
            net: self.config.clone(),
            depth: self.config.pipeline_depth,
        };
        let pipe = self
            .pipeline
            .get_or_insert_with(|| Pipeline::start(target, addr.clone(), config, feed));
        let network = |why: String| {
            let e = io::Error::new(io::ErrorKind::TimedOut, why);
            RPCError::Network(NetworkError::new(&e))
        };
        let Ok(Some(taken)) = tokio::time::timeout_at(until, pipe.take(rpc)).await else {
            return Err(network(format!(
                "the pipeline to {target} did not take the append"
            )));
        };
        let state = pipe.state();
        loop {
            {
                let s = state.borrow_and_update();
                if s.vote == Some(vote) {
                    if let Some(a) = s.acked {
                        if Some(a.index) >= last {
                            return Ok(AppendEntriesResponse::Success);
                        }
                        if Some(a.index) > prev.map(|p| p.index) {
                            return Ok(AppendEntriesResponse::PartialSuccess(Some(a)));
                        }
                    }
                }
                if s.generation != taken {
                    // The pipeline started over after taking this range.
                    return match &s.fault {
                        Some(Fault::HigherVote(h)) if *h > vote => {
                            Ok(AppendEntriesResponse::HigherVote(*h))
                        }
                        // Only the request that carried this call's own `prev_log_id` says
                        // the follower lacks it; any other refusal is reported as a failure
                        // and openraft asks again from where it stands.
                        Some(Fault::Conflict(at)) if *at == prev => {
                            Ok(AppendEntriesResponse::Conflict)
                        }
                        Some(Fault::Unreachable(why)) => {
                            let e = io::Error::new(io::ErrorKind::ConnectionRefused, why.clone());
                            Err(RPCError::Unreachable(Unreachable::new(&e)))
                        }
                        Some(f) => Err(network(format!("append to {target}: {f:?}"))),
                        None => Err(network(format!("append to {target} started over"))),
                    };
                }
            }
            match tokio::time::timeout_at(until, state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(network(format!("the pipeline to {target} stopped"))),
                Err(_) => {
                    return Err(network(format!(
                        "append to {target} still in flight after {waited:?}"
                    )))
                }
            }
        }
    }

    /// A heartbeat, on a connection of its own: appends may wait seconds in the pipeline for
    /// their bytes and the follower's fdatasync, but the follower must still hear from the
    /// leader within its election timeout, and its Raft core answers a heartbeat without
    /// waiting for the disk. Raft allows the two to arrive in either order: a heartbeat's
    /// `prev_log_id` is one the follower already acknowledged.
    async fn heartbeat(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
        until: Instant,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        let conn = self.hb_conn.take();
        let mut handle = self
            .spawn(conn, &RaftRpc::Append(rpc), option.hard_ttl())
            .map_err(Failure::into_rpc)?;
        let Ok(joined) = tokio::time::timeout_at(until, &mut handle).await else {
            // Left to end by its own deadline, with its connection: the next one dials.
            let e = io::Error::new(
                io::ErrorKind::TimedOut,
                format!("heartbeat to {} unanswered", self.target),
            );
            return Err(RPCError::Network(NetworkError::new(&e)));
        };
        // `collect` puts the connection back in `conn`, which votes and snapshots use.
        let idle = self.conn.take();
        let reply = self.collect::<AppendReply>(joined);
        self.hb_conn = std::mem::replace(&mut self.conn, idle);
        match reply {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(failure) => Err(failure.into_rpc()),
        }
    }

    /// One vote or snapshot RPC within the call's `hard_ttl`, errors mapped for openraft.
    async fn call<T, E>(&mut self, rpc: RaftRpc, option: &RPCOption) -> Result<T, RpcError<E>>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let conn = self.conn.take();
        let handle = self
            .spawn(conn, &rpc, option.hard_ttl())
            .map_err(Failure::into_rpc)?;
        // If openraft drops this call, the task ends by its own deadline, taking the
        // connection with it: the next call dials afresh and cannot read this call's reply.
        let reply = handle.await;
        match self.collect::<Result<T, RaftError<E>>>(reply) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(failure) => Err(failure.into_rpc()),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        self.append(rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>> {
        self.call(RaftRpc::Snapshot(rpc), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError> {
        self.call(RaftRpc::Vote(rpc), &option).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF))
    }
}

/// Serves Raft RPCs from the other replicas until `shutdown` fires; connections in progress
/// are dropped then too. Frames over `max_frame` close their connection unread.
pub async fn serve(
    listener: TcpListener,
    raft: Raft,
    shutdown: CancellationToken,
    max_frame: usize,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Typically EMFILE: pause rather than spin, but stay responsive to shutdown.
                    tracing::warn!("raft accept failed: {e}");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            },
        };
        // Best effort, as on the client side.
        let _ = stream.set_nodelay(true);
        let raft = raft.clone();
        let token = shutdown.child_token();
        tokio::spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = serve_peer(Framed::new(stream, codec(max_frame)), raft, max_frame) => {}
            }
        });
    }
}

/// Requests one peer connection may have read and not yet answered.
const PEER_PIPELINE: usize = 64;

/// Takes `next` into `merged` if it continues it: same vote, and its `prev_log_id` is the last
/// entry of `merged`. Then the follower appends both with one call and one fdatasync.
fn merge(
    merged: &mut AppendEntriesRequest<TypeConfig>,
    next: AppendEntriesRequest<TypeConfig>,
) -> Result<(), AppendEntriesRequest<TypeConfig>> {
    let last = merged
        .entries
        .last()
        .map(|e| e.log_id)
        .or(merged.prev_log_id);
    if next.vote != merged.vote || next.prev_log_id != last {
        return Err(next);
    }
    merged.entries.extend(next.entries);
    if next.leader_commit > merged.leader_commit {
        merged.leader_commit = next.leader_commit;
    }
    Ok(())
}

/// Handles one peer's requests in order, answering each in order. The leader's pipeline keeps
/// several appends in flight on one connection (see [`crate::pipeline`]); those that arrive
/// while Raft is busy with the one before are read meanwhile and, when they continue one
/// another, handed to Raft as one append, so one fdatasync covers them all (Raft's own core
/// handles one append at a time, waiting for its flush). Each of them is then answered with
/// that append's outcome: `Success` for one means all its entries are durable. At most
/// [`PEER_PIPELINE`] requests, and at most two frame caps of bytes, wait at once; past that
/// the connection is not read until replies go out.
async fn serve_peer(conn: Conn, raft: Raft, max_frame: usize) {
    let peer = conn
        .get_ref()
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let (mut sink, mut stream) = conn.split();
    let budget = Arc::new(tokio::sync::Semaphore::new(max_frame.saturating_mul(2)));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(RaftRpc, OwnedSemaphorePermit)>(PEER_PIPELINE);
    let reader = async {
        while let Some(frame) = stream.next().await {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    // Resets are routine (a peer restarting); oversized frames are not.
                    if e.kind() == io::ErrorKind::InvalidData {
                        tracing::warn!(
                            "raft connection from {peer}: {e} (frame cap {max_frame} bytes); \
                             closing"
                        );
                    } else {
                        tracing::debug!("raft connection from {peer} closed: {e}");
                    }
                    return;
                }
            };
            let rpc: RaftRpc = match postcard::from_bytes(&frame) {
                Ok(r) => r,
                Err(e) => {
                    // Nothing after a bad frame can be trusted to be in step: close, let it
                    // redial.
                    tracing::warn!(
                        "undecodable raft frame ({} bytes) from {peer}: {e}; closing",
                        frame.len()
                    );
                    return;
                }
            };
            let cost = u32::try_from(frame.len().clamp(1, max_frame.saturating_mul(2)))
                .unwrap_or(u32::MAX);
            drop(frame);
            let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
                return;
            };
            if tx.send((rpc, permit)).await.is_err() {
                return;
            }
        }
    };
    let handler = async {
        let mut queue = std::collections::VecDeque::new();
        loop {
            if queue.is_empty() {
                match rx.recv().await {
                    Some(r) => queue.push_back(r),
                    None => return,
                }
            }
            while let Ok(r) = rx.try_recv() {
                queue.push_back(r);
            }
            let Some((rpc, permit)) = queue.pop_front() else {
                continue;
            };
            let mut permits = vec![permit];
            let reply = match rpc {
                RaftRpc::Append(mut req) => {
                    while let Some((RaftRpc::Append(_), _)) = queue.front() {
                        let Some((RaftRpc::Append(next), p)) = queue.pop_front() else {
                            break;
                        };
                        match merge(&mut req, next) {
                            Ok(()) => permits.push(p),
                            Err(next) => {
                                queue.push_front((RaftRpc::Append(next), p));
                                break;
                            }
                        }
                    }
                    postcard::to_stdvec(&raft.append_entries(req).await)
                }
                RaftRpc::Vote(req) => postcard::to_stdvec(&raft.vote(req).await),
                RaftRpc::Snapshot(req) => postcard::to_stdvec(&raft.install_snapshot(req).await),
            };
            let reply = match reply {
                Ok(r) => bytes::Bytes::from(r),
                Err(e) => {
                    // The client would wait for a reply we cannot give; closing fails it at
                    // once.
                    tracing::warn!("encoding a raft reply to {peer} failed: {e}; closing");
                    return;
                }
            };
            let answered = permits.len();
            drop(permits);
            let mut sent = Ok(());
            for _ in 0..answered {
                sent = sink.feed(reply.clone()).await;
                if sent.is_err() {
                    break;
                }
            }
            if let Err(e) = sent.and(sink.flush().await) {
                tracing::debug!("raft connection from {peer} closed while replying: {e}");
                return;
            }
        }
    };
    // Either side ending ends the connection: a reader at EOF has no one to answer.
    tokio::select! {
        _ = reader => {}
        _ = handler => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_store::LogStore;
    use crate::pipeline::Feed;
    use crate::state_machine::StateMachine;
    use crate::types::{Batch, BatchResult, Entry, Op, OpResult};
    use bytes::Bytes;
    use openraft::error::{Fatal, SnapshotMismatch};
    use openraft::testing::log_id;
    use openraft::{
        AnyError, EntryPayload, ErrorSubject, ErrorVerb, Membership, SnapshotMeta,
        SnapshotSegmentId, StorageError, StorageIOError, StoredMembership, Vote,
    };
    use std::collections::{BTreeMap, BTreeSet};
    use std::fmt::Debug;
    use std::sync::Arc;

    fn node(addr: &str) -> Node {
        Node {
            raft_addr: addr.into(),
            dksp_addr: "127.0.0.1:1".into(),
        }
    }

    fn membership() -> Membership<NodeId, Node> {
        let nodes = BTreeMap::from([(1, node("a:1")), (2, node("b:2")), (3, node("c:3"))]);
        Membership::new(
            vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([1, 2])],
            nodes,
        )
    }

    /// Encodes and decodes `v`, comparing `Debug` renderings because several openraft types
    /// (the requests, `RaftError`) have no `PartialEq`.
    fn roundtrip<T: Serialize + DeserializeOwned + Debug>(v: &T) -> T {
        let bytes = postcard::to_stdvec(v).expect("encode");
        let back: T = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(format!("{back:?}"), format!("{v:?}"));
        back
    }

    fn append_request() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(3, 1, 9)),
            entries: vec![
                Entry {
                    log_id: log_id(3, 1, 10),
                    payload: EntryPayload::Normal(Batch(vec![
                        Op::Append {
                            client: Bytes::from_static(b"c"),
                            seq: 1,
                            payload: Bytes::from_static(b"\x00\xffpayload"),
                        },
                        Op::CkptChunk {
                            id: 7,
                            offset: 0,
                            data: Bytes::new(),
                        },
                        Op::CkptCommit {
                            id: 7,
                            index: 9,
                            len: 0,
                            crc: u32::MAX,
                        },
                    ])),
                },
                Entry {
                    log_id: log_id(3, 1, 11),
                    payload: EntryPayload::Membership(membership()),
                },
                Entry {
                    log_id: log_id(3, 1, 12),
                    payload: EntryPayload::Blank,
                },
            ],
            leader_commit: Some(log_id(3, 1, 8)),
        }
    }

    fn snapshot_request(offset: u64) -> InstallSnapshotRequest<TypeConfig> {
        InstallSnapshotRequest {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(log_id(3, 1, 40)),
                last_membership: StoredMembership::new(Some(log_id(2, 1, 5)), membership()),
                snapshot_id: "3-1-40-17".into(),
            },
            offset,
            data: vec![0, 1, 2, 255],
            done: true,
        }
    }

    #[test]
    fn requests_roundtrip_through_postcard() {
        let req = append_request();
        match roundtrip(&RaftRpc::Append(req.clone())) {
            RaftRpc::Append(back) => assert_eq!(back.entries, req.entries),
            _ => panic!("wrong variant"),
        }
        // Heartbeats: no entries, nothing committed yet.
        let heartbeat = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new(1, 2),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        };
        roundtrip(&RaftRpc::Append(heartbeat));

        let vote = VoteRequest::new(Vote::new(4, 2), Some(log_id(3, 1, 12)));
        assert!(matches!(roundtrip(&RaftRpc::Vote(vote.clone())), RaftRpc::Vote(v) if v == vote));
        roundtrip(&RaftRpc::Vote(VoteRequest::new(Vote::new(1, 1), None)));

        let snap = snapshot_request(3);
        match roundtrip(&RaftRpc::Snapshot(snap.clone())) {
            RaftRpc::Snapshot(back) => {
                assert_eq!(back.meta, snap.meta);
                assert_eq!(back.data, snap.data);
            }
            _ => panic!("wrong variant"),
        }

        // Not wire types, but a batch result is what openraft stores in client replies; cheap
        // to pin down alongside.
        roundtrip(&BatchResult(vec![
            OpResult::Appended(1),
            OpResult::Duplicate(0),
            OpResult::Done,
            OpResult::Rejected("old".into()),
        ]));
    }

    #[test]
    fn replies_roundtrip_through_postcard() {
        type AppendReply = Result<AppendEntriesResponse<NodeId>, RaftError>;
        // The responses are not `Clone`: build each twice.
        let append_replies = || {
            [
                AppendEntriesResponse::Success,
                AppendEntriesResponse::PartialSuccess(Some(log_id(2, 1, 4))),
                AppendEntriesResponse::PartialSuccess(None),
                AppendEntriesResponse::Conflict,
                AppendEntriesResponse::HigherVote(Vote::new(5, 3)),
            ]
        };
        for (sent, expected) in append_replies().into_iter().zip(append_replies()) {
            let back = roundtrip::<AppendReply>(&Ok(sent));
            assert_eq!(back.ok(), Some(expected));
        }

        type VoteReply = Result<VoteResponse<NodeId>, RaftError>;
        let granted = VoteResponse {
            vote: Vote::new(4, 2),
            vote_granted: true,
            last_log_id: Some(log_id(3, 1, 12)),
        };
        assert_eq!(
            roundtrip::<VoteReply>(&Ok(granted.clone())).ok(),
            Some(granted)
        );

        // Remote errors: the storage error carries an `AnyError` with a source chain, the
        // part most likely to use serde features postcard lacks.
        let io = io::Error::other("disk on fire");
        let storage: StorageError<NodeId> =
            StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Write, AnyError::new(&io)).into();
        for fatal in [
            Fatal::Stopped,
            Fatal::Panicked,
            Fatal::StorageError(storage),
        ] {
            let back = roundtrip::<VoteReply>(&Err(openraft::error::RaftError::Fatal(fatal)));
            assert!(back.is_err());
        }

        type SnapshotReply =
            Result<InstallSnapshotResponse<NodeId>, RaftError<InstallSnapshotError>>;
        let ok = || InstallSnapshotResponse {
            vote: Vote::new_committed(3, 1),
        };
        assert_eq!(roundtrip::<SnapshotReply>(&Ok(ok())).ok(), Some(ok()));
        let mismatch = InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
            expect: SnapshotSegmentId {
                id: "a".into(),
                offset: 0,
            },
            got: SnapshotSegmentId {
                id: "b".into(),
                offset: 9,
            },
        });
        let back = roundtrip::<SnapshotReply>(&Err(openraft::error::RaftError::APIError(
            mismatch.clone(),
        )));
        assert!(matches!(back, Err(openraft::error::RaftError::APIError(m)) if m == mismatch));
    }

    fn client_for(addr: &str) -> PeerClient {
        PeerClient::new(2, addr.into(), NetConfig::default())
    }

    fn free_port_addr() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        addr
    }

    #[tokio::test]
    async fn new_client_does_not_dial_and_a_dead_peer_is_unreachable() {
        let addr = free_port_addr();
        let mut client = Network::default().new_client(2, &node(&addr)).await;
        assert!(client.conn.is_none());
        let r = client
            .vote(
                VoteRequest::new(Vote::new(1, 1), None),
                RPCOption::new(Duration::from_secs(1)),
            )
            .await;
        assert!(matches!(r, Err(RPCError::Unreachable(_))), "{r:?}");
        let r = client
            .append_entries(append_request(), RPCOption::new(Duration::from_secs(1)))
            .await;
        assert!(matches!(r, Err(RPCError::Unreachable(_))), "{r:?}");
    }

    #[tokio::test]
    async fn a_route_overrides_the_membership_address_for_its_peer_only() {
        let routed = Network {
            routes: [(2, "127.0.0.1:7".to_string())].into(),
            ..Default::default()
        };
        let mut net = routed.clone();
        assert_eq!(
            net.new_client(2, &node("127.0.0.1:9")).await.addr,
            "127.0.0.1:7"
        );
        assert_eq!(
            net.new_client(3, &node("127.0.0.1:9")).await.addr,
            "127.0.0.1:9"
        );
    }

    /// A stand-in peer that answers each vote with the request's own vote, after `delay` for
    /// term 1: enough to tell whose reply a call received.
    async fn echo_voter(listener: TcpListener, delay: Duration) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut conn = Framed::new(stream, codec(NetConfig::default().max_frame));
                while let Some(Ok(frame)) = conn.next().await {
                    let Ok(RaftRpc::Vote(req)) = postcard::from_bytes::<RaftRpc>(&frame) else {
                        return;
                    };
                    if req.vote.leader_id().get_term() == 1 {
                        tokio::time::sleep(delay).await;
                    }
                    let reply: Result<VoteResponse<NodeId>, RaftError> = Ok(VoteResponse {
                        vote: req.vote,
                        vote_granted: true,
                        last_log_id: None,
                    });
                    let bytes = postcard::to_stdvec(&reply).expect("encode");
                    if conn.send(Bytes::from(bytes)).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    #[tokio::test]
    async fn a_cancelled_call_does_not_leave_its_reply_for_the_next() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(echo_voter(listener, Duration::from_millis(300)));
        let mut client = client_for(&addr);
        let vote = |term| VoteRequest::new(Vote::new(term, 1), None);

        // Cancelled by our own `hard_ttl`. The next call goes out at once, before the late
        // reply to term 1 exists: the cancelled exchange kept its connection, so this one dials.
        let r = client
            .vote(vote(1), RPCOption::new(Duration::from_millis(50)))
            .await;
        assert!(matches!(r, Err(RPCError::Network(_))), "{r:?}");
        assert!(client.conn.is_none());
        let r = client
            .vote(vote(2), RPCOption::new(Duration::from_secs(1)))
            .await
            .expect("vote");
        assert_eq!(r.vote, Vote::new(2, 1));

        // Cancelled the way openraft does it: its own timeout drops our future.
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            client.vote(vote(1), RPCOption::new(Duration::from_secs(5))),
        )
        .await;
        assert!(dropped.is_err());
        assert!(client.conn.is_none());
        let r = client
            .vote(vote(3), RPCOption::new(Duration::from_secs(1)))
            .await
            .expect("vote");
        assert_eq!(r.vote, Vote::new(3, 1));
        assert!(client.conn.is_some());
    }

    #[tokio::test]
    async fn a_peer_closing_mid_call_is_a_network_error_and_the_next_call_redials() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let mut client = client_for(&addr);
        // First connection: read the request, then hang up without replying.
        let first = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut conn = Framed::new(stream, codec(NetConfig::default().max_frame));
            let _ = conn.next().await;
            drop(conn);
            listener
        });
        let r = client
            .vote(
                VoteRequest::new(Vote::new(2, 1), None),
                RPCOption::new(Duration::from_secs(1)),
            )
            .await;
        assert!(matches!(r, Err(RPCError::Network(_))), "{r:?}");
        assert!(client.conn.is_none());

        let listener = first.await.expect("join");
        tokio::spawn(echo_voter(listener, Duration::ZERO));
        let r = client
            .vote(
                VoteRequest::new(Vote::new(2, 1), None),
                RPCOption::new(Duration::from_secs(1)),
            )
            .await
            .expect("vote after redial");
        assert_eq!(r.vote, Vote::new(2, 1));
    }

    /// A stand-in follower that answers every append with `Success`, recording the number of
    /// entries each carried; the first append with entries is answered after `delay`.
    async fn recording_follower(
        listener: TcpListener,
        delay: Duration,
        seen: Arc<std::sync::Mutex<Vec<usize>>>,
    ) {
        let delayed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (seen, delayed) = (seen.clone(), delayed.clone());
            tokio::spawn(async move {
                let mut conn = Framed::new(stream, codec(NetConfig::default().max_frame));
                while let Some(Ok(frame)) = conn.next().await {
                    let Ok(RaftRpc::Append(req)) = postcard::from_bytes::<RaftRpc>(&frame) else {
                        return;
                    };
                    seen.lock().expect("lock").push(req.entries.len());
                    if !req.entries.is_empty()
                        && !delayed.swap(true, std::sync::atomic::Ordering::SeqCst)
                    {
                        tokio::time::sleep(delay).await;
                    }
                    let reply: AppendReply = Ok(AppendEntriesResponse::Success);
                    let bytes = postcard::to_stdvec(&reply).expect("encode");
                    if conn.send(Bytes::from(bytes)).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// Entries 10..=12 of leader (3, 1), each carrying `len` payload bytes.
    fn big_append(len: usize) -> AppendEntriesRequest<TypeConfig> {
        let entry = |i| Entry {
            log_id: log_id(3, 1, i),
            payload: EntryPayload::Normal(Batch(vec![Op::Append {
                client: Bytes::from_static(b"c"),
                seq: i,
                payload: Bytes::from(vec![b'x'; len]),
            }])),
        };
        AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(3, 1, 9)),
            entries: (10..=12).map(entry).collect(),
            leader_commit: Some(log_id(3, 1, 9)),
        }
    }

    /// Calls `append_entries` with `req` as openraft does: again from what was acknowledged,
    /// until the follower holds it all. Returns how many calls it took.
    async fn replicate(
        client: &mut PeerClient,
        mut req: AppendEntriesRequest<TypeConfig>,
    ) -> usize {
        for calls in 1..=100 {
            let r = client
                .append_entries(req.clone(), RPCOption::new(Duration::from_secs(5)))
                .await
                .expect("append");
            match r {
                AppendEntriesResponse::Success => return calls,
                AppendEntriesResponse::PartialSuccess(Some(held)) => {
                    req.entries.retain(|e| e.log_id.index > held.index);
                    req.prev_log_id = Some(held);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("never acknowledged")
    }

    #[tokio::test]
    async fn an_append_over_the_byte_budget_goes_as_several_requests_within_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        tokio::spawn(recording_follower(listener, Duration::ZERO, seen.clone()));
        let config = NetConfig {
            append_bytes: 250_000,
            ..NetConfig::default()
        };
        let mut client = PeerClient::new(2, addr, config);
        // Three entries of 100 kB: two fit the budget, the third goes in a request of its own.
        replicate(&mut client, big_append(100_000)).await;
        assert_eq!(*seen.lock().expect("lock"), vec![2, 1]);
        // openraft asking from 9 again sends nothing: the follower acknowledged it all.
        replicate(&mut client, big_append(100_000)).await;
        assert_eq!(*seen.lock().expect("lock"), vec![2, 1]);
        // One entry over the budget still goes, alone: there is no smaller unit.
        let fresh = client.addr.clone();
        let mut client = PeerClient::new(2, fresh, client.config.clone());
        replicate(&mut client, big_append(300_000)).await;
        assert_eq!(*seen.lock().expect("lock"), vec![2, 1, 1, 1, 1]);
    }

    #[tokio::test]
    async fn a_slow_append_keeps_going_heartbeats_pass_it_and_it_is_not_resent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        tokio::spawn(recording_follower(
            listener,
            Duration::from_millis(400),
            seen.clone(),
        ));
        let mut client = PeerClient::new(2, addr, NetConfig::default());
        let short = || RPCOption::new(Duration::from_millis(50));

        // openraft's 50 ms pass with the follower still busy: no progress to report yet.
        let r = client.append_entries(big_append(1000), short()).await;
        assert!(matches!(r, Err(RPCError::Network(_))), "{r:?}");

        // A heartbeat meanwhile is answered over its own connection.
        let heartbeat = AppendEntriesRequest::<TypeConfig> {
            entries: vec![],
            ..big_append(0)
        };
        let r = client
            .append_entries(heartbeat, short())
            .await
            .expect("heartbeat while the append is in flight");
        assert_eq!(r, AppendEntriesResponse::Success);

        // openraft retries the same entries; the call waits for the request in flight and
        // sends nothing again.
        assert_eq!(replicate(&mut client, big_append(1000)).await, 1);
        assert_eq!(*seen.lock().expect("lock"), vec![3, 0]);
    }

    /// Entries `from..=to` of leader (3, 1), as the log store would publish them.
    fn entries(from: u64, to: u64) -> Vec<Entry> {
        let mut req = big_append(10);
        req.entries = (from..=to)
            .map(|i| Entry {
                log_id: log_id(3, 1, i),
                payload: EntryPayload::Normal(Batch(vec![])),
            })
            .collect();
        req.entries
    }

    /// Waits (bounded) until the follower has seen `n` requests.
    async fn seen_requests(seen: &Arc<std::sync::Mutex<Vec<usize>>>, n: usize) -> Vec<usize> {
        for _ in 0..500 {
            let s = seen.lock().expect("lock").clone();
            if s.len() >= n {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen.lock().expect("lock").clone()
    }

    #[tokio::test]
    async fn the_leaders_new_entries_go_out_without_waiting_for_openraft() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        tokio::spawn(recording_follower(listener, Duration::ZERO, seen.clone()));
        let feed = Feed::default();
        let mut client = PeerClient::new(2, addr, NetConfig::default());
        client.feed = Some(feed.clone());
        // openraft's first call starts the chain at 9.
        replicate(&mut client, big_append(10)).await;
        // The log store takes 13 and 14: they go at once, in one request, with no call.
        feed.publish(entries(13, 14));
        assert_eq!(seen_requests(&seen, 2).await, vec![3, 2]);
        // An entry that does not follow on (15 is missing) is not sent; openraft's call for
        // 12..=16 then sends the rest, and nothing twice.
        feed.publish(entries(16, 16));
        let mut req = big_append(10);
        req.prev_log_id = Some(log_id(3, 1, 12));
        req.entries = entries(13, 16);
        replicate(&mut client, req).await;
        assert_eq!(seen.lock().expect("lock").clone(), vec![3, 2, 2]);
        // Entries another leader made (a replica that stopped leading appends them as a
        // follower) are never sent under this leader's vote.
        let mut other = entries(17, 17);
        other[0].log_id = log_id(4, 2, 17);
        feed.publish(other);
        feed.publish(entries(17, 17));
        assert_eq!(seen_requests(&seen, 4).await, vec![3, 2, 2, 1]);
    }

    /// A follower that answers nothing until it has read `hold` requests, then answers all:
    /// only a pipelined leader gets replies from it.
    async fn holding_follower(listener: TcpListener, hold: usize) {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let mut conn = Framed::new(stream, codec(NetConfig::default().max_frame));
        let mut read = 0;
        while let Some(Ok(_)) = conn.next().await {
            read += 1;
            if read == hold {
                for _ in 0..hold {
                    let reply: AppendReply = Ok(AppendEntriesResponse::Success);
                    let bytes = postcard::to_stdvec(&reply).expect("encode");
                    if conn.send(Bytes::from(bytes)).await.is_err() {
                        return;
                    }
                }
            } else if read > hold {
                let reply: AppendReply = Ok(AppendEntriesResponse::Success);
                let bytes = postcard::to_stdvec(&reply).expect("encode");
                let _ = conn.send(Bytes::from(bytes)).await;
            }
        }
    }

    #[tokio::test]
    async fn several_appends_are_in_flight_to_one_follower_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(holding_follower(listener, 3));
        let feed = Feed::default();
        let mut client = PeerClient::new(2, addr, NetConfig::default());
        client.feed = Some(feed.clone());
        let first =
            client.append_entries(big_append(10), RPCOption::new(Duration::from_millis(50)));
        // Nothing is answered before three requests are out, so the call cannot succeed yet.
        assert!(first.await.is_err());
        feed.publish(entries(13, 13));
        feed.publish(entries(14, 14));
        let mut req = big_append(10);
        req.prev_log_id = Some(log_id(3, 1, 9));
        req.entries.extend(entries(13, 14));
        replicate(&mut client, req).await;
    }

    /// A follower that refuses every append.
    async fn refusing_follower(listener: TcpListener) {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut conn = Framed::new(stream, codec(NetConfig::default().max_frame));
                while let Some(Ok(_)) = conn.next().await {
                    let reply: AppendReply = Ok(AppendEntriesResponse::Conflict);
                    let bytes = postcard::to_stdvec(&reply).expect("encode");
                    if conn.send(Bytes::from(bytes)).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    #[tokio::test]
    async fn a_refusal_is_a_conflict_for_the_call_whose_prev_log_id_it_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(refusing_follower(listener));
        let mut client = PeerClient::new(2, addr, NetConfig::default());
        let opt = || RPCOption::new(Duration::from_secs(5));
        let r = client.append_entries(big_append(10), opt()).await;
        assert_eq!(r.expect("answer"), AppendEntriesResponse::Conflict);
        // openraft probes further back: that request is refused too, and reported as such.
        let mut req = big_append(10);
        req.prev_log_id = Some(log_id(3, 1, 5));
        req.entries = entries(6, 12);
        let r = client.append_entries(req, opt()).await;
        assert_eq!(r.expect("answer"), AppendEntriesResponse::Conflict);
    }

    /// A real single-replica Raft on the project's storage, served on a loopback port.
    async fn served_raft() -> (tempfile::TempDir, Raft, String, CancellationToken) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(&dir.path().join("raft")).expect("log store");
        let sm = StateMachine::open(dir.path()).expect("state machine");
        let config = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 10_000,
            election_timeout_max: 20_000,
            ..Default::default()
        }
        .validate()
        .expect("config");
        let raft = Raft::new(1, Arc::new(config), Network::default(), log, sm)
            .await
            .expect("raft");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            raft.clone(),
            shutdown.clone(),
            NetConfig::default().max_frame,
        ));
        (dir, raft, addr, shutdown)
    }

    #[tokio::test]
    async fn server_answers_rpcs_survives_garbage_and_maps_remote_errors() {
        let (_dir, raft, addr, shutdown) = served_raft().await;

        // Garbage: the server closes that connection and keeps serving others.
        let stream = TcpStream::connect(&addr).await.expect("connect");
        let mut raw = Framed::new(stream, codec(NetConfig::default().max_frame));
        raw.send(Bytes::from_static(b"\xff\xff\xff\xff\xff\xffnot postcard"))
            .await
            .expect("send garbage");
        let closed = tokio::time::timeout(Duration::from_secs(5), raw.next())
            .await
            .expect("server must close the connection");
        assert!(closed.as_ref().is_none_or(|r| r.is_err()), "{closed:?}");

        let mut client = client_for(&addr);
        let opt = || RPCOption::new(Duration::from_secs(5));
        let vote = client
            .vote(VoteRequest::new(Vote::new(7, 2), None), opt())
            .await
            .expect("vote");
        assert!(vote.vote_granted, "{vote:?}");
        assert_eq!(vote.vote, Vote::new(7, 2));

        // An empty append from the candidate it just voted for: it has no log, so a conflict
        // only if prev_log_id is set; with none it is a success.
        let heartbeat = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(7, 2),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        };
        let r = client
            .append_entries(heartbeat, opt())
            .await
            .expect("append");
        assert_eq!(r, AppendEntriesResponse::Success);

        // A snapshot chunk at a non-zero offset with no transfer under way is an API error of
        // the remote Raft, which must arrive as such. (With a lower vote than the one it holds,
        // the Raft would just answer with its vote instead.)
        let mut chunk = snapshot_request(4);
        chunk.vote = Vote::new_committed(7, 2);
        let r = client.install_snapshot(chunk, opt()).await;
        assert!(
            matches!(
                r,
                Err(RPCError::RemoteError(RemoteError {
                    target: 2,
                    source: openraft::error::RaftError::APIError(
                        InstallSnapshotError::SnapshotMismatch(_)
                    ),
                    ..
                }))
            ),
            "{r:?}"
        );

        // A stopped Raft answers with a fatal error, again remote, not a network failure.
        raft.shutdown().await.expect("shutdown");
        let r = client
            .vote(VoteRequest::new(Vote::new(8, 2), None), opt())
            .await;
        assert!(
            matches!(
                r,
                Err(RPCError::RemoteError(RemoteError {
                    source: openraft::error::RaftError::Fatal(_),
                    ..
                }))
            ),
            "{r:?}"
        );

        // Shutdown ends the accept loop and the open connection. A replica restarted on the
        // same address is then reached on the first try: the client notices its connection
        // was closed and redials instead of failing the call.
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(client.conn.is_some());
        let listener = TcpListener::bind(&addr).await.expect("rebind");
        tokio::spawn(echo_voter(listener, Duration::ZERO));
        let r = client
            .vote(VoteRequest::new(Vote::new(9, 2), None), opt())
            .await
            .expect("vote to the restarted replica");
        assert_eq!(r.vote, Vote::new(9, 2));
    }
}
