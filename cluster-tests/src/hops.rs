//! `dtkv-bench hops` (`make bench-latency`): where a commit's time goes at a few clients.
//!
//! Against a system started with `--trace-hops` on the kvstore and every logserver, for each
//! client count: clear the marks (`HOPS`), run autocommit PUTs with one request in flight per
//! client, collect the marks of the kvstore and of the three replicas, and join them per
//! sampled commit ([`breakdown`], a pure function): the kvstore's marks are keyed by commit
//! timestamp, and carry the log's logical index (`kv_log_ok`); the leader's `log_recv` maps
//! that to the Raft index every replica keys its marks by. Before each load, the *floor* is
//! measured on the same machine: fdatasync on the data directory's disk and a loopback TCP
//! round trip ([`measure_floor`]); a commit cannot be faster than one leader fdatasync, one
//! follower fdatasync and two round trips (client → kvstore → leader → follower and back, the
//! leader's fdatasync overlapping the replication).
//!
//! All times are `CLOCK_MONOTONIC` (one clock for every process on the host). A segment whose
//! marks are missing (a hop not recorded, such as the leader's AppendEntries send and ack when
//! `logserver/src/network.rs` does not mark them) is shown as `-`.

use anyhow::Context;
use protocol::hops::{Hop, Mark};
use protocol::{Client, Response};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::loadgen::{self, Dist, Limit, Spec, Target, Workload};

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

/// The floor measured before a load, in ns (p50s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Floor {
    /// fdatasync of a small write in the data directory, median.
    pub fsync_p50: u64,
    /// fdatasync, 90th percentile.
    pub fsync_p90: u64,
    /// Loopback TCP round trip, median.
    pub rtt_p50: u64,
    /// Loopback TCP round trip, 90th percentile.
    pub rtt_p90: u64,
}

impl Floor {
    /// One leader fdatasync + one follower fdatasync + two loopback round trips.
    pub fn total(&self) -> u64 {
        self.fsync_p50
            .saturating_mul(2)
            .saturating_add(self.rtt_p50.saturating_mul(2))
    }
}

/// The raw durations (ns) behind a [`Floor`]: measurements taken at several moments are pooled
/// before their percentiles are taken, so one noisy moment weighs only its share.
#[derive(Debug, Clone, Default)]
pub struct FloorSamples {
    /// fdatasync durations.
    pub fsync: Vec<u64>,
    /// Loopback round-trip durations.
    pub rtt: Vec<u64>,
}

impl FloorSamples {
    /// Pools `other`'s samples with these.
    pub fn extend(&mut self, other: FloorSamples) {
        self.fsync.extend(other.fsync);
        self.rtt.extend(other.rtt);
    }

    /// The percentiles of the pooled samples (0 where there are none).
    pub fn floor(&self) -> Floor {
        let q = |v: &[u64], p| quantile(&mut v.to_vec(), p).unwrap_or(0);
        Floor {
            fsync_p50: q(&self.fsync, 0.5),
            fsync_p90: q(&self.fsync, 0.9),
            rtt_p50: q(&self.rtt, 0.5),
            rtt_p90: q(&self.rtt, 0.9),
        }
    }
}

/// [`measure_floor_samples`], summarised.
pub fn measure_floor(dir: &Path, n: usize) -> anyhow::Result<Floor> {
    Ok(measure_floor_samples(dir, n)?.floor())
}

/// `n` appends of 128 bytes to a probe file in `dir`, each followed by fdatasync (what a log
/// append costs the disk), then `n` ping-pongs of 32 bytes over loopback TCP between two
/// threads. The probe file is removed.
pub fn measure_floor_samples(dir: &Path, n: usize) -> anyhow::Result<FloorSamples> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("hops-fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut fsync = Vec::with_capacity(n);
    let rec = [b'x'; 128];
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&rec)?;
        f.sync_data()?;
        fsync.push(t.elapsed().as_nanos() as u64);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 32];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut rtt = Vec::with_capacity(n);
    let mut buf = [7u8; 32];
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        rtt.push(t.elapsed().as_nanos() as u64);
    }
    drop(c);
    let _ = echo.join();
    Ok(FloorSamples { fsync, rtt })
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The kvstore's DKSP address.
    pub kv: String,
    /// The three replicas' DKSP addresses.
    pub logs: Vec<String>,
    /// Where the floor's fdatasync probe goes (the data directory's disk).
    pub data_dir: PathBuf,
    /// The client counts to run, one load each.
    pub clients: Vec<usize>,
    /// How long each load runs.
    pub duration: Duration,
    /// Keys the clients write over.
    pub keys: u64,
    /// Bytes per value written.
    pub value_size: usize,
    /// fdatasyncs and round trips per floor measurement (half before the load, half after).
    pub floor_samples: usize,
}

/// One client count's results.
#[derive(Debug, Clone)]
pub struct Level {
    /// Closed-loop clients of this load.
    pub clients: usize,
    /// The load's throughput and latencies.
    pub row: loadgen::Row,
    /// The floor measured around it.
    pub floor: Floor,
    /// Where its sampled commits spent their time.
    pub breakdown: Breakdown,
    /// Set when the log leader changed during the load (the breakdown is then partial).
    pub note: String,
}

/// How often the marks are read during a load.
const COLLECT_EVERY: Duration = Duration::from_millis(500);

async fn hops_of(addr: &str) -> anyhow::Result<Vec<Mark>> {
    let mut c = Client::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let lines = c.call_multi(b"HOPS").await.with_context(|| {
        format!("HOPS on {addr} (start the servers with --trace-hops: make bench-latency)")
    })?;
    lines
        .iter()
        .map(|l| match l {
            Response::Ok(args) => Mark::parse(args).map_err(anyhow::Error::msg),
            other => Err(anyhow::anyhow!("{addr}: unexpected HOPS line {other:?}")),
        })
        .collect()
}

/// (id, is leader) of each log replica, from `STATUS`.
async fn roles(logs: &[String]) -> anyhow::Result<Vec<(u64, bool)>> {
    let mut out = Vec::new();
    for addr in logs {
        let mut c = Client::connect(addr.as_str())
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let st: HashMap<String, String> = c.status().await?.into_iter().collect();
        let id = st
            .get("id")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{addr}: STATUS has no id"))?;
        out.push((id, st.get("role").is_some_and(|r| r == "leader")));
    }
    Ok(out)
}

/// Runs every client count of `setup` in turn.
pub async fn run(setup: &Setup) -> anyhow::Result<Vec<Level>> {
    let mut levels = Vec::new();
    for &clients in &setup.clients {
        // The floor is measured just before and just after the load, half the samples each.
        let probe = || {
            let dir = setup.data_dir.clone();
            let n = setup.floor_samples.div_ceil(2);
            tokio::task::spawn_blocking(move || measure_floor_samples(&dir, n))
        };
        let mut floor_samples = probe().await??;
        let before = roles(&setup.logs).await?;
        hops_of(&setup.kv).await?;
        for l in &setup.logs {
            hops_of(l).await?;
        }
        let spec = Spec {
            target: Target::Dtkv,
            addrs: vec![setup.kv.clone()],
            workload: Workload::Put,
            clients,
            depth: 1,
            limit: Limit::Time(setup.duration),
            keys: setup.keys,
            dist: Dist::Uniform,
            zipf_s: 0.99,
            value_size: setup.value_size,
            rmw_ops: 4,
            progress: false,
        };
        // The marks are read every COLLECT_EVERY during the load as well, so that a busy
        // leader's ring (every entry marked) never wraps before it is read.
        let done = std::sync::atomic::AtomicBool::new(false);
        let load = async {
            let row = loadgen::run("dtkv", &spec).await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            row
        };
        let addrs: Vec<&str> = std::iter::once(setup.kv.as_str())
            .chain(setup.logs.iter().map(String::as_str))
            .collect();
        let collect = async {
            let mut acc: Vec<Vec<Mark>> = vec![Vec::new(); addrs.len()];
            loop {
                let last = done.load(std::sync::atomic::Ordering::SeqCst);
                if !last {
                    tokio::time::sleep(COLLECT_EVERY).await;
                }
                for (a, addr) in acc.iter_mut().zip(&addrs) {
                    a.extend(hops_of(addr).await?);
                }
                if last {
                    return anyhow::Ok(acc);
                }
            }
        };
        let (row, acc) = tokio::join!(load, collect);
        let mut acc = acc?.into_iter();
        let mut dumps = Dumps {
            kv: acc.next().unwrap_or_default(),
            ..Dumps::default()
        };
        for (marks, &(id, is_leader)) in acc.zip(&before) {
            if is_leader {
                dumps.leader = Replica { id, marks };
            } else {
                dumps.followers.push(Replica { id, marks });
            }
        }
        floor_samples.extend(probe().await??);
        let floor = floor_samples.floor();
        let after = roles(&setup.logs).await?;
        let note = if after != before || !before.iter().any(|r| r.1) {
            "the log leader changed during the load".to_string()
        } else {
            String::new()
        };
        levels.push(Level {
            clients,
            row,
            floor,
            breakdown: breakdown(&dumps),
            note,
        });
    }
    Ok(levels)
}

fn us(ns: u64) -> String {
    format!("{:.0}", ns as f64 / 1000.0)
}

/// The table: one column per client count, p50 / p90 in µs per segment, then the client's
/// figures and the floor.
pub fn table(levels: &[Level]) -> String {
    let mut out = String::from("| µs, p50 / p90 |");
    let mut rule = String::from("|---|");
    for l in levels {
        out += &format!(
            " {} client{} |",
            l.clients,
            if l.clients == 1 { "" } else { "s" }
        );
        rule += "---:|";
    }
    out += "\n";
    out += &rule;
    out += "\n";
    let mut line = |name: &str, cell: &dyn Fn(&Level) -> String| {
        out += &format!("| {name} |");
        for l in levels {
            out += &format!(" {} |", cell(l));
        }
        out += "\n";
    };
    for (i, name) in SEGMENTS.iter().enumerate() {
        line(name, &|l: &Level| {
            let mut v = l.breakdown.segments.get(i).cloned().unwrap_or_default();
            match (quantile(&mut v, 0.5), quantile(&mut v, 0.9)) {
                (Some(a), Some(b)) => format!("{} / {}", us(a), us(b)),
                _ => "-".into(),
            }
        });
    }
    line("sampled commits (joined to the log)", &|l: &Level| {
        format!("{} ({})", l.breakdown.sampled, l.breakdown.joined)
    });
    line(
        "follower's append after the leader's fdatasync returned",
        &|l: &Level| {
            let (after, of) = l.breakdown.follower_after_leader_flush;
            if of == 0 {
                "-".into()
            } else {
                format!("{:.0}%", 100.0 * after as f64 / of as f64)
            }
        },
    );
    line("**client: PUT/s**", &|l: &Level| {
        format!("{:.0}", l.row.per_sec)
    });
    line("**client: p50 / p99**", &|l: &Level| {
        format!("{} / {}", l.row.p50_us, l.row.p99_us)
    });
    line("floor: fdatasync p50 / p90", &|l: &Level| {
        format!("{} / {}", us(l.floor.fsync_p50), us(l.floor.fsync_p90))
    });
    line("floor: loopback round trip p50 / p90", &|l: &Level| {
        format!("{} / {}", us(l.floor.rtt_p50), us(l.floor.rtt_p90))
    });
    line("**floor: 2 fdatasync + 2 round trips**", &|l: &Level| {
        us(l.floor.total())
    });
    let ratio = |l: &Level, f: Option<u64>| match f {
        Some(f) if f > 0 => format!("{:.1}×", l.row.p50_us as f64 * 1000.0 / f as f64),
        _ => "-".into(),
    };
    line("**client p50 / floor**", &|l: &Level| {
        ratio(l, Some(l.floor.total()))
    });
    line(
        "floor from the commits' own fdatasyncs (leader + follower p50s above) + 2 round trips",
        &|l: &Level| l.breakdown.own_floor(&l.floor).map_or("-".into(), us),
    );
    line("**client p50 / that floor**", &|l: &Level| {
        ratio(l, l.breakdown.own_floor(&l.floor))
    });
    let notes: Vec<String> = levels
        .iter()
        .filter(|l| !l.note.is_empty())
        .map(|l| format!("{} clients: {}", l.clients, l.note))
        .collect();
    out += "\nRows marked * need the replication layer's `raft_send`/`raft_ack` (leader) and `raft_recv` \
            (follower) marks (logserver/src/network.rs); \
            `-` where they are not recorded. Rows 4-5 run alongside rows 6-12.\n";
    for n in notes {
        out += &format!("\nNote: {n}.\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(hop: Hop, key: u64, aux: u64, t_us: u64) -> Mark {
        Mark {
            hop,
            key,
            aux,
            t_ns: t_us * 1000,
        }
    }

    /// One commit (ts 500) that became logical index 7 in Raft entry 40, replicated to two
    /// followers of which follower 3 flushed first; a second commit (ts 501) that the log
    /// never saw; and marks of other entries around them.
    fn dumps(with_net_marks: bool) -> Dumps {
        let kv = vec![
            m(Hop::KvRecv, 500, 0, 1000),
            m(Hop::KvSend, 500, 9, 1010),
            m(Hop::KvRecv, 501, 0, 1020),
            m(Hop::KvLogOk, 500, 7, 1400),
            m(Hop::KvReply, 500, 0, 1420),
        ];
        let mut leader = vec![
            m(Hop::LogRecv, 6, 39, 900),
            m(Hop::LogRecv, 7, 40, 1040),
            m(Hop::LogPropose, 40, 0, 1050),
            m(Hop::LogAppend, 40, 0, 1060),
            m(Hop::LogFlushed, 40, 0, 1200),
            m(Hop::LogApply, 40, 0, 1350),
            m(Hop::LogReply, 40, 0, 1360),
            // A second flush mark of the same entry (a later group) does not count.
            m(Hop::LogFlushed, 40, 0, 1500),
        ];
        let mut f3 = vec![
            m(Hop::LogAppend, 40, 0, 1100),
            m(Hop::LogFlushed, 40, 0, 1300),
            m(Hop::LogAppend, 41, 0, 1301),
        ];
        if with_net_marks {
            f3.push(m(Hop::RaftRecv, 40, 0, 1080));
            leader.push(m(Hop::RaftSend, 40, 2, 1065));
            leader.push(m(Hop::RaftSend, 40, 3, 1070));
            leader.push(m(Hop::RaftAck, 40, 3, 1330));
            leader.push(m(Hop::RaftAck, 40, 2, 1340));
        }
        Dumps {
            kv,
            leader: Replica {
                id: 1,
                marks: leader,
            },
            followers: vec![
                Replica {
                    id: 2,
                    marks: vec![
                        m(Hop::LogAppend, 40, 0, 1080),
                        m(Hop::LogFlushed, 40, 0, 1310),
                    ],
                },
                Replica { id: 3, marks: f3 },
            ],
        }
    }

    fn us_of(b: &Breakdown) -> Vec<Option<u64>> {
        b.segments
            .iter()
            .map(|s| match s.as_slice() {
                [] => None,
                [d] => Some(d / 1000),
                more => panic!("one commit joined, got {} samples", more.len()),
            })
            .collect()
    }

    #[test]
    fn a_sampled_commit_is_followed_from_the_kvstore_through_the_quorum_and_back() {
        let b = breakdown(&dumps(true));
        assert_eq!((b.sampled, b.joined), (2, 1));
        // Follower 3 had it in its store at 1100, before the leader's fdatasync (1200).
        assert_eq!(b.follower_after_leader_flush, (0, 1));
        let want = [
            Some(10),  // kv queue
            Some(30),  // kv → leader
            Some(10),  // batcher
            Some(10),  // proposed → leader's store
            Some(140), // leader fdatasync
            Some(20),  // proposed → sent to follower 3 (the quorum one)
            Some(30),  // sent → follower 3's store
            Some(10),  // sent → read by follower 3
            Some(20),  // read → in its store
            Some(50),  // proposed → follower 3's store
            Some(200), // follower 3's fdatasync
            Some(30),  // flushed → ack
            Some(20),  // ack → applied
            Some(50),  // durable on both (1300) → applied
            Some(10),  // applied → replies
            Some(40),  // leader → committer
            Some(20),  // committer → client
            Some(420), // total
        ];
        assert_eq!(want.len(), SEGMENTS.len());
        let probe = Floor {
            fsync_p50: 1,
            fsync_p90: 1,
            rtt_p50: 15_000,
            rtt_p90: 15_000,
        };
        assert_eq!(b.own_floor(&probe), Some((140 + 200 + 30) * 1000));
        assert_eq!(us_of(&b), want);
    }

    #[test]
    fn without_the_network_marks_only_their_segments_are_missing() {
        let b = breakdown(&dumps(false));
        let got = us_of(&b);
        for (i, name) in SEGMENTS.iter().enumerate() {
            assert_eq!(
                got[i].is_none(),
                name.ends_with('*'),
                "{name}: {:?}",
                got[i]
            );
        }
        let mut total = b.segments[SEGMENTS.len() - 1].clone();
        assert_eq!(quantile(&mut total, 0.5), Some(420_000));
    }

    #[test]
    fn a_commit_the_log_never_answered_has_only_its_kvstore_segments() {
        let mut d = dumps(false);
        d.kv.retain(|k| k.key == 501 || k.hop == Hop::KvSend);
        let b = breakdown(&d);
        assert_eq!((b.sampled, b.joined), (1, 0));
        assert!(b.segments.iter().all(|s| s.is_empty()));
    }

    #[test]
    fn the_floor_is_two_fdatasyncs_and_two_round_trips() {
        let f = Floor {
            fsync_p50: 200_000,
            fsync_p90: 900_000,
            rtt_p50: 30_000,
            rtt_p90: 60_000,
        };
        assert_eq!(f.total(), 460_000);
        assert_eq!(quantile(&mut [5, 1, 3], 0.5), Some(3));
        assert_eq!(quantile(&mut [], 0.5), None);
    }

    #[test]
    fn the_floor_is_measured_on_the_given_directory_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let f = measure_floor(dir.path(), 20).unwrap();
        assert!(f.fsync_p50 > 0 && f.rtt_p50 > 0);
        assert!(f.fsync_p50 <= f.fsync_p90 && f.rtt_p50 <= f.rtt_p90);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
