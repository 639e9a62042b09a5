//! Pipelined replication to one follower: several `AppendEntries` in flight on one ordered
//! connection, and the leader's new entries sent the moment its log store takes them.
//!
//! openraft 0.9 replicates with one `AppendEntries` in flight per follower: its replication
//! stream asks the network for a range and asks for the next range only once the follower has
//! acknowledged the whole previous one. Its core also waits for the leader's own fdatasync
//! before it hands new entries to the streams. So a commit waited for the leader's flush, then
//! for the round in progress, then for its own round. A [`Pipeline`] removes both waits without
//! changing openraft:
//! - the log store publishes every append on the [`Feed`] as it writes it, before its
//!   fdatasync; each follower's pipeline sends those entries at once if they continue what it
//!   has sent, so the followers flush while the leader does;
//! - up to `depth` requests are in flight; entries that arrive meanwhile wait in `pending` and go
//!   as one request when a reply frees a slot, so one fdatasync on the follower covers them all
//!   (group commit, as the batcher does for clients);
//! - openraft's `append_entries` calls hand their range to the pipeline as well: whatever of it
//!   the pipeline has not sent goes out, in order, and the call waits only for the follower's
//!   acknowledgements. It answers `Success` once the follower holds the call's last entry, or
//!   `PartialSuccess` for the part it holds as soon as that grows.
//!
//! **Why every request is safe.** Each carries the leader's vote, entries of the leader's own
//! log, and as `prev_log_id` the entry sent just before it on this connection (or the point an
//! openraft call started from). The follower handles one connection's requests in order (see
//! `network::serve_peer`), so when a request arrives its `prev_log_id` is there unless the
//! follower refused an earlier one, and then it refuses this one too. Entries pushed from the
//! feed are taken only if they were created under the pipeline's vote: a replica that stopped
//! leading may still append a new leader's entries while its old pipelines wind down, and those
//! are never sent under the old vote. The leader's log does not change below its last entry
//! while it leads, so the entries the pipeline sent and the ones openraft reads agree.
//!
//! **What openraft is told.** Only acknowledgements: a follower answers `Success` once the
//! entries are durable, so `acked` never runs ahead of the follower's disk, and a call reports
//! at most its own range. A follower that refused a request (`Conflict`) is reported to the
//! openraft call whose `prev_log_id` that request carried; every other call then gets a network
//! error and asks again from where openraft stands, untrimmed.
//!
//! **Bounds.** At most `depth` requests of at most `append_bytes` each (always at least one
//! entry) are in flight, and at most [`PENDING_BYTES`] wait; past that the pipeline stops taking
//! the feed and openraft's next call fills the gap. Each request has a deadline of
//! `EXCHANGE_BASE` + (bytes in flight up to it) / `min_rate` from when it was sent; a follower
//! that misses it has its connection dropped, and the next call starts again from what the
//! follower acknowledged (acknowledged entries are never sent again under the same vote).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod conn;

use crate::network::{entry_bytes, NetConfig, RaftRpc, EXCHANGE_BASE};
use crate::types::{Entry, LogId, NodeId, RaftError, Vote};
use conn::{connect, ConnEvent, ConnTasks};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use protocol::hops::{self, Hop};

/// Appends the feed holds for a pipeline that has not caught up; one that falls further
/// behind skips them (its continuity check fails) and openraft's next call fills the gap.
const FEED_CAPACITY: usize = 1024;

/// Bytes of entries a pipeline holds waiting for a free slot, at most.
pub const PENDING_BYTES: usize = 16 * 1024 * 1024;

/// Default requests in flight per follower (`--raft-pipeline-depth`).
pub const DEFAULT_DEPTH: usize = 4;

/// Entries the local log store accepted, in append order (cloned: entries share their payload
/// `Bytes`). The leader's pipelines subscribe; a replica with no pipeline pays nothing.
#[derive(Clone)]
pub struct Feed {
    tx: broadcast::Sender<Arc<[Entry]>>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            tx: broadcast::channel(FEED_CAPACITY).0,
        }
    }
}

impl Feed {
    /// Whether anyone listens: the log store clones entries only then.
    pub fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Publishes entries just written to the log (not yet flushed).
    pub fn publish(&self, entries: Vec<Entry>) {
        if !entries.is_empty() {
            // No receiver left is fine: nobody is replicating.
            let _ = self.tx.send(Arc::from(entries));
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<[Entry]>> {
        self.tx.subscribe()
    }
}

/// Why the pipeline last started over.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The follower could not be dialled.
    Unreachable(String),
    /// The connection failed, a reply was undecodable or late, the follower's Raft failed.
    Network(String),
    /// The follower refused the request sent with this `prev_log_id`: it does not hold it.
    Conflict(Option<LogId>),
    /// The follower has seen a newer vote than the pipeline's.
    HigherVote(Vote),
}

/// What a call can learn from the pipeline.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// Bumped each time the pipeline starts over (and then `fault` says why).
    pub generation: u64,
    /// The vote the pipeline sends under.
    pub vote: Option<Vote>,
    /// The follower holds the leader's log up to here (it answered `Success`), under `vote`.
    pub acked: Option<LogId>,
    /// Why the pipeline last started over (with `generation`), if it ever did.
    pub fault: Option<Fault>,
}

/// A range openraft asks to replicate.
struct Append {
    vote: Vote,
    prev: Option<LogId>,
    entries: Vec<Entry>,
    commit: Option<LogId>,
    /// Answered with the generation after the range was taken.
    taken: oneshot::Sender<u64>,
}

/// The handle a `PeerClient` keeps; dropping it stops the pipeline and its connection.
pub struct Pipeline {
    tx: mpsc::UnboundedSender<Append>,
    state: watch::Receiver<State>,
    task: JoinHandle<()>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Settings of one follower's pipeline.
#[derive(Clone, Debug)]
pub struct PipeConfig {
    /// The Raft network's limits (append budget, rate, frame cap).
    pub net: NetConfig,
    /// Requests in flight at most (at least 1).
    pub depth: usize,
}

impl Pipeline {
    /// Starts the pipeline's task for the follower at `addr`; it dials when it first sends.
    pub fn start(target: NodeId, addr: String, config: PipeConfig, feed: Option<&Feed>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(State::default());
        let actor = Actor {
            target,
            addr,
            depth: config.depth.max(1),
            net: config.net,
            vote: None,
            commit: None,
            in_step: false,
            wire: None,
            pending: Vec::new(),
            pending_bytes: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            conn: None,
            conn_id: 0,
            generation: 0,
            acked: None,
            state: state_tx,
        };
        let feed = feed.map(Feed::subscribe);
        let task = tokio::spawn(actor.run(rx, feed));
        Pipeline { tx, state, task }
    }

    /// Hands openraft's range to the pipeline; returns the generation it was taken in, or
    /// `None` if the pipeline is gone.
    pub async fn take(&self, req: AppendEntriesRequest<crate::types::TypeConfig>) -> Option<u64> {
        let (taken, rx) = oneshot::channel();
        self.tx
            .send(Append {
                vote: req.vote,
                prev: req.prev_log_id,
                entries: req.entries,
                commit: req.leader_commit,
                taken,
            })
            .ok()?;
        rx.await.ok()
    }

    /// The state as it changes; see [`watch::Receiver`].
    pub fn state(&mut self) -> &mut watch::Receiver<State> {
        &mut self.state
    }
}

/// A request on the wire.
struct Sent {
    /// Index of its first entry.
    first: u64,
    prev: Option<LogId>,
    last: LogId,
    bytes: usize,
    deadline: Instant,
}

struct Actor {
    target: NodeId,
    addr: String,
    depth: usize,
    net: NetConfig,
    vote: Option<Vote>,
    /// Highest `leader_commit` openraft has given; sent with every request.
    commit: Option<LogId>,
    /// Whether `wire` and `pending` continue a chain the follower is handling in order; if not,
    /// the feed is ignored until an openraft call starts a chain.
    in_step: bool,
    /// The `prev_log_id` of the next request: the last entry sent in this chain.
    wire: Option<LogId>,
    /// Entries after `wire`, contiguous, waiting for a free slot.
    pending: Vec<Entry>,
    pending_bytes: usize,
    inflight: VecDeque<Sent>,
    inflight_bytes: usize,
    conn: Option<ConnTasks>,
    conn_id: u64,
    generation: u64,
    acked: Option<LogId>,
    state: watch::Sender<State>,
}

fn index(id: Option<LogId>) -> Option<u64> {
    id.map(|l| l.index)
}

impl Actor {
    /// The last entry handed to this chain: waiting in `pending`, or else on the wire.
    fn sent(&self) -> Option<LogId> {
        self.pending.last().map(|e| e.log_id).or(self.wire)
    }

    async fn run(
        mut self,
        mut calls: mpsc::UnboundedReceiver<Append>,
        mut feed: Option<broadcast::Receiver<Arc<[Entry]>>>,
    ) {
        let (events_tx, mut events) = mpsc::unbounded_channel::<ConnEvent>();
        loop {
            let deadline = self.inflight.front().map(|s| s.deadline);
            tokio::select! {
                call = calls.recv() => match call {
                    Some(a) => {
                        self.on_call(a.vote, a.prev, a.entries, a.commit);
                        self.flush(&events_tx);
                        let _ = a.taken.send(self.generation);
                    }
                    // The PeerClient is gone.
                    None => return,
                },
                got = recv_feed(&mut feed) => match got {
                    Ok(entries) => {
                        self.on_feed(&entries);
                        self.flush(&events_tx);
                    }
                    // Missed some: the next entries will not be contiguous; nothing to do.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => feed = None,
                },
                Some(ev) = events.recv() => {
                    self.on_event(ev);
                    self.flush(&events_tx);
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    let waited = self.inflight.front().map(|s| s.bytes).unwrap_or(0);
                    self.reset(Fault::Network(format!(
                        "append of {waited} bytes to {} unanswered by its deadline",
                        self.target
                    )));
                }
            }
        }
    }

    /// openraft's range: send what the pipeline has not.
    fn on_call(
        &mut self,
        vote: Vote,
        prev: Option<LogId>,
        mut entries: Vec<Entry>,
        commit: Option<LogId>,
    ) {
        if self.vote != Some(vote) {
            self.vote = Some(vote);
            self.acked = None;
            self.reset(Fault::Network("new leader vote".into()));
        }
        if commit > self.commit {
            self.commit = commit;
        }
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return;
        };
        let sent = self.sent();
        if self.in_step && index(prev) <= index(sent) {
            // Part of it went already (or waits in `pending`): add the rest, if any.
            let upto = index(sent);
            entries.retain(|e| Some(e.log_id.index) > upto);
        } else {
            // A new chain from `prev`, less what the follower is known to hold.
            let mut start = prev;
            if let Some(a) = self.acked {
                if index(prev) <= Some(a.index) {
                    entries.retain(|e| e.log_id.index > a.index);
                    start = Some(a);
                }
            }
            if Some(last.index) <= index(start) {
                return;
            }
            self.pending.clear();
            self.pending_bytes = 0;
            self.wire = start;
            self.in_step = true;
        }
        for e in entries {
            self.pending_bytes = self.pending_bytes.saturating_add(entry_bytes(&e));
            self.pending.push(e);
        }
    }

    /// New entries in the leader's log: take them if they continue the chain.
    fn on_feed(&mut self, entries: &[Entry]) {
        let (Some(vote), true) = (self.vote, self.in_step) else {
            return;
        };
        let Some(first) = entries.first() else {
            return;
        };
        let sent = self.sent();
        let next = index(sent).map_or(0, |i| i.saturating_add(1));
        if first.log_id.index != next {
            return;
        }
        // (openraft's `CommittedLeaderId` is its `LeaderId`: term and node.)
        let ours = *vote.leader_id();
        if !vote.is_committed() || entries.iter().any(|e| e.log_id.leader_id != ours) {
            return;
        }
        let bytes: usize = entries.iter().map(entry_bytes).sum();
        if self.pending_bytes.saturating_add(bytes) > PENDING_BYTES {
            return;
        }
        self.pending_bytes = self.pending_bytes.saturating_add(bytes);
        self.pending.extend(entries.iter().cloned());
    }

    /// Sends pending entries while there is a free slot.
    fn flush(&mut self, events: &mpsc::UnboundedSender<ConnEvent>) {
        let Some(vote) = self.vote else { return };
        while self.inflight.len() < self.depth && !self.pending.is_empty() {
            let mut bytes = 0usize;
            let mut keep = 0;
            for e in &self.pending {
                let b = entry_bytes(e);
                if keep > 0 && bytes.saturating_add(b) > self.net.append_bytes {
                    break;
                }
                bytes = bytes.saturating_add(b);
                keep += 1;
            }
            let rest = self.pending.split_off(keep);
            let entries = std::mem::replace(&mut self.pending, rest);
            self.pending_bytes = self.pending_bytes.saturating_sub(bytes);
            let (Some(first), Some(last)) = (
                entries.first().map(|e| e.log_id.index),
                entries.last().map(|e| e.log_id),
            ) else {
                return;
            };
            let prev = self.wire;
            let rpc = RaftRpc::Append(AppendEntriesRequest {
                vote,
                prev_log_id: prev,
                leader_commit: self.commit,
                entries,
            });
            let frame = match postcard::to_stdvec(&rpc) {
                Ok(f) if f.len() <= self.net.max_frame => f,
                Ok(f) => {
                    return self.reset(Fault::Network(format!(
                        "raft frame of {} bytes to {} exceeds the {}-byte cap: are all \
                         replicas run with the same --max-line?",
                        f.len(),
                        self.target,
                        self.net.max_frame
                    )))
                }
                Err(e) => return self.reset(Fault::Network(format!("encoding an append: {e}"))),
            };
            let conn = self.conn.get_or_insert_with(|| {
                self.conn_id = self.conn_id.wrapping_add(1);
                connect(self.conn_id, self.addr.clone(), self.net.clone(), events)
            });
            if conn.frames.send(bytes::Bytes::from(frame)).is_err() {
                return self.reset(Fault::Network("connection task ended".into()));
            }
            self.inflight_bytes = self.inflight_bytes.saturating_add(bytes);
            let rate = self.net.min_rate.max(1);
            let transfer = u64::try_from(self.inflight_bytes)
                .unwrap_or(u64::MAX)
                .saturating_mul(1000)
                / rate;
            hops::mark_range(Hop::RaftSend, first, last.index, self.target);
            self.inflight.push_back(Sent {
                first,
                prev,
                last,
                bytes,
                deadline: Instant::now() + EXCHANGE_BASE + Duration::from_millis(transfer),
            });
            self.wire = Some(last);
        }
    }

    fn on_event(&mut self, ev: ConnEvent) {
        let current = self.conn.as_ref().map(|c| c.id);
        match ev {
            ConnEvent::Reader(id, handle) => match self.conn.as_mut() {
                Some(c) if c.id == id => c.reader = Some(handle),
                _ => handle.abort(),
            },
            ConnEvent::Failed(id, fault) if Some(id) == current => self.reset(fault),
            ConnEvent::Reply(id, frame) if Some(id) == current => self.on_reply(&frame),
            // From a connection already given up.
            ConnEvent::Failed(..) | ConnEvent::Reply(..) => {}
        }
    }

    fn on_reply(&mut self, frame: &[u8]) {
        let Some(sent) = self.inflight.pop_front() else {
            return self.reset(Fault::Network(format!(
                "{} sent a reply to no request",
                self.target
            )));
        };
        self.inflight_bytes = self.inflight_bytes.saturating_sub(sent.bytes);
        let reply: Result<Result<AppendEntriesResponse<NodeId>, RaftError>, _> =
            postcard::from_bytes(frame);
        match reply {
            Ok(Ok(AppendEntriesResponse::Success)) => {
                hops::mark_range(Hop::RaftAck, sent.first, sent.last.index, self.target);
                self.set_acked(sent.last);
                self.publish();
            }
            Ok(Ok(AppendEntriesResponse::PartialSuccess(held))) => {
                // Not something openraft's follower answers; take what it says and start over.
                if let Some(h) = held {
                    self.set_acked(h);
                }
                self.reset(Fault::Network("partial append".into()));
            }
            Ok(Ok(AppendEntriesResponse::Conflict)) => {
                self.acked = None;
                self.in_step = false;
                self.reset(Fault::Conflict(sent.prev));
            }
            Ok(Ok(AppendEntriesResponse::HigherVote(v))) => {
                self.in_step = false;
                self.reset(Fault::HigherVote(v));
            }
            Ok(Err(remote)) => self.reset(Fault::Network(format!(
                "{} failed an append: {remote}",
                self.target
            ))),
            Err(e) => self.reset(Fault::Network(format!("undecodable reply: {e}"))),
        }
    }

    fn set_acked(&mut self, held: LogId) {
        if index(self.acked) < Some(held.index) {
            self.acked = Some(held);
        }
    }

    /// Drops the connection and everything in flight or waiting, and starts over from what the
    /// follower acknowledged.
    fn reset(&mut self, fault: Fault) {
        tracing::debug!("raft pipeline to {} starts over: {fault:?}", self.target);
        self.conn = None;
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.pending.clear();
        self.pending_bytes = 0;
        self.wire = self.acked;
        // After a refusal or a dead peer only openraft's next call, which backs off, starts a
        // new chain; after a lost connection the feed may go on from what is acknowledged.
        if matches!(fault, Fault::Unreachable(_)) || self.acked.is_none() {
            self.in_step = false;
        }
        self.generation = self.generation.wrapping_add(1);
        let fault = Some(fault);
        self.state.send_modify(|s| {
            s.generation = self.generation;
            s.vote = self.vote;
            s.acked = self.acked;
            s.fault = fault;
        });
    }

    fn publish(&mut self) {
        let (vote, acked) = (self.vote, self.acked);
        self.state.send_if_modified(|s| {
            let changed = s.acked != acked || s.vote != vote;
            s.vote = vote;
            s.acked = acked;
            changed
        });
    }
}

async fn recv_feed(
    feed: &mut Option<broadcast::Receiver<Arc<[Entry]>>>,
) -> Result<Arc<[Entry]>, broadcast::error::RecvError> {
    match feed {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
