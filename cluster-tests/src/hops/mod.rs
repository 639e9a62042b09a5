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
//! marks are missing (a hop not recorded, such as the replication marks of a logserver from before
//! `logserver/src/pipeline/` recorded them) is shown as `-`.
//!
//! Files: this one runs the loads and prints the table; [`segments`] joins the marks into
//! segment durations (pure, unit-tested in `tests.rs`); [`floor`] measures the floor.

use anyhow::Context;
use protocol::hops::Mark;
use protocol::Response;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::loadgen::{self, Dist, Limit, Spec, Target, Workload};

pub mod floor;
pub mod segments;
#[cfg(test)]
mod tests;

pub use floor::{measure_floor, measure_floor_samples, Floor, FloorSamples};
pub use segments::{breakdown, quantile, Breakdown, Dumps, Replica, SEGMENTS};

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
    let mut c = crate::Credentials::from_env()
        .connect_any(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let lines = c.call_multi(b"HOPS").await.with_context(|| {
        format!("HOPS on {addr} (start the servers with --trace-hops: make bench-latency)")
    })?;
    lines
        .iter()
        .map(|l| match l {
            Response::Ok(args) => Mark::parse(args).map_err(anyhow::Error::from),
            other => Err(anyhow::anyhow!("{addr}: unexpected HOPS line {other:?}")),
        })
        .collect()
}

/// (id, is leader) of each log replica, from `STATUS`.
async fn roles(logs: &[String]) -> anyhow::Result<Vec<(u64, bool)>> {
    let mut out = Vec::new();
    for addr in logs {
        let mut c = crate::Credentials::from_env()
            .connect_any(addr.as_str())
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
            (follower) marks (logserver/src/pipeline/, network/serve.rs); \
            `-` where they are not recorded. Rows 4-5 run alongside rows 6-12.\n";
    for n in notes {
        out += &format!("\nNote: {n}.\n");
    }
    out
}
