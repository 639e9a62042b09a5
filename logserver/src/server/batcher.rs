//! The group-commit batcher: gathers concurrent write operations into Raft entries.
//!
//! Invariants: operations are proposed in the order they were submitted (a connection's
//! pipelined appends land in the log in the order it sent them; the kvstore relies on it); every
//! submitted operation gets exactly one reply (its result, `REDIRECT`, or `ERR UNAVAILABLE`);
//! at most `max_inflight` batches await their majority at once.

use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

use protocol::hops::{self, Hop};
use protocol::{ErrorCode, Response};

use crate::log_store::FlushGate;
use crate::types::{Batch, Node, NodeId, Op, OpResult, Raft};

/// A batch closes at this many bytes of payload or this many operations.
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;
const BATCH_OPS: usize = 8192;

/// How to turn an operation's outcome into a reply line.
#[derive(Debug, Clone, Copy)]
pub(super) enum Render {
    /// `OK <logical index>`.
    Append,
    /// OK with the staged length after this chunk.
    CkptPut { end: u64 },
    /// `OK`.
    CkptCommit,
}

struct Pending {
    op: Op,
    render: Render,
    reply: oneshot::Sender<Response>,
    /// When the request was read (`hops::now_if_on`, 0 when not tracing).
    t_recv: u64,
}

/// Gathers concurrent write operations into Raft entries.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
}

impl Batcher {
    /// `gate`, the local log's flush counts, lets a batch grow while the one before is being
    /// flushed (see `run_batcher`).
    pub fn start(raft: Raft, max_inflight: usize, gate: Option<Arc<FlushGate>>) -> Batcher {
        let (tx, rx) = mpsc::channel(64 * 1024);
        tokio::spawn(run_batcher(raft, rx, max_inflight.max(1), gate));
        Batcher { tx }
    }

    pub(super) async fn submit(&self, op: Op, render: Render) -> oneshot::Receiver<Response> {
        let (reply, rx) = oneshot::channel();
        let t_recv = hops::now_if_on();
        let pending = Pending {
            op,
            render,
            reply,
            t_recv,
        };
        if let Err(mpsc::error::SendError(p)) = self.tx.send(pending).await {
            let _ = p
                .reply
                .send(Response::err(ErrorCode::Unavailable, "shutting down"));
        }
        rx
    }
}

fn op_size(op: &Op) -> usize {
    match op {
        Op::Append {
            client, payload, ..
        } => client.len() + payload.len() + 16,
        Op::CkptChunk { data, .. } => data.len() + 16,
        Op::CkptCommit { .. } => 32,
    }
}

/// How long a batch waits at most for the one before to be flushed (see [`run_batcher`]).
const GATE_LIMIT: std::time::Duration = std::time::Duration::from_millis(5);

/// Proposes batches in arrival order, up to `max_inflight` awaiting their majority. openraft
/// 0.9's core appends one entry at a time and waits for its fdatasync before the next, so a
/// batch proposed while the one before is still being flushed would only queue behind it, and
/// would hold less than it could: with `gate`, each proposal waits (at most [`GATE_LIMIT`])
/// until the one before has been appended and flushed, while operations gather for the next.
async fn run_batcher(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    max_inflight: usize,
    gate: Option<Arc<FlushGate>>,
) {
    let slots = Arc::new(Semaphore::new(max_inflight));
    while let Some(first) = rx.recv().await {
        // Waiting for a slot is what lets the next batch grow while earlier ones commit.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = op_size(&first.op);
        let mut batch = vec![first];
        while bytes < BATCH_BYTES && batch.len() < BATCH_OPS {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += op_size(&p.op);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        // Propose here, in arrival order: the log order of a connection's pipelined appends
        // must be the order it sent them (the kvstore relies on it). Only the wait for the
        // majority runs in its own task, so batches overlap.
        let mut ops = Vec::with_capacity(batch.len());
        let mut waiters = Vec::with_capacity(batch.len());
        for p in batch {
            ops.push(p.op);
            waiters.push((p.render, p.reply, p.t_recv));
        }
        let seen = gate.as_ref().map(|g| g.appends());
        let t_propose = hops::now_if_on();
        let proposed = raft.client_write_ff(Batch(ops)).await;
        if let (Some(g), Some(seen), Ok(_)) = (&gate, seen, &proposed) {
            g.settled_after(seen, GATE_LIMIT).await;
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let result = match proposed {
                Ok(rx) => match rx.await {
                    Ok(r) => r.map_err(RaftError::APIError),
                    Err(_) => Err(RaftError::Fatal(openraft::error::Fatal::Stopped)),
                },
                Err(fatal) => Err(RaftError::Fatal(fatal)),
            };
            answer_batch(&raft, waiters, result, t_propose).await;
            drop(permit);
        });
    }
}

/// How to answer one operation of a batch, and when its request was read (for `--trace-hops`).
type Waiter = (Render, oneshot::Sender<Response>, u64);

async fn answer_batch(
    raft: &Raft,
    waiters: Vec<Waiter>,
    result: Result<
        openraft::raft::ClientWriteResponse<crate::types::TypeConfig>,
        RaftError<NodeId, ClientWriteError<NodeId, Node>>,
    >,
    t_propose: u64,
) {
    match result {
        Ok(resp) => {
            let results = resp.data.0;
            let raft_index = resp.log_id.index;
            // The Raft index is known only now: the marks of when the batch was proposed and
            // its requests read are recorded with the times taken then.
            hops::mark_at(Hop::LogPropose, raft_index, 0, t_propose);
            let mut checkpointed = false;
            for (i, (render, reply, t_recv)) in waiters.into_iter().enumerate() {
                let r = match results.get(i) {
                    Some(r) => r.clone(),
                    None => OpResult::Rejected("internal: missing result".into()),
                };
                if let OpResult::Appended(logical) | OpResult::Duplicate(logical) = r {
                    hops::mark_at(Hop::LogRecv, logical, raft_index, t_recv);
                }
                checkpointed |= matches!((render, &r), (Render::CkptCommit, OpResult::Done));
                let _ = reply.send(render_result(render, r));
            }
            hops::mark(Hop::LogReply, raft_index, 0);
            if checkpointed {
                // The checkpoint shrank the state: snapshot now so the Raft log can be purged.
                let _ = raft.trigger().snapshot().await;
            }
        }
        Err(e) => {
            let resp = match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => match f.leader_node {
                    Some(node) => Response::Redirect(node.dksp_addr),
                    None => Response::err(ErrorCode::Unavailable, "no leader elected; retry"),
                },
                e => Response::err(ErrorCode::Unavailable, e.to_string()),
            };
            for (_, reply, _) in waiters {
                let _ = reply.send(resp.clone());
            }
        }
    }
}

fn render_result(render: Render, r: OpResult) -> Response {
    match (render, r) {
        (_, OpResult::Rejected(why)) => Response::err(ErrorCode::Rejected, why),
        (Render::Append, OpResult::Appended(i) | OpResult::Duplicate(i)) => {
            Response::Ok(vec![Bytes::from(i.to_string())])
        }
        (Render::CkptPut { end }, OpResult::Done) => {
            Response::Ok(vec![Bytes::from(end.to_string())])
        }
        (Render::CkptCommit, OpResult::Done) => Response::ok(),
        (_, other) => Response::err(ErrorCode::Internal, format!("unexpected result {other:?}")),
    }
}
