//! The receiving side of Raft RPCs (see the [module docs](super)).

use futures::{SinkExt, StreamExt};
use openraft::raft::AppendEntriesRequest;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::{codec, Conn, RaftRpc};
use crate::types::{Raft, TypeConfig};
use protocol::hops::{self, Hop};
use protocol::trust::Trust;

/// Serves Raft RPCs from the other replicas until `shutdown` fires; connections in progress
/// are dropped then too. Frames over `max_frame` close their connection unread. A connection
/// first proves membership ([`Trust::raft_admit`]: TLS with a cluster certificate, the secret's
/// handshake, or loopback without credentials); one that does not is dropped, having sent at
/// most [`protocol::trust::RAFT_PREAUTH_BYTES`].
pub async fn serve(
    listener: TcpListener,
    raft: Raft,
    shutdown: CancellationToken,
    max_frame: usize,
    trust: Trust,
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
        let trust = trust.clone();
        tokio::spawn(async move {
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string());
            let admitted = async {
                let mut s = trust.accept(stream).await?;
                trust.raft_admit(&mut s).await?;
                Ok::<_, io::Error>(s)
            };
            let stream = tokio::select! {
                _ = token.cancelled() => return,
                s = admitted => match s {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("raft connection from {peer} refused: {e}");
                        return;
                    }
                },
            };
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
pub(super) fn merge(
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

/// `--trace-hops`: when an append's entries were taken from the connection.
fn mark_recv(req: &AppendEntriesRequest<TypeConfig>) {
    if let (Some(f), Some(l)) = (req.entries.first(), req.entries.last()) {
        hops::mark_range(Hop::RaftRecv, f.log_id.index, l.log_id.index, 0);
    }
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
            if let RaftRpc::Append(req) = &rpc {
                mark_recv(req);
            }
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
