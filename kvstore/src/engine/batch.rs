//! What the committer sends: commits queued for the log, and the log entries they are built
//! into.
//!
//! Invariants:
//! - *An entry fits the log's line limit*: commits share an entry only up to [`BATCH_BYTES`] of
//!   `APPEND` line, counted as encoded; a larger transaction goes alone, and so does a commit
//!   marked `alone` (it shared an entry the log refused as too large).
//! - *Queue order is submit order is deadline order*, so expiry looks only at the fronts.
//! - *A commit is answered at most once* ([`CommitReq::answer`] takes the reply): an entry that
//!   lands after its commits timed out acknowledges nothing.

use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::oneshot;

use protocol::log::Request as LogRequest;

use super::committer::Leader;
use super::error::{not_made, outcome_unknown, EngineError};
use crate::record::Record;

/// Commits share a log entry up to this many bytes of `APPEND` line, counted as encoded (a
/// larger transaction goes alone); far below the log's line limit, [`protocol::log::LOG_MAX_LINE`].
pub(crate) const BATCH_BYTES: usize = 512 * 1024;
/// Commits the committer holds that are not sent yet, at most (by count and by encoded bytes);
/// past either it stops taking from its channel, and `submit` waits (up to the deadline).
const QUEUE_COMMITS: usize = 64 * 1024;
const QUEUE_BYTES: usize = 64 << 20;

/// One commit on its way to the log, with who waits for its answer.
pub(crate) struct CommitReq {
    pub(crate) record: Record,
    /// `record` as it goes into the log entry (encoded by the session, off the committer).
    pub(crate) encoded: Vec<u8>,
    /// `encoded`'s length once quoted into the `APPEND` line, without the quote marks.
    pub(crate) quoted: usize,
    /// When the commit must have been answered.
    pub(crate) deadline: tokio::time::Instant,
    /// Taken when the commit is answered (an entry may land after its commits timed out).
    pub(crate) reply: Option<oneshot::Sender<Result<(), EngineError>>>,
    /// Goes in a log entry of its own: it shared one that the log refused as too large.
    pub(crate) alone: bool,
}

impl CommitReq {
    pub(crate) fn new(
        record: Record,
        deadline: tokio::time::Instant,
    ) -> (CommitReq, oneshot::Receiver<Result<(), EngineError>>) {
        let (reply, rx) = oneshot::channel();
        let mut encoded = Vec::new();
        record.encode(&mut encoded);
        let quoted = protocol::token::quoted_body_len(&encoded);
        let req = CommitReq {
            record,
            encoded,
            quoted,
            deadline,
            reply: Some(reply),
            alone: false,
        };
        (req, rx)
    }

    pub(crate) fn ts(&self) -> Option<u64> {
        match self.record {
            Record::Commit { ts, .. } => Some(ts),
            Record::Epoch(_) => None,
        }
    }

    pub(crate) fn answer(&mut self, result: Result<(), EngineError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
}

/// One log entry on its way: its APPEND line (which carries its `(client, seq)`) and who waits
/// for it.
pub(crate) struct Batch {
    pub(crate) line: Vec<u8>,
    pub(crate) reqs: Vec<CommitReq>,
    pub(crate) tss: Vec<u64>,
    /// Payload bytes (the records, before quoting), for the checkpoint trigger.
    pub(crate) bytes: usize,
    /// `reqs[..answered]` timed out and were answered already (deadlines are in queue order).
    pub(crate) answered: usize,
}

/// Answers every commit past its deadline; returns the next deadline and the timestamps of the
/// commits dropped (the caller resolves them). A commit in an entry already sent gets "outcome
/// unknown" and its entry stays in flight; one still queued is dropped, since it never reached
/// the log, and gets "not made".
pub(crate) fn expire(
    out: &mut Outbox,
    now: tokio::time::Instant,
    timeout: Duration,
) -> (Option<tokio::time::Instant>, Vec<u64>) {
    let mut next: Option<tokio::time::Instant> = None;
    for b in out.inflight.iter_mut() {
        if let Some(d) = expire_sent(b, now, timeout) {
            next = Some(next.map_or(d, |n| n.min(d)));
        }
    }
    let mut dropped = Vec::new();
    while let Some(r) = out.queue.front() {
        if r.deadline > now {
            next = Some(next.map_or(r.deadline, |n| n.min(r.deadline)));
            break;
        }
        if let Some(mut r) = out.queue.pop_front() {
            out.queued_bytes = out.queued_bytes.saturating_sub(r.encoded.len());
            dropped.extend(r.ts());
            r.answer(Err(not_made(timeout)));
        }
    }
    (next, dropped)
}

/// Answers the commits of a sent entry that are past their deadline ("outcome unknown"; the
/// entry stays in flight); returns the next deadline among the rest.
pub(crate) fn expire_sent(
    b: &mut Batch,
    now: tokio::time::Instant,
    timeout: Duration,
) -> Option<tokio::time::Instant> {
    while let Some(r) = b.reqs.get_mut(b.answered) {
        if r.deadline > now {
            return Some(r.deadline);
        }
        r.answer(Err(outcome_unknown(timeout)));
        b.answered += 1;
    }
    None
}

/// The committer's side of the log connection: what is in flight, what is queued, and the
/// `(client, seq)` the next entry gets.
pub(crate) struct Outbox {
    pub(crate) leader: Leader,
    pub(crate) inflight: VecDeque<Batch>,
    /// Commits taken from the channel, not sent yet (in submit order, so deadline order).
    pub(crate) queue: VecDeque<CommitReq>,
    /// Encoded bytes of `queue`.
    pub(crate) queued_bytes: usize,
    /// Timestamps of refused entries that may have been appended all the same (see
    /// `committer::reject_batch`), resolved once a later entry lands.
    pub(crate) unsettled: Vec<u64>,
    pub(crate) client: Bytes,
    pub(crate) seq: u64,
}

impl Outbox {
    pub(crate) fn has_room(&self) -> bool {
        self.queue.len() < QUEUE_COMMITS && self.queued_bytes < QUEUE_BYTES
    }

    pub(crate) fn push(&mut self, req: CommitReq) {
        self.queued_bytes = self.queued_bytes.saturating_add(req.encoded.len());
        self.queue.push_back(req);
    }
}

/// One log entry built from the front of the queue: the `APPEND` line and the commits in it.
pub(crate) struct Built {
    pub(crate) line: Vec<u8>,
    pub(crate) reqs: Vec<CommitReq>,
    /// Payload bytes (records and their newlines, before the `APPEND` quoting).
    pub(crate) bytes: usize,
    /// Whether commits were left queued because the entry was full.
    pub(crate) full: bool,
}

/// The length of `APPEND <client> <seq> "` and the closing `"`: everything but the payload's
/// quoted body.
fn append_overhead(client: &[u8], seq: u64) -> usize {
    let digits = seq.checked_ilog10().map_or(1, |d| d as usize + 1);
    "APPEND ".len() + protocol::token::encoded_len(client) + 1 + digits + 1 + 2
}

/// Takes commits from the front of `queue` into one entry: the first always (alone, if it is
/// large or marked so), the next ones while the `APPEND` line, counted as encoded, stays within
/// [`BATCH_BYTES`].
pub(crate) fn build_batch(queue: &mut VecDeque<CommitReq>, client: &Bytes, seq: u64) -> Built {
    let mut line_len = append_overhead(client, seq);
    let mut reqs: Vec<CommitReq> = Vec::new();
    let mut full = false;
    while let Some(next) = queue.front() {
        // A newline between records is two bytes once quoted (`\n`).
        let add = next.quoted + if reqs.is_empty() { 0 } else { 2 };
        let alone = next.alone || reqs.first().is_some_and(|r| r.alone);
        if !reqs.is_empty() && (alone || line_len.saturating_add(add) > BATCH_BYTES) {
            full = true;
            break;
        }
        line_len = line_len.saturating_add(add);
        if let Some(r) = queue.pop_front() {
            reqs.push(r);
        }
    }
    let mut payload = Vec::with_capacity(reqs.iter().map(|r| r.encoded.len() + 1).sum());
    for (i, r) in reqs.iter().enumerate() {
        if i > 0 {
            payload.push(b'\n');
        }
        payload.extend_from_slice(&r.encoded);
    }
    let bytes = payload.len();
    let line = LogRequest::Append {
        client: client.clone(),
        seq,
        payload: Bytes::from(payload),
    }
    .encode();
    debug_assert_eq!(
        line.len(),
        line_len,
        "APPEND line sized before it was built"
    );
    Built {
        line,
        reqs,
        bytes,
        full: full || line_len >= BATCH_BYTES,
    }
}
