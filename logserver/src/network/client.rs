//! [`PeerClient`]: openraft's handle on one peer (see the [module docs](super)).
//!
//! The client side connects lazily (openraft creates clients for peers that may not be up
//! yet). Votes and snapshot chunks are one exchange per call within the call's `hard_ttl` (a
//! snapshot chunk gets `install_snapshot_timeout`), over one connection owned by whichever
//! exchange is running; a call cancelled by openraft leaves its exchange task to finish or
//! time out with the connection, so the next call dials afresh and can never read the previous
//! call's late reply. A pooled connection with anything readable before we have sent (EOF from
//! a restarted peer, say) is replaced rather than used, so a peer's restart does not cost a
//! failed call. Heartbeats have a connection of their own; appends go through the pipeline.

use futures::{FutureExt, SinkExt, StreamExt};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use std::io;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Conn, NetConfig, RaftRpc, UNREACHABLE_BACKOFF};
use crate::pipeline::{Fault, Feed, PipeConfig, Pipeline};
use crate::types::{NodeId, RaftError, RpcError, TypeConfig};

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
    pub(super) target: NodeId,
    pub(super) addr: String,
    pub(super) config: NetConfig,
    /// The idle connection for votes and snapshot chunks, if any; an exchange takes it and
    /// gives it back.
    pub(super) conn: Option<Conn>,
    /// The connection heartbeats use; see [`Self::heartbeat`].
    hb_conn: Option<Conn>,
    /// Appends, started by the first one; see [`crate::pipeline`].
    pipeline: Option<Pipeline>,
    pub(super) feed: Option<Feed>,
}

/// Dials `addr`, sends `body` over `conn` (or a new connection) and reads one reply frame.
async fn exchange(conn: Option<Conn>, addr: &str, body: bytes::Bytes, net: NetConfig) -> Outcome {
    let conn = conn.and_then(|mut c| {
        // Between exchanges a peer has nothing to say, so anything readable now is EOF, an
        // error or junk: in practice the peer restarted. Redialling now keeps that from
        // costing a failed call and a heartbeat interval.
        c.next().now_or_never().is_none().then_some(c)
    });
    let mut conn = match conn {
        Some(c) => c,
        None => match super::dial(addr, &net).await {
            Ok(c) => c,
            // Refused, timed out, or the handshake failed (a peer of another cluster, or run
            // with other credentials): unreachable for Raft's purposes, logged by the caller.
            Err(e) => return (None, Err(Failure::Unreachable(e))),
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

pub(super) type AppendReply = Result<AppendEntriesResponse<NodeId>, RaftError>;

impl PeerClient {
    pub(super) fn new(target: NodeId, addr: String, config: NetConfig) -> PeerClient {
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
        let net = self.config.clone();
        Ok(tokio::spawn(async move {
            let body = bytes::Bytes::from(body);
            match tokio::time::timeout(deadline, exchange(conn, &addr, body, net)).await {
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
