//! Raft RPCs between replicas: postcard frames over TCP.
//!
//! Each message is one frame of a length-delimited codec, so a large append batch or snapshot
//! chunk is one read, and a broken peer cannot make us buffer without bound past
//! [`MAX_FRAME`]. A request is a [`RaftRpc`]; the reply is the receiving Raft's whole `Result`,
//! so a remote Raft error reaches openraft as `RPCError::RemoteError` rather than being
//! flattened into a network failure. postcard is not self-describing, which is fine here: both
//! ends are the same binary version, and every openraft type on the wire round-trips (tested
//! below).
//!
//! The client side connects lazily (openraft creates clients for peers that may not be up yet)
//! and keeps one connection per client. openraft wraps calls in timeouts and may drop a call
//! mid-exchange; the next call on that connection would then read the previous call's late
//! reply. So a `busy` flag is set for the duration of an exchange, and a call that finds it
//! still set throws the connection away and dials again. Likewise a pooled connection with
//! anything readable before we have sent (EOF from a restarted peer, say) is replaced rather
//! than used, so a peer's restart does not cost a failed call.
//!
//! Errors map to what openraft does with them:
//! - the peer cannot be dialled (refused, connect timeout) -> `Unreachable`, which makes the
//!   replication stream back off for [`PeerClient`]'s `backoff()` before retrying;
//! - any failure on an established connection, an undecodable reply, or the call's `hard_ttl`
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
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::types::{Node, NodeId, Raft, RaftError, RpcError, TypeConfig};

/// Largest frame accepted in either direction. Append batches are at most
/// `max_payload_entries` (64) entries of group-committed client data, and snapshot chunks are
/// openraft's `snapshot_max_chunk_size`; this leaves ample headroom while still bounding what
/// a confused peer can make us allocate.
pub const MAX_FRAME: usize = 512 * 1024 * 1024;

/// A dead peer on a LAN refuses at once; a longer wait only delays noticing a partitioned one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Retry interval after `Unreachable`. openraft's default is 500 ms, which would leave a
/// restarted replica without entries for half a second; dialling loopback or a LAN is cheap.
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(100);

/// One request frame. The reply frame is the postcard of the matching `Raft` method's
/// `Result`.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
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
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        // No dialling here: this must not block or fail, and the peer may well be down.
        let addr = self.routes.get(&target).unwrap_or(&node.raft_addr).clone();
        PeerClient {
            target,
            addr,
            conn: None,
            busy: false,
        }
    }
}

/// Raft RPCs to one peer over one lazily opened connection.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    conn: Option<Framed<TcpStream, LengthDelimitedCodec>>,
    /// Set while a request is out and its reply not yet read; see the module docs.
    busy: bool,
}

/// Why an exchange failed, before mapping to openraft's error types.
enum Failure {
    Unreachable(io::Error),
    Network(io::Error),
}

impl PeerClient {
    /// Sends `rpc` and reads one reply frame, dialling first if there is no usable connection.
    async fn exchange<R: DeserializeOwned>(&mut self, rpc: &RaftRpc) -> Result<R, Failure> {
        if self.busy {
            // The previous call was cancelled mid-exchange; its reply may still be in flight
            // and would be taken for ours.
            self.conn = None;
            self.busy = false;
        }
        if let Some(conn) = &mut self.conn {
            // Between exchanges a peer has nothing to say, so anything readable now is EOF, an
            // error or junk: in practice the peer restarted. Redialling now keeps that from
            // costing a failed call and a heartbeat interval.
            if conn.next().now_or_never().is_some() {
                self.conn = None;
            }
        }
        let body = postcard::to_stdvec(rpc).map_err(|e| Failure::Network(io::Error::other(e)))?;
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let stream =
                    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return Err(Failure::Unreachable(e)),
                        Err(_) => {
                            return Err(Failure::Unreachable(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("connecting to {} timed out", self.addr),
                            )))
                        }
                    };
                // Best effort: without it heartbeats wait on Nagle, but they still work.
                let _ = stream.set_nodelay(true);
                self.conn.insert(Framed::new(stream, codec()))
            }
        };
        self.busy = true;
        let reply: io::Result<bytes::BytesMut> = async {
            conn.send(bytes::Bytes::from(body)).await?;
            match conn.next().await {
                Some(frame) => frame,
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection",
                )),
            }
        }
        .await;
        self.busy = false;
        let decoded = reply.and_then(|frame| {
            postcard::from_bytes(&frame).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("undecodable reply: {e}"),
                )
            })
        });
        if decoded.is_err() {
            // The stream may be mid-frame or out of step with us; only a new one is known good.
            self.conn = None;
        }
        decoded.map_err(Failure::Network)
    }

    /// One RPC within the caller's deadline, errors mapped for openraft.
    async fn call<T, E>(&mut self, rpc: RaftRpc, option: &RPCOption) -> Result<T, RpcError<E>>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let target = self.target;
        // `RPCOption` asks the network to honour `hard_ttl`. openraft mostly wraps us in the
        // same deadline anyway; whichever fires first, a cancelled exchange leaves `busy` set.
        let outcome = tokio::time::timeout(
            option.hard_ttl(),
            self.exchange::<Result<T, RaftError<E>>>(&rpc),
        )
        .await;
        match outcome {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(remote))) => Err(RPCError::RemoteError(RemoteError::new(target, remote))),
            Ok(Err(Failure::Unreachable(e))) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Ok(Err(Failure::Network(e))) => Err(RPCError::Network(NetworkError::new(&e))),
            Err(_) => {
                // `busy` stays set if a request was out, so the next call redials. Not
                // `RPCError::Timeout`: that wants our own node id, which the factory lacks.
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "raft rpc to {target} timed out after {:?}",
                        option.hard_ttl()
                    ),
                );
                Err(RPCError::Network(NetworkError::new(&e)))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        self.call(RaftRpc::Append(rpc), &option).await
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
/// are dropped then too.
pub async fn serve(listener: TcpListener, raft: Raft, shutdown: CancellationToken) {
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
                _ = serve_peer(Framed::new(stream, codec()), raft) => {}
            }
        });
    }
}

/// Handles one peer's requests in order: the client never has more than one outstanding.
async fn serve_peer(mut conn: Framed<TcpStream, LengthDelimitedCodec>, raft: Raft) {
    let peer = conn
        .get_ref()
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    while let Some(frame) = conn.next().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // Resets are routine (a peer restarting); oversized frames are not.
                if e.kind() == io::ErrorKind::InvalidData {
                    tracing::warn!("raft connection from {peer}: {e}; closing");
                } else {
                    tracing::debug!("raft connection from {peer} closed: {e}");
                }
                return;
            }
        };
        let rpc: RaftRpc = match postcard::from_bytes(&frame) {
            Ok(r) => r,
            Err(e) => {
                // Nothing after a bad frame can be trusted to be in step: close, let it redial.
                tracing::warn!(
                    "undecodable raft frame ({} bytes) from {peer}: {e}; closing",
                    frame.len()
                );
                return;
            }
        };
        let reply = match rpc {
            RaftRpc::Append(req) => postcard::to_stdvec(&raft.append_entries(req).await),
            RaftRpc::Vote(req) => postcard::to_stdvec(&raft.vote(req).await),
            RaftRpc::Snapshot(req) => postcard::to_stdvec(&raft.install_snapshot(req).await),
        };
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // The client would wait for a reply we cannot give; closing fails it at once.
                tracing::warn!("encoding a raft reply to {peer} failed: {e}; closing");
                return;
            }
        };
        if let Err(e) = conn.send(bytes::Bytes::from(reply)).await {
            tracing::debug!("raft connection from {peer} closed while replying: {e}");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_store::LogStore;
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
        PeerClient {
            target: 2,
            addr: addr.into(),
            conn: None,
            busy: false,
        }
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
                let mut conn = Framed::new(stream, codec());
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
        // reply to term 1 exists, so only `busy` can tell that the connection is out of step.
        let r = client
            .vote(vote(1), RPCOption::new(Duration::from_millis(50)))
            .await;
        assert!(matches!(r, Err(RPCError::Network(_))), "{r:?}");
        assert!(client.busy);
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
        assert!(client.busy);
        let r = client
            .vote(vote(3), RPCOption::new(Duration::from_secs(1)))
            .await
            .expect("vote");
        assert_eq!(r.vote, Vote::new(3, 1));
        assert!(!client.busy);
    }

    #[tokio::test]
    async fn a_peer_closing_mid_call_is_a_network_error_and_the_next_call_redials() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let mut client = client_for(&addr);
        // First connection: read the request, then hang up without replying.
        let first = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut conn = Framed::new(stream, codec());
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
        tokio::spawn(serve(listener, raft.clone(), shutdown.clone()));
        (dir, raft, addr, shutdown)
    }

    #[tokio::test]
    async fn server_answers_rpcs_survives_garbage_and_maps_remote_errors() {
        let (_dir, raft, addr, shutdown) = served_raft().await;

        // Garbage: the server closes that connection and keeps serving others.
        let stream = TcpStream::connect(&addr).await.expect("connect");
        let mut raw = Framed::new(stream, codec());
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
