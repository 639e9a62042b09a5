//! The join of every process's marks into per-segment durations: a pure function of the dumps,
//! so it is tested without processes. Each segment is measured only for commits whose both
//! ends were recorded; a mark recorded twice (a resend) counts from its first time.

use protocol::hops::{Hop, Mark};
use std::collections::HashMap;

use super::floor::Floor;

/// The marks of one replica, with its Raft id.
#[derive(Debug, Clone, Default)]
pub struct Replica {
    /// The replica's Raft id.
    pub id: u64,
    /// Its `HOPS` marks.
    pub marks: Vec<Mark>,
}

/// Everything collected after one load.
#[derive(Debug, Clone, Default)]
pub struct Dumps {
    /// The kvstore's marks.
    pub kv: Vec<Mark>,
    /// The log leader's marks.
    pub leader: Replica,
    /// The other replicas' marks.
    pub followers: Vec<Replica>,
}

/// The segments of a commit's path, in order. Rows 4-5 (the leader's own disk) run alongside
/// rows 6-12 (replication to the follower that completes the quorum first; rows 7-8 split 6).
pub const SEGMENTS: [&str; 18] = [
    "kv: line read → APPEND sent (committer queue)",
    "kv → leader: APPEND sent → read by the leader",
    "leader: read → proposed (batcher)",
    "leader: proposed → in its log store",
    "leader: fdatasync",
    "leader: proposed → AppendEntries sent*",
    "AppendEntries sent → in follower's log store*",
    "AppendEntries sent → read by the follower*",
    "read by the follower → in its log store*",
    "leader: proposed → in follower's log store",
    "follower: fdatasync",
    "follower flushed → its ack at the leader*",
    "ack at the leader → applied*",
    "durable on a quorum → applied on the leader",
    "leader: applied → replies handed over",
    "leader → kv: reply → taken up by the committer",
    "kv: log OK → reply flushed to the client",
    "total in the servers: line read → reply flushed",
];

/// Per segment (in [`SEGMENTS`] order), the durations in ns of every sampled commit for which
/// both ends were recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Breakdown {
    /// Sampled commits seen by the kvstore (with a `kv_recv` mark).
    pub sampled: usize,
    /// Of those, how many could be followed into the log (their Raft index found).
    pub joined: usize,
    /// Per segment, the durations in ns.
    pub segments: Vec<Vec<u64>>,
    /// Of the joined commits with both marks, how many reached the quorum follower's log store
    /// only after the leader's own fdatasync had returned (replication not overlapping the
    /// leader's disk), and out of how many.
    pub follower_after_leader_flush: (usize, usize),
}

/// (hop, key) -> (time, aux) of its first mark.
type Times = HashMap<(Hop, u64), (u64, u64)>;

/// First time of each (hop, key) in `marks` (a resent AppendEntries or a retried append marks
/// again; the first is when it happened).
fn first_times(marks: &[Mark]) -> Times {
    let mut m: Times = HashMap::new();
    for k in marks {
        m.entry((k.hop, k.key))
            .and_modify(|e| {
                if k.t_ns < e.0 {
                    *e = (k.t_ns, k.aux);
                }
            })
            .or_insert((k.t_ns, k.aux));
    }
    m
}

impl Breakdown {
    /// The p50 of a segment, by its name in [`SEGMENTS`].
    pub fn p50(&self, name: &str) -> Option<u64> {
        let i = SEGMENTS.iter().position(|s| *s == name)?;
        quantile(&mut self.segments.get(i)?.clone(), 0.5)
    }

    /// The floor with the fdatasyncs the sampled commits themselves waited for, on the leader
    /// and on the quorum follower (p50s), instead of a probe's: the same disk under the same
    /// load at the same moments, so noise between the probe and the load does not enter.
    pub fn own_floor(&self, probe: &Floor) -> Option<u64> {
        let l = self.p50("leader: fdatasync")?;
        let f = self.p50("follower: fdatasync")?;
        Some(
            l.saturating_add(f)
                .saturating_add(probe.rtt_p50.saturating_mul(2)),
        )
    }
}

/// Joins the marks per sampled commit and measures every segment (see [`SEGMENTS`]).
pub fn breakdown(d: &Dumps) -> Breakdown {
    let kv = first_times(&d.kv);
    let leader = first_times(&d.leader.marks);
    // (Hop, raft index, follower id) for the leader's per-follower marks.
    let mut per_follower: HashMap<(Hop, u64, u64), u64> = HashMap::new();
    for k in &d.leader.marks {
        if matches!(k.hop, Hop::RaftSend | Hop::RaftAck) {
            per_follower
                .entry((k.hop, k.key, k.aux))
                .and_modify(|t| *t = (*t).min(k.t_ns))
                .or_insert(k.t_ns);
        }
    }
    let followers: Vec<(u64, Times)> = d
        .followers
        .iter()
        .map(|f| (f.id, first_times(&f.marks)))
        .collect();
    let mut out = Breakdown {
        segments: vec![Vec::new(); SEGMENTS.len()],
        ..Breakdown::default()
    };
    let mut tss: Vec<u64> =
        d.kv.iter()
            .filter(|m| m.hop == Hop::KvRecv)
            .map(|m| m.key)
            .collect();
    tss.sort_unstable();
    tss.dedup();
    for ts in tss {
        out.sampled += 1;
        let at = |map: &Times, hop, key| map.get(&(hop, key)).copied();
        let t = |hop| at(&kv, hop, ts).map(|(t, _)| t);
        let recv = t(Hop::KvRecv);
        let send = t(Hop::KvSend);
        let log_ok = at(&kv, Hop::KvLogOk, ts);
        let reply = t(Hop::KvReply);
        // The logical index the log answered, then the Raft entry that holds it.
        let logical = log_ok.map(|(_, index)| index);
        let log_recv = logical.and_then(|i| at(&leader, Hop::LogRecv, i));
        let raft = log_recv.map(|(_, r)| r);
        if raft.is_some() {
            out.joined += 1;
        }
        let lt = |hop| raft.and_then(|r| at(&leader, hop, r)).map(|(t, _)| t);
        let propose = lt(Hop::LogPropose);
        let l_append = lt(Hop::LogAppend);
        let l_flushed = lt(Hop::LogFlushed);
        let l_apply = lt(Hop::LogApply);
        let l_reply = lt(Hop::LogReply);
        // The follower that made the quorum: the first to have the entry on disk.
        let quorum = raft.and_then(|r| {
            followers
                .iter()
                .filter_map(|(id, f)| {
                    let flushed = at(f, Hop::LogFlushed, r)?.0;
                    let t = |hop| at(f, hop, r).map(|(t, _)| t);
                    Some((flushed, *id, t(Hop::LogAppend), t(Hop::RaftRecv)))
                })
                .min()
        });
        let f_flushed = quorum.map(|q| q.0);
        let f_id = quorum.map(|q| q.1);
        let f_append = quorum.and_then(|q| q.2);
        let f_recv = quorum.and_then(|q| q.3);
        let pf = |hop| {
            let (r, id) = (raft?, f_id?);
            per_follower.get(&(hop, r, id)).copied()
        };
        let sent = pf(Hop::RaftSend);
        let ack = pf(Hop::RaftAck);
        if let (Some(lf), Some(fa)) = (l_flushed, f_append) {
            out.follower_after_leader_flush.1 += 1;
            if fa > lf {
                out.follower_after_leader_flush.0 += 1;
            }
        }
        let durable = match (l_flushed, f_flushed) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        let spans = [
            (recv, send),
            (send, log_recv.map(|(t, _)| t)),
            (log_recv.map(|(t, _)| t), propose),
            (propose, l_append),
            (l_append, l_flushed),
            (propose, sent),
            (sent, f_append),
            (sent, f_recv),
            (f_recv, f_append),
            (propose, f_append),
            (f_append, f_flushed),
            (f_flushed, ack),
            (ack, l_apply),
            (durable, l_apply),
            (l_apply, l_reply),
            (l_reply, log_ok.map(|(t, _)| t)),
            (log_ok.map(|(t, _)| t), reply),
            (recv, reply),
        ];
        for (seg, (from, to)) in out.segments.iter_mut().zip(spans) {
            // A later mark can carry an earlier time only across a clock mistake; skip it.
            if let (Some(a), Some(b)) = (from, to) {
                if let Some(d) = b.checked_sub(a) {
                    seg.push(d);
                }
            }
        }
    }
    out
}

/// The `p`-th percentile (0..=1) of `v` (sorted in place), `None` if empty.
pub fn quantile(v: &mut [u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v.get(i.min(v.len() - 1)).copied()
}
