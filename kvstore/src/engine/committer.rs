//! The committer: group commit and pipelining onto the log, in log order.
//!
//! It takes everything queued, writes it as one log entry (one `APPEND`: group commit), and
//! once the log has it on a majority of replicas applies it to the store, in log order, and
//! answers the clients. Its `(client, seq)` makes a retried append exactly-once, so it retries
//! through logserver failovers. Its invariants:
//! - *Acknowledged means durable*: a commit is answered `COMMITTED`/`OK` only once its entry is
//!   in the log, and never after it was answered anything else.
//! - *Only transient failures are retried* (no leader, a lost connection, no answer): a
//!   deterministic refusal (`ERR TOO_LARGE`, `ERR SYNTAX`, ...) fails the commits of that one
//!   entry and the committer goes on with the next; the log skips nothing for the unused seq.
//!   The refused line is never resent; only when an entry of several commits is refused as
//!   too large are its commits sent again, each in an entry of its own, so that one commit
//!   too large for the log fails alone.
//! - *Bounded waits*: a commit not durable within `commit_timeout` is answered
//!   `ERR UNAVAILABLE commit outcome unknown` (or, if it never left the queue, dropped and
//!   answered that it was not made). A timed-out entry already sent keeps being retried with
//!   its `(client, seq)` and, if it lands, is applied in log order like any other: its commits
//!   stay in flight (snapshots wait for them) until the log has decided.
//! - *Fencing*: what to do with an entry that comes back is [`super::decide::decide`]'s call;
//!   an entry at an unexpected index is acknowledged only after the gap before it was read and
//!   holds no newer `EPOCH`.

use bytes::Bytes;
use protocol::hops::{self, Hop};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use protocol::log_client::Replicas;
use protocol::{Client, ClientError, ErrorCode, LogClient, Response};

use super::batch::{build_batch, expire, expire_sent, Batch, CommitReq, Outbox};
use super::decide::{after_gap, decide, GapEnd, Returned, Step};
use super::error::{EngineError, GapError};
use super::Engine;
use crate::record::Record;

/// Log entries the committer keeps in flight at most. A new entry goes out while others are in
/// flight only if the one sent last was full (`BATCH_BYTES`): under a light or moderate load
/// everything that arrives during a log round trip then goes out as the next single entry, so
/// each Raft round carries one large entry instead of several small ones and the replicas do
/// less work per commit, while a heavy pipelined load still keeps several full entries moving.
/// Measured with 64 clients, one PUT in flight each (bench-kv, one run): always up to 8 in
/// flight gave 25,000-28,700 PUT/s at 22-29 µs of log-replica CPU per commit; one at a time
/// gave 31,700-31,900 at 17.6-18.2 µs.
const MAX_INFLIGHT_BATCHES: usize = 8;
/// Default of [`super::Config::log_pipeline`].
pub const DEFAULT_LOG_PIPELINE: usize = 4;
/// A second (third, ...) entry goes out early, before the reply to the one before, only while
/// the entries in flight hold fewer commits than this: under a light load that saves a commit
/// the wait for the round in progress, while under a heavy one (64 clients) the commits keep
/// gathering into one entry per round, which costs the replicas less per commit. Measured
/// 2026-12-02 at 64 clients, always sending early cost 5-15% of RMW and PUT throughput.
const EARLY_COMMITS: usize = 16;
/// With appends in flight and no reply for this long, the committer tries another replica: a
/// log leader cut off from its majority keeps appends without ever answering them.
const APPEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The committer's pipelined connection to the log leader.
pub(crate) struct Leader {
    /// Where to connect next.
    pub(crate) replicas: Replicas,
    /// The pipelined connection, while there is one.
    pub(crate) conn: Option<Client>,
    /// How to prove membership to the log.
    pub(crate) trust: protocol::trust::Trust,
}

impl Leader {
    /// Connects to the current guess and sends every batch still in flight, in order.
    async fn reconnect(&mut self, inflight: &VecDeque<Batch>) -> bool {
        let addr = self.replicas.current().to_string();
        let connected = tokio::time::timeout(
            Duration::from_secs(1),
            Client::connect_trusted(&addr, &self.trust),
        )
        .await;
        let Ok(Ok(mut c)) = connected else {
            self.replicas.rotate();
            return false;
        };
        for b in inflight {
            c.send(&b.line);
        }
        if !flushed(&mut c).await {
            self.replicas.rotate();
            return false;
        }
        self.conn = Some(c);
        true
    }

    fn redirect(&mut self, addr: String) {
        self.conn = None;
        self.replicas.redirect(addr);
    }

    fn rotate(&mut self) {
        self.conn = None;
        self.replicas.rotate();
    }
}

/// Flushes what was sent to the log, giving up after [`APPEND_TIMEOUT`]: a replica that is
/// stopped (not dead) stops reading, and a flush into its full socket buffer would hold the
/// committer, and every commit deadline, for as long as it stays stopped.
async fn flushed(c: &mut Client) -> bool {
    matches!(
        tokio::time::timeout(APPEND_TIMEOUT, c.flush()).await,
        Ok(Ok(()))
    )
}

async fn next_reply(leader: &mut Leader) -> Result<Response, ClientError> {
    match leader.conn.as_mut() {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

/// Group commit with pipelining: everything queued becomes one log entry (up to
/// [`BATCH_BYTES`](super::batch::BATCH_BYTES) of `APPEND` line), up to [`MAX_INFLIGHT_BATCHES`] entries are in flight on
/// one connection, and their replies come back in log order, so batches are applied in log
/// order. If the connection fails or the leader changes, every unacknowledged batch is sent
/// again with its `(client, seq)`: the log's dedupe returns the original index for those that
/// did commit. A refusal is not retried (see [`reject_batch`]); deadlines are kept by
/// [`expire`], at the top of every turn.
pub(crate) async fn committer_loop(
    e: Arc<Engine>,
    mut rx: mpsc::Receiver<CommitReq>,
    mut log: LogClient,
) {
    let epoch = e.life.epoch();
    let mut out = Outbox {
        leader: Leader {
            replicas: Replicas::new(e.cfg.log.clone()),
            conn: None,
            trust: e.cfg.trust.clone(),
        },
        inflight: VecDeque::new(),
        queue: VecDeque::new(),
        queued_bytes: 0,
        unsettled: Vec::new(),
        client: Bytes::from(format!("kv-{epoch}")),
        seq: 0,
    };
    let mut seen_epoch = epoch;
    let mut closed = false;
    // Whether the entry sent last was full, so more is likely queued (see MAX_INFLIGHT_BATCHES).
    let mut last_full = false;
    // When the oldest append in flight was (re)sent or last made progress.
    let mut progress = tokio::time::Instant::now();
    loop {
        let (next_deadline, dropped) =
            expire(&mut out, tokio::time::Instant::now(), e.cfg.commit_timeout);
        if !dropped.is_empty() {
            tracing::warn!(
                "dropped {} commits that waited {:?} for the log",
                dropped.len(),
                e.cfg.commit_timeout
            );
            e.resolve(&dropped);
        }
        if closed && out.inflight.is_empty() && out.queue.is_empty() {
            return;
        }
        while !closed && out.has_room() {
            match rx.try_recv() {
                Ok(req) => out.push(req),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        if out.leader.conn.is_none() && !out.inflight.is_empty() {
            if !out.leader.reconnect(&out.inflight).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            progress = tokio::time::Instant::now();
        }
        let in_flight_commits: usize = out.inflight.iter().map(|b| b.reqs.len()).sum();
        let can_send = !out.queue.is_empty()
            && (out.inflight.is_empty()
                || (out.inflight.len() < e.cfg.log_pipeline.max(1)
                    && in_flight_commits < EARLY_COMMITS)
                || (last_full && out.inflight.len() < MAX_INFLIGHT_BATCHES));
        if can_send {
            if out.inflight.is_empty() {
                // The clock for APPEND_TIMEOUT starts now, not when the committer went idle:
                // the first commit after a quiet second must not look like a dead leader.
                progress = tokio::time::Instant::now();
            }
            last_full = send_batch(&e, &mut out).await;
            continue;
        }
        tokio::select! {
            biased;
            reply = next_reply(&mut out.leader), if !out.inflight.is_empty() => match reply {
                Ok(Response::Ok(args)) if args.len() == 1 => {
                    match protocol::response::parse_u64(&args[0]) {
                        Ok(index) => {
                            progress = tokio::time::Instant::now();
                            if let Some(batch) = out.inflight.pop_front() {
                                // Send what queued meanwhile first, so the log works on the
                                // next entry while this one is applied and answered.
                                if out.inflight.is_empty() {
                                    while !closed && out.has_room() {
                                        let Ok(req) = rx.try_recv() else { break };
                                        out.push(req);
                                    }
                                    if !out.queue.is_empty() {
                                        last_full = send_batch(&e, &mut out).await;
                                    }
                                }
                                finish_batch(
                                    &e,
                                    batch,
                                    index,
                                    &mut log,
                                    (epoch, &mut seen_epoch),
                                    &mut out,
                                )
                                .await;
                                // The gap before this entry has been read and applied: an
                                // entry refused with an unclear error has landed by now or
                                // never will (see reject_batch).
                                if !out.unsettled.is_empty() {
                                    e.resolve(&std::mem::take(&mut out.unsettled));
                                }
                                // Applying (a gap read, a checkpoint capture) can take a while;
                                // what was just sent has been waiting only since now.
                                progress = tokio::time::Instant::now();
                            }
                        }
                        Err(_) => {
                            tracing::warn!("log answered APPEND with a bad index, resending");
                            out.leader.rotate();
                        }
                    }
                }
                Ok(Response::Redirect(addr)) => out.leader.redirect(addr),
                Ok(Response::Err(err)) if err.code == ErrorCode::Unavailable => {
                    // No leader yet, no quorum: the outcome is unknown, so retry (exactly-once).
                    tracing::warn!("log append not taken, retrying: {err}");
                    out.leader.rotate();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Response::Err(err)) => {
                    // Replies come in the order the lines were sent: this one is the oldest
                    // batch's, and the connection stays in step for the rest.
                    progress = tokio::time::Instant::now();
                    if let Some(batch) = out.inflight.pop_front() {
                        reject_batch(&e, batch, err, &mut out);
                    }
                }
                Ok(other) => {
                    // Not an answer to APPEND: out of step with the replica, so start over on a
                    // new connection (the resends are exactly-once).
                    tracing::warn!("log answered APPEND with {other:?}; resending");
                    out.leader.rotate();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => {
                    tracing::warn!("log connection lost, resending {} batches: {err}", out.inflight.len());
                    out.leader.rotate();
                }
            },
            _ = tokio::time::sleep_until(progress + APPEND_TIMEOUT), if !out.inflight.is_empty() => {
                tracing::warn!(
                    "no answer from log replica {} for {APPEND_TIMEOUT:?}; trying another with {} appends",
                    out.leader.replicas.current(),
                    out.inflight.len()
                );
                out.leader.rotate();
            }
            _ = sleep_until_some(next_deadline), if next_deadline.is_some() => {}
            req = rx.recv(), if !closed && out.has_room() => match req {
                Some(req) => out.push(req),
                None => closed = true,
            },
        }
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The log refused the oldest batch's `APPEND` with `err`: fail its commits without retrying
/// (a refusal is deterministic; the same line would be refused again) and go on. The log
/// assigns an index only to appends it takes, so the seq left unused breaks nothing.
fn reject_batch(e: &Engine, mut batch: Batch, err: protocol::ServerError, out: &mut Outbox) {
    if err.code == ErrorCode::TooLarge && batch.reqs.len() > 1 {
        // Several commits together were over the log's limit (which the kvstore does not know;
        // it is set on the logserver). The entry was discarded unread, so nothing of it is in
        // the log: its commits go again, each in an entry of its own, ahead of everything
        // queued, and stay in flight meanwhile. The refused line itself is never resent.
        // Entries sent behind it may land first; their commits have later timestamps, and the
        // store orders versions by timestamp, while snapshots wait for these in flight.
        tracing::warn!(
            "log refused an entry of {} commits ({} bytes as an APPEND line) as too large; sending them one by one",
            batch.reqs.len(),
            batch.line.len()
        );
        for mut r in batch.reqs.into_iter().rev() {
            r.alone = true;
            out.queued_bytes = out.queued_bytes.saturating_add(r.encoded.len());
            out.queue.push_front(r);
        }
        return;
    }
    tracing::error!(
        "log refused an entry of {} commits ({} bytes as an APPEND line): {err}; they fail, the next entries go on",
        batch.reqs.len(),
        batch.line.len()
    );
    let refused_before_appending = matches!(
        err.code,
        ErrorCode::TooLarge
            | ErrorCode::Syntax
            | ErrorCode::UnknownCommand
            | ErrorCode::Rejected
            | ErrorCode::NoAuth
            | ErrorCode::Denied
    );
    for r in batch.reqs.iter_mut() {
        r.answer(Err(match err.code {
            ErrorCode::TooLarge => EngineError::TooLarge(format!(
                "the commit's log entry is {} bytes as an APPEND line, over the log's line limit (logserver --max-line); not committed",
                batch.line.len()
            )),
            _ => EngineError::Unavailable(format!(
                "commit outcome unknown: the log refused its entry: {err}"
            )),
        }));
    }
    if refused_before_appending {
        // Refused when parsed or applied: these never get an index.
        e.resolve(&batch.tss);
    } else {
        // Unclear whether it was appended: if it was, it is before the next entry that lands
        // and is read back with the gap then. Its commits stay in flight until that point, so
        // no snapshot reads past them meanwhile.
        out.unsettled.extend_from_slice(&batch.tss);
    }
}

/// Makes the front of the queue one log entry and sends it; returns whether it was full. A
/// fenced kvstore answers them `ERR FENCED` instead.
async fn send_batch(e: &Engine, out: &mut Outbox) -> bool {
    if let Some(by) = e.life.fenced_by() {
        let reqs: Vec<CommitReq> = out.queue.drain(..).collect();
        out.queued_bytes = 0;
        let tss: Vec<u64> = reqs.iter().filter_map(CommitReq::ts).collect();
        e.resolve(&tss);
        for mut r in reqs {
            r.answer(Err(EngineError::Fenced(by)));
        }
        return false;
    }
    let seq = out.seq + 1;
    let built = build_batch(&mut out.queue, &out.client, seq);
    if built.reqs.is_empty() {
        return false;
    }
    out.seq = seq;
    let sent: usize = built.reqs.iter().map(|r| r.encoded.len()).sum();
    out.queued_bytes = out.queued_bytes.saturating_sub(sent);
    let tss: Vec<u64> = built.reqs.iter().filter_map(CommitReq::ts).collect();
    if let Some(c) = out.leader.conn.as_mut() {
        c.send(&built.line);
        if !flushed(c).await {
            out.leader.rotate();
        }
    }
    tss.iter()
        .for_each(|&ts| hops::mark_sampled(Hop::KvSend, ts, seq));
    out.inflight.push_back(Batch {
        line: built.line,
        reqs: built.reqs,
        tss,
        bytes: built.bytes,
        answered: 0,
    });
    built.full
}

/// A batch is in the log at `index`: check no newer kvstore got in first, apply, answer.
async fn finish_batch(
    e: &Arc<Engine>,
    mut batch: Batch,
    index: u64,
    log: &mut LogClient,
    (epoch, seen_epoch): (u64, &mut u64),
    out: &mut Outbox,
) {
    batch
        .tss
        .iter()
        .for_each(|&ts| hops::mark_sampled(Hop::KvLogOk, ts, index));
    let expected = e.life.applied_index().saturating_add(1);
    let mut returned = Returned {
        expected,
        returned: index,
        epoch,
        seen_epoch: *seen_epoch,
        fenced_by: e.life.fenced_by(),
    };
    let mut step = decide(returned);
    if let Step::ReadGap { from, to } = step {
        let end = read_gap_until_done(e, log, from, to, seen_epoch, &mut batch, out).await;
        *seen_epoch = after_gap(*seen_epoch, end);
        // Nothing is left between the applied entries and this one.
        returned.expected = index;
        returned.seen_epoch = *seen_epoch;
        returned.fenced_by = None;
        step = decide(returned);
    }
    match step {
        Step::ReadGap { .. } => unreachable!("an entry where expected has no gap before it"),
        Step::Fence(by) => {
            *seen_epoch = by;
            tracing::error!("fenced: kvstore epoch {by} took over the log");
            e.life.fence(by);
            e.resolve(&batch.tss);
            for mut r in batch.reqs {
                r.answer(Err(EngineError::Fenced(by)));
            }
        }
        Step::Skip => {
            // The logserver proposes a connection's appends in the order they were sent, so
            // this means the entry was already read back and applied as someone else's.
            tracing::error!(
                "log entry {index} came back after {expected} was expected; not reapplied"
            );
            e.resolve(&batch.tss);
            for mut r in batch.reqs {
                // Those that timed out were answered already and are not answered again.
                r.answer(Ok(()));
            }
        }
        Step::Apply => {
            {
                let mut store = e.store.write().unwrap_or_else(|p| p.into_inner());
                for r in &batch.reqs {
                    if let Record::Commit { ts, writes, .. } = &r.record {
                        store.apply(*ts, writes);
                    }
                }
            }
            let applied = batch.tss.len() as u64;
            e.life.set_applied_index(index);
            e.commits.fetch_add(applied, Ordering::Relaxed);
            e.resolve(&batch.tss);
            for mut r in batch.reqs {
                // Those that timed out were answered already: never `COMMITTED` after that.
                r.answer(Ok(()));
            }
            e.checkpointer.count(applied, batch.bytes as u64);
            // The committer has applied exactly up to `index` and applies nothing more until
            // the capture is done.
            if let Some(ticket) = e.checkpointer.due() {
                super::checkpoint::start(e, ticket, index).await;
            }
        }
    }
}

/// Reads the gap `from..=to` appended by another writer, retrying transient failures (and
/// answering commits whose deadline passes meanwhile), until it is read, unusable, or the log
/// follower fences this kvstore.
async fn read_gap_until_done(
    e: &Arc<Engine>,
    log: &mut LogClient,
    from: u64,
    to: u64,
    seen_epoch: &mut u64,
    batch: &mut Batch,
    out: &mut Outbox,
) -> GapEnd {
    let mut next = from;
    let mut wait = Duration::from_millis(20);
    loop {
        match e.read_gap(log, &mut next, to, seen_epoch).await {
            Ok(()) => return GapEnd::Read(*seen_epoch),
            Err(err) if err.is_transient() => {
                tracing::warn!(
                    "reading log entries {next}..={to} by another writer: {err}; retrying"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
                // The log may be down for long: commits still get their answer in time.
                let now = tokio::time::Instant::now();
                let timeout = e.cfg.commit_timeout;
                expire_sent(batch, now, timeout);
                let (_, dropped) = expire(out, now, timeout);
                if !dropped.is_empty() {
                    e.resolve(&dropped);
                }
                if let Some(by) = e.life.fenced_by() {
                    return GapEnd::FencedMeanwhile(by);
                }
            }
            Err(GapError::Bad(bad)) => {
                // Not another kvstore's entry but one no kvstore wrote: fence (acknowledge
                // nothing more), and stop the process naming it, as a restart would.
                tracing::error!("log entries {next}..={to} by another writer: {bad}");
                e.halt(super::RecoveryError::BadRecord(bad));
                return GapEnd::Unusable;
            }
            Err(err) => {
                tracing::error!("log entries {next}..={to} by another writer: {err}");
                return GapEnd::Unusable;
            }
        }
    }
}
