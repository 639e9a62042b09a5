//! Raft RPCs between replicas: postcard frames over TCP.
//!
//! Each message is one frame of a length-delimited codec (so a large append batch or snapshot
//! chunk is one read, and a broken peer cannot make us buffer without bound past
//! [`MAX_FRAME`]). A request is a [`RaftRpc`]; the reply is the receiving Raft's whole `Result`,
//! so a remote Raft error reaches openraft as `RPCError::RemoteError`.
//!
//! The client side connects lazily and keeps one connection per peer. openraft wraps calls in
//! timeouts and may drop a call mid-exchange; the next call would then read the previous call's
//! late reply. So a `busy` flag is set for the duration of an exchange, and a call that finds it
//! still set throws the connection away and dials again.

use futures::{SinkExt, StreamExt};
use openraft::error::{InstallSnapshotError, NetworkError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
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

/// Largest frame accepted: append batches are at most 64 entries of a few MiB each.
pub const MAX_FRAME: usize = 512 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
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

/// Creates a [`PeerClient`] per target; openraft asks for one per replication stream and vote.
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            target,
            addr: node.raft_addr.clone(),
            conn: None,
            busy: false,
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    conn: Option<Framed<TcpStream, LengthDelimitedCodec>>,
    busy: bool,
}

/// Why an exchange failed, before mapping to openraft's error types.
enum Failure {
    Unreachable(io::Error),
    Network(io::Error),
}

impl PeerClient {
    async fn exchange<R: DeserializeOwned>(&mut self, rpc: &RaftRpc) -> Result<R, Failure> {
        if self.busy {
            // The previous call was cancelled mid-exchange; its reply may still be in flight.
            self.conn = None;
        }
        if self.conn.is_none() {
            let stream =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(Failure::Unreachable(e)),
                    Err(_) => return Err(Failure::Unreachable(io::ErrorKind::TimedOut.into())),
                };
            let _ = stream.set_nodelay(true);
            self.conn = Some(Framed::new(stream, codec()));
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(Failure::Unreachable(io::ErrorKind::NotConnected.into()));
        };
        let body = postcard::to_stdvec(rpc).map_err(|e| Failure::Network(io::Error::other(e)))?;
        self.busy = true;
        let reply: io::Result<bytes::BytesMut> = async {
            conn.send(bytes::Bytes::from(body)).await?;
            match conn.next().await {
                Some(frame) => frame,
                None => Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
        .await;
        let frame = match reply {
            Ok(f) => f,
            Err(e) => {
                self.conn = None;
                self.busy = false;
                return Err(Failure::Network(e));
            }
        };
        self.busy = false;
        postcard::from_bytes(&frame).map_err(|e| {
            self.conn = None;
            Failure::Network(io::Error::other(format!("undecodable reply: {e}")))
        })
    }

    /// One RPC with the caller's deadline, errors mapped for openraft.
    async fn call<T, E>(&mut self, rpc: RaftRpc, option: &RPCOption) -> Result<T, RpcError<E>>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let target = self.target;
        let outcome = tokio::time::timeout(
            option.hard_ttl(),
            self.exchange::<Result<T, RaftError<E>>>(&rpc),
        )
        .await;
        match outcome {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(remote))) => Err(openraft::error::RPCError::RemoteError(RemoteError::new(
                target, remote,
            ))),
            Ok(Err(Failure::Unreachable(e))) => {
                Err(openraft::error::RPCError::Unreachable(Unreachable::new(&e)))
            }
            Ok(Err(Failure::Network(e))) => {
                Err(openraft::error::RPCError::Network(NetworkError::new(&e)))
            }
            Err(_) => {
                // `busy` stays set, so the connection is replaced on the next call.
                let e = io::Error::new(io::ErrorKind::TimedOut, "raft rpc timed out");
                Err(openraft::error::RPCError::Network(NetworkError::new(&e)))
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

    fn backoff(&self) -> openraft::network::Backoff {
        // Peers are on loopback or a LAN: retry a restarted replica quickly.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}

/// Serves Raft RPCs from the other replicas until `shutdown` fires.
pub async fn serve(listener: TcpListener, raft: Raft, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("raft accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
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

async fn serve_peer(mut conn: Framed<TcpStream, LengthDelimitedCodec>, raft: Raft) {
    while let Some(frame) = conn.next().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("raft connection closed: {e}");
                return;
            }
        };
        let rpc: RaftRpc = match postcard::from_bytes(&frame) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    "undecodable raft frame ({} bytes): {e}; closing",
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
                tracing::warn!("encoding a raft reply failed: {e}");
                return;
            }
        };
        if conn.send(bytes::Bytes::from(reply)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Batch, Entry, Op};
    use bytes::Bytes;
    use openraft::testing::log_id;
    use openraft::{EntryPayload, Membership, Vote};
    use std::collections::{BTreeMap, BTreeSet};

    fn roundtrip(rpc: &RaftRpc) -> RaftRpc {
        let bytes = postcard::to_stdvec(rpc).expect("encode");
        postcard::from_bytes(&bytes).expect("decode")
    }

    #[test]
    fn requests_and_replies_roundtrip_through_postcard() {
        let nodes = BTreeMap::from([(
            1,
            Node {
                raft_addr: "a".into(),
                dksp_addr: "b".into(),
            },
        )]);
        let membership = Membership::new(vec![BTreeSet::from([1])], nodes);
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(3, 1, 9)),
            entries: vec![
                Entry {
                    log_id: log_id(3, 1, 10),
                    payload: EntryPayload::Normal(Batch(vec![Op::Append {
                        client: Bytes::from_static(b"c"),
                        seq: 1,
                        payload: Bytes::from_static(b"\x00\xffpayload"),
                    }])),
                },
                Entry {
                    log_id: log_id(3, 1, 11),
                    payload: EntryPayload::Membership(membership),
                },
                Entry {
                    log_id: log_id(3, 1, 12),
                    payload: EntryPayload::Blank,
                },
            ],
            leader_commit: Some(log_id(3, 1, 8)),
        };
        match roundtrip(&RaftRpc::Append(req.clone())) {
            RaftRpc::Append(back) => {
                assert_eq!(back.entries, req.entries);
                assert_eq!(back.vote, req.vote);
                assert_eq!(back.prev_log_id, req.prev_log_id);
            }
            _ => panic!("wrong variant"),
        }
        let vote = VoteRequest::new(Vote::new(4, 2), Some(log_id(3, 1, 12)));
        assert!(matches!(roundtrip(&RaftRpc::Vote(vote.clone())), RaftRpc::Vote(v) if v == vote));

        let ok: Result<AppendEntriesResponse<NodeId>, RaftError> =
            Ok(AppendEntriesResponse::HigherVote(Vote::new(5, 3)));
        let back: Result<AppendEntriesResponse<NodeId>, RaftError> =
            postcard::from_bytes(&postcard::to_stdvec(&ok).unwrap()).unwrap();
        assert_eq!(
            back.unwrap(),
            AppendEntriesResponse::HigherVote(Vote::new(5, 3))
        );
        let err: Result<VoteResponse<NodeId>, RaftError> = Err(openraft::error::RaftError::Fatal(
            openraft::error::Fatal::Stopped,
        ));
        let back: Result<VoteResponse<NodeId>, RaftError> =
            postcard::from_bytes(&postcard::to_stdvec(&err).unwrap()).unwrap();
        assert!(back.is_err());
    }

    #[tokio::test]
    async fn unreachable_peer_is_reported_as_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut client = Network
            .new_client(
                2,
                &Node {
                    raft_addr: format!("127.0.0.1:{port}"),
                    dksp_addr: String::new(),
                },
            )
            .await;
        let r = client
            .vote(
                VoteRequest::new(Vote::new(1, 1), None),
                RPCOption::new(Duration::from_secs(1)),
            )
            .await;
        assert!(
            matches!(r, Err(openraft::error::RPCError::Unreachable(_))),
            "{r:?}"
        );
    }
}
