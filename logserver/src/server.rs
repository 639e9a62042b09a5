//! DKSP for clients of the log: `APPEND`, `READ`, `TAIL`, checkpoints, membership, `STATUS`.
//!
//! What the log takes is validated, even from a cluster member: an `APPEND` payload must be
//! kvstore records (unless `--any-payload`), a `CKPT_COMMIT` a kvstore checkpoint of entries
//! that exist (`state_machine`), and a membership change must leave a majority of reachable
//! voters (`membership`).
//!
//! Writes go through one [`Batcher`]: every operation that arrives while earlier batches are in
//! flight joins the next batch, and a batch is one Raft entry, so one fsync on each replica
//! covers many clients (group commit). Up to `max_inflight` batches are in flight at once so the
//! leader's fsync of one overlaps the replication of another.
//!
//! A connection may pipeline (the shared loop of [`protocol::handler`]): replies wait in a FIFO
//! and are written in request order as their batches commit. Reads (`READ`, `TAIL`, `CKPT_INFO`, `CKPT_READ`) are served by any replica
//! from its applied state, so they see committed entries only; writes on a follower are answered
//! with `REDIRECT <leader's DKSP address>`.

use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use protocol::handler::{self, Cx, Flow, Handler};
use protocol::hops;
use protocol::log::Request;
use protocol::{Connection, ErrorCode, Response};

use crate::membership;
use crate::state_machine::{ReadError, StateMachine};
use crate::types::{Node, NodeId, Op, Raft};

/// Entries one `READ` returns at most; read again from the last index + 1 for more.
pub const READ_MAX: u64 = 10_000;
/// A `READ` page stops once it holds this many bytes of payload (at least one entry).
pub const READ_BYTES: usize = 2 * 1024 * 1024;

mod batcher;
use batcher::Render;
pub use batcher::{Batcher, BATCH_BYTES};

/// What a connection handler needs.
pub struct LogServer {
    /// This replica's id.
    pub id: NodeId,
    /// This replica's Raft node.
    pub raft: Raft,
    /// The applied log, for `READ`, `TAIL`, `STATUS` and checkpoints.
    pub sm: StateMachine,
    /// Group commit: gathers concurrent `APPEND`s into one Raft entry.
    pub batcher: Batcher,
    /// `--max-checkpoint-mib` in bytes: a `CKPT_PUT` chunk whose end would pass this is
    /// refused `ERR TOO_LARGE` (checked on the leader before proposing, so the staged upload
    /// every replica holds in memory stays within it plus the chunks already in flight).
    pub max_checkpoint_bytes: u64,
    /// Refuse an `APPEND` whose payload is not kvstore records (`protocol::kvlog::check_entry`),
    /// so that a writer cannot put into the log what the kvstore could not replay; off with
    /// `--any-payload`, for tests and benchmarks of the log alone.
    pub check_payloads: bool,
}

impl LogServer {
    /// `Ok` on the leader; otherwise the reply to give instead (REDIRECT or UNAVAILABLE).
    fn check_leader(&self) -> Result<(), Response> {
        // On every write: borrow the metrics, do not clone them (they hold maps).
        let m = self.raft.metrics();
        let m = m.borrow();
        match m.current_leader {
            Some(l) if l == self.id && m.state == ServerState::Leader => Ok(()),
            Some(l) => match m.membership_config.membership().get_node(&l) {
                Some(node) => Err(Response::Redirect(node.dksp_addr.clone())),
                None => Err(Response::err(
                    ErrorCode::Unavailable,
                    format!("leader {l} has no known address"),
                )),
            },
            None => Err(Response::err(
                ErrorCode::Unavailable,
                "no leader elected; retry",
            )),
        }
    }

    fn status(&self) -> Response {
        let m = self.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let leader = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
            .map(|n| n.dksp_addr)
            .unwrap_or_else(|| "none".into());
        let at = self.sm.positions();
        let voters: Vec<String> = m
            .membership_config
            .membership()
            .voter_ids()
            .map(|v| v.to_string())
            .collect();
        Response::status(&[
            ("id", m.id.to_string()),
            ("role", role.to_string()),
            ("term", m.current_term.to_string()),
            ("leader", leader),
            ("commit", at.last.to_string()),
            ("first", at.first.to_string()),
            ("last", at.last.to_string()),
            ("raft_applied", opt(at.last_applied.map(|a| a.index))),
            ("raft_last", opt(m.last_log_index)),
            ("snapshot", opt(m.snapshot.map(|s| s.index))),
            ("purged", opt(m.purged.map(|s| s.index))),
            ("voters", voters.join(",")),
        ])
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "none".into(), |v| v.to_string())
}

enum Reply {
    Ready(Vec<Response>),
    Waiting(oneshot::Receiver<Response>),
}

/// The logserver's side of one connection: writes are pipelined (their replies wait for their
/// batches), reads wait for this connection's earlier writes, `TAIL` takes the connection over.
struct Conn {
    srv: Arc<LogServer>,
}

impl Handler for Conn {
    type Request = Request;

    async fn dispatch(&mut self, req: Request, cx: &mut Cx<'_>) -> io::Result<Flow> {
        match req {
            Request::Tail { from, prefix } => {
                // Answer everything before, then stream until the client goes away.
                cx.settle().await;
                cx.conn.flush().await?;
                tail(cx.conn, &self.srv, from, prefix.as_deref(), cx.shutdown).await;
                Ok(Flow::Dropped)
            }
            Request::Quit => {
                cx.settle().await;
                cx.conn.flush().await?;
                cx.reply(Response::ok());
                Ok(Flow::Close)
            }
            Request::Status if !cx.conn.is_member() => {
                // Before membership: enough for a health check, nothing about the log.
                cx.reply(Response::status(&[
                    ("id", self.srv.id.to_string()),
                    ("role", "logserver".to_string()),
                    ("member", "no".to_string()),
                ]));
                Ok(Flow::Continue)
            }
            req => {
                // A read sees this connection's earlier writes: wait for them first.
                let is_write = matches!(
                    req,
                    Request::Append { .. }
                        | Request::CkptPut { .. }
                        | Request::CkptCommit { .. }
                        | Request::AddReplica { .. }
                        | Request::RemoveReplica { .. }
                );
                if !is_write && cx.replies.waiting() > 0 {
                    cx.settle().await;
                    cx.conn.flush().await?;
                }
                match dispatch(&self.srv, req).await {
                    Reply::Ready(lines) => cx.reply_lines(lines),
                    Reply::Waiting(rx) => cx.reply_later(
                        Box::pin(async move {
                            rx.await.unwrap_or_else(|_| {
                                Response::err(ErrorCode::Internal, "write was dropped")
                            })
                        }),
                        0,
                    ),
                }
                Ok(Flow::Continue)
            }
        }
    }
}

/// Serves one client connection until it closes, sends QUIT, or the server shuts down.
pub async fn handle(conn: Connection, srv: Arc<LogServer>, shutdown: CancellationToken) {
    handler::run(conn, Conn { srv }, shutdown).await
}

async fn dispatch(srv: &LogServer, req: Request) -> Reply {
    let ready = |r: Response| Reply::Ready(vec![r]);
    match req {
        Request::Append {
            client,
            seq,
            payload,
        } => {
            if let Err(r) = srv.check_leader() {
                return ready(r);
            }
            // On the leader only, before proposing: one pass over the payload without
            // copying it (see docs/dksp.md for the cost).
            if srv.check_payloads {
                if let Err(e) = protocol::kvlog::check_entry(&payload) {
                    return ready(Response::err(
                        ErrorCode::Rejected,
                        format!("payload is not kvstore records: {e}"),
                    ));
                }
            }
            // A retry of an append that already committed: answer without touching Raft. (A
            // retry racing its original is caught when the batch is applied.)
            if let Some(index) = srv.sm.lookup(&client, seq) {
                return ready(Response::Ok(vec![Bytes::from(index.to_string())]));
            }
            let op = Op::Append {
                client,
                seq,
                payload,
            };
            Reply::Waiting(srv.batcher.submit(op, Render::Append).await)
        }
        Request::Read { from, max } => {
            let max = max.unwrap_or(READ_MAX).min(READ_MAX) as usize;
            match srv.sm.read(from, max, READ_BYTES) {
                Ok(entries) => {
                    let mut lines: Vec<Response> = entries
                        .into_iter()
                        .map(|(i, p)| Response::Entry(i, p))
                        .collect();
                    lines.push(Response::End);
                    Reply::Ready(lines)
                }
                Err(ReadError::Compacted(first)) => {
                    ready(Response::err(ErrorCode::Compacted, first.to_string()))
                }
            }
        }
        Request::CkptPut { id, offset, data } => {
            if let Err(r) = srv.check_leader() {
                return ready(r);
            }
            // Checked: `offset` comes from the client.
            let end = offset.checked_add(data.len() as u64);
            let Some(end) = end.filter(|&e| e <= srv.max_checkpoint_bytes) else {
                return ready(Response::err(
                    ErrorCode::TooLarge,
                    format!(
                        "checkpoint upload would pass {} bytes (--max-checkpoint-mib)",
                        srv.max_checkpoint_bytes
                    ),
                ));
            };
            let op = Op::CkptChunk { id, offset, data };
            Reply::Waiting(srv.batcher.submit(op, Render::CkptPut { end }).await)
        }
        Request::CkptCommit {
            id,
            index,
            len,
            crc,
        } => {
            if let Err(r) = srv.check_leader() {
                return ready(r);
            }
            let op = Op::CkptCommit {
                id,
                index,
                len,
                crc,
            };
            Reply::Waiting(srv.batcher.submit(op, Render::CkptCommit).await)
        }
        Request::CkptInfo => match srv.sm.checkpoint_info() {
            Some(c) => ready(Response::status(&[
                ("id", c.id.to_string()),
                ("index", c.index.to_string()),
                ("len", c.len.to_string()),
                ("crc", c.crc.to_string()),
            ])),
            None => ready(Response::err(ErrorCode::NotFound, "no checkpoint yet")),
        },
        Request::CkptRead { id, offset, max } => {
            let max = max.min(protocol::DEFAULT_MAX_LINE as u64 / 4) as usize;
            match srv.sm.checkpoint_read(id, offset, max) {
                Some(chunk) => ready(Response::Value(chunk)),
                None => ready(Response::err(
                    ErrorCode::NotFound,
                    format!("checkpoint {id} is not the current one"),
                )),
            }
        }
        Request::AddReplica {
            id,
            raft_addr,
            dksp_addr,
            force,
        } => {
            if let Err(r) = srv.check_leader() {
                return ready(r);
            }
            let (raft, me) = (srv.raft.clone(), srv.id);
            let node = Node {
                raft_addr,
                dksp_addr,
            };
            spawn_reply(async move {
                // A learner votes on nothing, so adding one is always safe; once it has caught
                // up it answers like a voter, and the check counts it.
                raft.add_learner(id, node, true)
                    .await
                    .map_err(MembershipError::AddLearner)?;
                let current = voters(&raft);
                let mut proposed = current.clone();
                proposed.insert(id);
                let reachable = reachable(&raft, me, &proposed).await?;
                membership::decide(&current, &reachable, &proposed, force)
                    .map_err(MembershipError::Refused)?;
                raft.change_membership(
                    openraft::ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                    false,
                )
                .await
                .map_err(MembershipError::ChangeMembership)?;
                Ok(())
            })
        }
        Request::RemoveReplica { id, force } => {
            if let Err(r) = srv.check_leader() {
                return ready(r);
            }
            let (raft, me) = (srv.raft.clone(), srv.id);
            spawn_reply(async move {
                let current = voters(&raft);
                let mut proposed = current.clone();
                proposed.remove(&id);
                let reachable = reachable(&raft, me, &current).await?;
                membership::decide(&current, &reachable, &proposed, force)
                    .map_err(MembershipError::Refused)?;
                raft.change_membership(
                    openraft::ChangeMembers::RemoveVoters(BTreeSet::from([id])),
                    false,
                )
                .await
                .map_err(MembershipError::ChangeMembership)?;
                Ok(())
            })
        }
        Request::Ping => ready(Response::Pong),
        Request::Status => ready(srv.status()),
        Request::Hops => Reply::Ready(hops::reply()),
        Request::Tail { .. } | Request::Quit => ready(Response::err(
            ErrorCode::Internal,
            "handled by the connection loop",
        )),
    }
}

/// Why a membership change (`ADD_REPLICA`, `REMOVE_REPLICA`) did not finish. A refusal is
/// `ERR REJECTED <why>` (nothing changed; `FORCE` overrides what may be overridden); a Raft
/// failure is `ERR UNAVAILABLE <openraft's message>`: the change may or may not have taken, so
/// the operator reads `STATUS` and retries on the leader.
#[derive(Debug, thiserror::Error)]
enum MembershipError {
    /// The change would leave too few voters, or no reachable majority.
    #[error("{0}")]
    Refused(membership::Refusal),
    /// The probe entry did not commit within [`membership::REACHABLE_WAIT`]: no majority
    /// answers, so no membership change could commit either.
    #[error(
        "the leader could not commit an entry within {} s: no majority of voters answers, so a membership change cannot commit either",
        membership::REACHABLE_WAIT.as_secs()
    )]
    NoQuorum,
    /// Committing the probe entry that measures which voters answer failed.
    #[error("probing the voters: {0}")]
    Probe(RaftError<NodeId, ClientWriteError<NodeId, Node>>),
    /// Adding the new replica as a learner (and waiting for it to catch up) failed.
    #[error("{0}")]
    AddLearner(RaftError<NodeId, ClientWriteError<NodeId, Node>>),
    /// Committing the new voter set failed.
    #[error("{0}")]
    ChangeMembership(RaftError<NodeId, ClientWriteError<NodeId, Node>>),
}

impl MembershipError {
    fn code(&self) -> ErrorCode {
        match self {
            MembershipError::Refused(_) => ErrorCode::Rejected,
            _ => ErrorCode::Unavailable,
        }
    }
}

/// The current voters, as the leader's metrics give them.
fn voters(raft: &Raft) -> BTreeSet<NodeId> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

/// Which of `wanted` (and the leader `me`) answer now: the leader commits an empty entry and
/// waits up to [`membership::REACHABLE_WAIT`] for each one's replication to reach it. A
/// follower's matched index only moves when it acknowledges, so this measures who is up now,
/// not who was up at the last append.
async fn reachable(
    raft: &Raft,
    me: NodeId,
    wanted: &BTreeSet<NodeId>,
) -> Result<BTreeSet<NodeId>, MembershipError> {
    // Without a majority nothing commits, the probe included: give up after the same wait.
    let probe = tokio::time::timeout(
        membership::REACHABLE_WAIT,
        raft.client_write(crate::types::Batch(Vec::new())),
    )
    .await
    .map_err(|_| MembershipError::NoQuorum)?
    .map_err(MembershipError::Probe)?
    .log_id
    .index;
    let mut metrics = raft.metrics();
    let deadline = tokio::time::Instant::now() + membership::REACHABLE_WAIT;
    loop {
        let acked: BTreeSet<NodeId> = {
            let m = metrics.borrow_and_update();
            m.replication
                .iter()
                .flatten()
                .filter(|(_, matched)| matched.is_some_and(|l| l.index >= probe))
                .map(|(id, _)| *id)
                .chain([me])
                .collect()
        };
        if wanted.is_subset(&acked) {
            return Ok(acked);
        }
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            // The deadline passed (or the node is shutting down): those not in are down.
            _ => return Ok(acked),
        }
    }
}

/// Runs a membership change in its own task; the reply is `OK` or `ERR <code> <why>`.
fn spawn_reply(
    f: impl std::future::Future<Output = Result<(), MembershipError>> + Send + 'static,
) -> Reply {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let r = match f.await {
            Ok(()) => Response::ok(),
            Err(e) => {
                tracing::warn!("membership change refused or failed: {e}");
                Response::err(e.code(), e.to_string())
            }
        };
        let _ = tx.send(r);
    });
    Reply::Waiting(rx)
}

/// Whether `payload` holds a line that starts with `prefix`.
fn has_line_starting(payload: &[u8], prefix: &[u8]) -> bool {
    payload
        .split(|&b| b == b'\n')
        .any(|line| line.starts_with(prefix))
}

/// Streams committed entries from `from` as they are applied, until the client closes. With
/// `prefix`, only the entries holding a line that starts with it: a consumer that watches for
/// rare markers (the kvstore, for a newer `EPOCH`) then costs neither side the quoting and
/// parsing of every entry.
async fn tail(
    conn: &mut Connection,
    srv: &LogServer,
    from: u64,
    prefix: Option<&[u8]>,
    shutdown: &CancellationToken,
) {
    let mut applied = srv.sm.subscribe();
    let mut cursor = from.max(1);
    loop {
        match srv.sm.read(cursor, 1024, READ_BYTES) {
            Err(ReadError::Compacted(first)) => {
                conn.write_response(&Response::err(ErrorCode::Compacted, first.to_string()));
                let _ = conn.flush().await;
                return;
            }
            Ok(entries) if !entries.is_empty() => {
                for (i, p) in entries {
                    if prefix.is_none_or(|pre| has_line_starting(&p, pre)) {
                        conn.write_response(&Response::Entry(i, p));
                    }
                    cursor = i + 1;
                }
                if conn.flush().await.is_err() {
                    return;
                }
                // A filtered page may write nothing, and an empty flush never yields: on a
                // one-thread runtime, catching up on a long log would otherwise hold up the
                // whole replica.
                tokio::task::yield_now().await;
                continue;
            }
            Ok(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = applied.changed() => if changed.is_err() { return },
            frame = conn.read_frame() => match frame {
                // Input while tailing is ignored; the stream ends when the client closes.
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
        }
    }
}

/// Parses `--peers 1=raft/dksp,2=raft/dksp,...`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, Node>, PeersError> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let shape = || PeersError::Shape(part.to_string());
        let (id, addrs) = part.split_once('=').ok_or_else(shape)?;
        let (raft_addr, dksp_addr) = addrs.split_once('/').ok_or_else(shape)?;
        let id: NodeId = id.parse().map_err(|_| PeersError::Id(id.to_string()))?;
        peers.insert(
            id,
            Node {
                raft_addr: raft_addr.to_string(),
                dksp_addr: dksp_addr.to_string(),
            },
        );
    }
    Ok(peers)
}

/// Why a `--peers` list (or `ADD_REPLICA`'s addresses) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    /// An entry is not `id=raft_addr/dksp_addr`.
    #[error("peer {0:?} is not id=raft_addr/dksp_addr")]
    Shape(String),
    /// An entry's id is not a number.
    #[error("peer id {0:?} is not a number")]
    Id(String),
}
