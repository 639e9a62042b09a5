//! Per-hop timestamps of commits (`--trace-hops`, read back with the `HOPS` command): where a
//! commit's time goes between the client, the kvstore, the log leader and its followers.
//!
//! Invariants:
//! - Off by default. While off, [`mark`] and every other recording call cost one relaxed
//!   atomic load and record nothing.
//! - Memory is bounded by a constant: [`enable`] allocates a ring of [`RING_MARKS`] marks once;
//!   when it is full the oldest mark is overwritten. Recording never allocates.
//! - Times are `CLOCK_MONOTONIC` in nanoseconds, which is one clock for every process on the
//!   host, so marks taken by the kvstore and by each logserver can be subtracted from each
//!   other (`std::time::Instant` could not be: its origin is per process).
//! - A mark is `(hop, key, aux, t_ns)`. What `key` and `aux` are depends on the hop (see
//!   [`Hop`]): the kvstore keys its marks by commit timestamp, the logserver by Raft log index,
//!   and the two marks that cross between the numberings carry the other number in `aux`.
//!
//! The kvstore traces only a sample of commits (at most one per [`SAMPLE_EVERY_NS`], chosen by
//! [`sample`]): its marks are per commit and the ring would otherwise hold only the last
//! fraction of a second at high load. The logserver records every entry while tracing is on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Marks the ring holds; older ones are overwritten (32 bytes each: 2 MiB).
pub const RING_MARKS: usize = 65_536;
/// The kvstore traces at most one commit per this many nanoseconds (1 ms).
pub const SAMPLE_EVERY_NS: u64 = 1_000_000;
/// Sampled commit timestamps remembered, by `ts % SAMPLE_SLOTS`: with one sample per ms a
/// sample is remembered for about a second, far longer than a commit takes.
const SAMPLE_SLOTS: usize = 1024;

/// One point on a commit's path. The wire name (`HOPS` replies) is [`Hop::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hop {
    /// kvstore, key = commit ts: the session read the `PUT`/`DEL`/`COMMIT` line.
    KvRecv,
    /// kvstore, key = commit ts, aux = the committer's APPEND seq: the APPEND holding the
    /// commit was written to the log leader's socket.
    KvSend,
    /// kvstore, key = commit ts, aux = the log's (logical) index from `OK <index>`: the
    /// committer took up the log's answer.
    KvLogOk,
    /// kvstore, key = commit ts: the reply to the client was flushed to its socket.
    KvReply,
    /// logserver (leader), key = logical index, aux = Raft log index: the `APPEND` line was
    /// read (recorded once the entry committed, with the time it was read).
    LogRecv,
    /// leader, key = Raft index: the batch holding the append was proposed (`client_write`).
    LogPropose,
    /// any replica, key = Raft index: the log store's `append` took the entry.
    LogAppend,
    /// any replica, key = Raft index: the fdatasync covering the entry returned.
    LogFlushed,
    /// any replica, key = Raft index: the state machine applied the entry.
    LogApply,
    /// leader, key = Raft index: the replies of the entry's appends were handed to their
    /// connections.
    LogReply,
    /// leader, key = Raft index, aux = follower id: an AppendEntries holding the entry was sent.
    RaftSend,
    /// leader, key = Raft index, aux = follower id: the follower's reply covering the entry
    /// arrived.
    RaftAck,
    /// follower, key = Raft index: an AppendEntries holding the entry was read off the wire.
    RaftRecv,
}

impl Hop {
    /// Every hop, in commit-path order.
    pub const ALL: [Hop; 13] = [
        Hop::KvRecv,
        Hop::KvSend,
        Hop::KvLogOk,
        Hop::KvReply,
        Hop::LogRecv,
        Hop::LogPropose,
        Hop::LogAppend,
        Hop::LogFlushed,
        Hop::LogApply,
        Hop::LogReply,
        Hop::RaftSend,
        Hop::RaftAck,
        Hop::RaftRecv,
    ];

    /// The hop's name on the wire (`HOPS` replies), e.g. `kv_recv`.
    pub fn name(self) -> &'static str {
        match self {
            Hop::KvRecv => "kv_recv",
            Hop::KvSend => "kv_send",
            Hop::KvLogOk => "kv_log_ok",
            Hop::KvReply => "kv_reply",
            Hop::LogRecv => "log_recv",
            Hop::LogPropose => "log_propose",
            Hop::LogAppend => "log_append",
            Hop::LogFlushed => "log_flushed",
            Hop::LogApply => "log_apply",
            Hop::LogReply => "log_reply",
            Hop::RaftSend => "raft_send",
            Hop::RaftAck => "raft_ack",
            Hop::RaftRecv => "raft_recv",
        }
    }

    /// The hop named `s`, if any.
    pub fn parse(s: &[u8]) -> Option<Hop> {
        Hop::ALL.into_iter().find(|h| h.name().as_bytes() == s)
    }
}

/// Why a `HOPS` reply line is not a mark: the server is another build (other hop names) or
/// not a DKSP server at all. The reader stops; a breakdown from half the marks would mislead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkError {
    /// Not the four arguments `<hop> <key> <aux> <t_ns>`; holds how many there were.
    #[error("a HOPS line has 4 arguments, this one {0}")]
    Arity(usize),
    /// A hop name this build does not know.
    #[error("unknown hop {0}")]
    UnknownHop(String),
    /// The key, aux or time is not a number.
    #[error(transparent)]
    Number(#[from] crate::response::NumberError),
}

/// One recorded mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// Which point of the commit path.
    pub hop: Hop,
    /// What the mark is about: a commit timestamp in the kvstore, a Raft index in the logserver.
    pub key: u64,
    /// Extra detail for some hops (the follower id of `RaftSend` and `RaftAck`), else 0.
    pub aux: u64,
    /// `CLOCK_MONOTONIC`, ns.
    pub t_ns: u64,
}

impl Mark {
    /// The arguments of its `HOPS` reply line: `OK <hop> <key> <aux> <t_ns>`.
    pub fn args(&self) -> [String; 4] {
        [
            self.hop.name().to_string(),
            self.key.to_string(),
            self.aux.to_string(),
            self.t_ns.to_string(),
        ]
    }

    /// Parses the arguments of a `HOPS` reply line.
    pub fn parse(args: &[impl AsRef<[u8]>]) -> Result<Mark, MarkError> {
        let [hop, key, aux, t] = args else {
            return Err(MarkError::Arity(args.len()));
        };
        let num = |a: &dyn AsRef<[u8]>| crate::response::parse_u64(a.as_ref());
        Ok(Mark {
            hop: Hop::parse(hop.as_ref()).ok_or_else(|| {
                MarkError::UnknownHop(String::from_utf8_lossy(hop.as_ref()).into_owned())
            })?,
            key: num(key)?,
            aux: num(aux)?,
            t_ns: num(t)?,
        })
    }
}

struct Ring {
    buf: Vec<Mark>,
    /// Where the next mark goes once `buf` is full.
    next: usize,
}

static ON: AtomicBool = AtomicBool::new(false);
static RING: Mutex<Ring> = Mutex::new(Ring {
    buf: Vec::new(),
    next: 0,
});
static LAST_SAMPLE_NS: AtomicU64 = AtomicU64::new(0);
static SAMPLED: [AtomicU64; SAMPLE_SLOTS] = [const { AtomicU64::new(u64::MAX) }; SAMPLE_SLOTS];

fn ring() -> std::sync::MutexGuard<'static, Ring> {
    RING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turns tracing on (for the rest of the process's life). Allocates the ring.
pub fn enable() {
    let mut r = ring();
    if r.buf.capacity() < RING_MARKS {
        r.buf = Vec::with_capacity(RING_MARKS);
        r.next = 0;
    }
    ON.store(true, Ordering::Release);
}

/// Whether `--trace-hops` is on.
#[inline]
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The time now if tracing is on, else 0 (for a mark recorded later with [`mark_at`]).
#[inline]
pub fn now_if_on() -> u64 {
    if on() {
        now_ns()
    } else {
        0
    }
}

/// Records `hop` for `key` now.
#[inline]
pub fn mark(hop: Hop, key: u64, aux: u64) {
    if on() {
        push(hop, key, aux, now_ns());
    }
}

/// Records `hop` for `key` at `t_ns`, taken earlier with [`now_if_on`] (a mark whose key was
/// not known yet when it happened). A `t_ns` of 0 (taken while tracing was off) is skipped.
#[inline]
pub fn mark_at(hop: Hop, key: u64, aux: u64, t_ns: u64) {
    if on() && t_ns != 0 {
        push(hop, key, aux, t_ns);
    }
}

/// Records `hop` for every key in `first..=last`, now (an fdatasync or an AppendEntries covers
/// a run of entries).
pub fn mark_range(hop: Hop, first: u64, last: u64, aux: u64) {
    if !on() || first > last {
        return;
    }
    let t = now_ns();
    let mut r = ring();
    let mut k = first;
    loop {
        r.push(Mark {
            hop,
            key: k,
            aux,
            t_ns: t,
        });
        match k.checked_add(1) {
            Some(n) if n <= last => k = n,
            _ => break,
        }
    }
}

/// Decides whether the commit with timestamp `ts` is traced (at most one per
/// [`SAMPLE_EVERY_NS`]); false while tracing is off.
pub fn sample(ts: u64) -> bool {
    if !on() {
        return false;
    }
    let now = now_ns();
    let last = LAST_SAMPLE_NS.load(Ordering::Relaxed);
    if now.saturating_sub(last) < SAMPLE_EVERY_NS {
        return false;
    }
    if LAST_SAMPLE_NS
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    SAMPLED[slot(ts)].store(ts, Ordering::Relaxed);
    true
}

/// Whether [`sample`] chose `ts` (recently: a slot is reused after `SAMPLE_SLOTS` samples).
#[inline]
pub fn sampled(ts: u64) -> bool {
    on() && SAMPLED[slot(ts)].load(Ordering::Relaxed) == ts
}

/// [`mark`], only if `ts` is a sampled commit.
#[inline]
pub fn mark_sampled(hop: Hop, ts: u64, aux: u64) {
    if sampled(ts) {
        push(hop, ts, aux, now_ns());
    }
}

fn slot(ts: u64) -> usize {
    (ts % SAMPLE_SLOTS as u64) as usize
}

fn push(hop: Hop, key: u64, aux: u64, t_ns: u64) {
    ring().push(Mark {
        hop,
        key,
        aux,
        t_ns,
    });
}

impl Ring {
    fn push(&mut self, m: Mark) {
        // The capacity was reserved by `enable`: filling up to it never reallocates.
        if self.buf.len() < self.buf.capacity() {
            self.buf.push(m);
        } else if let Some(slot) = self.buf.get_mut(self.next) {
            *slot = m;
            self.next = (self.next + 1) % RING_MARKS.max(1);
        }
    }
}

/// Every mark recorded since the last call, oldest first, and clears them; `None` while
/// tracing is off (the `HOPS` command then answers `ERR`).
pub fn take() -> Option<Vec<Mark>> {
    if !on() {
        return None;
    }
    let mut r = ring();
    let next = r.next;
    let mut out = Vec::with_capacity(r.buf.len());
    out.extend_from_slice(&r.buf[next..]);
    out.extend_from_slice(&r.buf[..next]);
    r.buf.clear();
    r.next = 0;
    Some(out)
}

/// The reply to `HOPS`: one `OK <hop> <key> <aux> <t_ns>` line per mark (oldest first), then
/// `END`; `ERR UNAVAILABLE` while tracing is off. Reading clears the marks.
pub fn reply() -> Vec<crate::Response> {
    use crate::{ErrorCode, Response};
    match take() {
        None => vec![Response::err(
            ErrorCode::Unavailable,
            "hop tracing is off (start the server with --trace-hops)",
        )],
        Some(marks) => {
            let mut lines: Vec<Response> = marks
                .iter()
                .map(|m| Response::Ok(m.args().map(bytes::Bytes::from).to_vec()))
                .collect();
            lines.push(Response::End);
            lines
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The recorder is process-wide: one test exercises it all, so no other test races it.
    #[test]
    fn the_recorder_keeps_the_newest_marks_in_order_within_its_bound() {
        assert!(take().is_none(), "tracing must be off by default");
        match reply().as_slice() {
            [crate::Response::Err(e)] => assert_eq!(e.code, crate::ErrorCode::Unavailable),
            other => panic!("HOPS while off answered {other:?}"),
        }
        mark(Hop::KvRecv, 1, 0);
        assert!(!sample(5));
        enable();
        assert_eq!(take(), Some(vec![]));
        mark_at(Hop::KvRecv, 7, 0, 0);
        assert_eq!(
            take().map(|v| v.len()),
            Some(0),
            "a time taken while off is skipped"
        );
        let total = RING_MARKS + 10;
        for i in 0..total as u64 {
            mark(Hop::LogAppend, i, 0);
        }
        let marks = take().unwrap_or_default();
        assert_eq!(marks.len(), RING_MARKS);
        assert_eq!(marks[0].key, 10, "the oldest were overwritten");
        assert_eq!(marks[RING_MARKS - 1].key, total as u64 - 1);
        assert!(marks
            .windows(2)
            .all(|w| w[0].key < w[1].key && w[0].t_ns <= w[1].t_ns));
        mark_range(Hop::LogFlushed, 3, 5, 2);
        let keys: Vec<u64> = take().unwrap_or_default().iter().map(|m| m.key).collect();
        assert_eq!(keys, vec![3, 4, 5]);

        assert!(sample(42), "the first commit after a quiet ms is sampled");
        assert!(!sample(43), "a second one within the same ms is not");
        assert!(sampled(42) && !sampled(43));
        mark_sampled(Hop::KvSend, 42, 1);
        mark_sampled(Hop::KvSend, 43, 1);
        let m = take().unwrap_or_default();
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].hop, m[0].key, m[0].aux), (Hop::KvSend, 42, 1));
        let line = m[0].args();
        assert_eq!(Mark::parse(&line), Ok(m[0]));
        assert_eq!(
            Mark::parse(&["nope", "1", "2", "3"]),
            Err(MarkError::UnknownHop("nope".into()))
        );
        assert_eq!(
            Mark::parse(&["kv_send", "1", "2"]),
            Err(MarkError::Arity(3))
        );
        assert!(matches!(
            Mark::parse(&["kv_send", "1", "x", "3"]),
            Err(MarkError::Number(_))
        ));
    }

    #[test]
    fn every_hop_name_parses_back() {
        for h in Hop::ALL {
            assert_eq!(Hop::parse(h.name().as_bytes()), Some(h));
        }
    }
}
