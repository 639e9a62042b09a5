//! The load generator behind `dtkv-bench`, `make bench` and `make bench-peers`.
//!
//! A run is N client connections, each a closed loop: autocommit `PUT`/`GET` (or a 50/50 mix)
//! with up to `depth` requests in flight, or a read-modify-write transaction of K operations
//! with one request in flight. Keys are `key0000042`-style names drawn uniformly or zipfian from
//! a fixed key count; values have a fixed size. Each client records its own latencies in an HDR
//! histogram (so nothing is shared on the hot path but three counters for the progress line)
//! and the histograms are merged at the end into a [`Row`]: throughput, p50/p95/p99/max, aborts,
//! errors. A failed connection is counted as errors for what it had in flight and reconnected,
//! so a bad server shows up as a number in the table, not as a panic.
//!
//! The same loop drives etcd through its v3 HTTP/JSON gateway (a minimal HTTP/1.1 client over a
//! keep-alive `TcpStream`), where the transaction is the optimistic form etcd offers: read the
//! keys with their `mod_revision`, then one `txn` that writes them if no revision moved. Other
//! systems' own tools (pgbench, redis-benchmark) are turned into the same [`Row`]s by
//! [`import_pgbench_log`] and [`import_redis_csv`], so one table compares them all.

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

mod conn;
mod import;
mod run;
mod suite;
mod table;
#[cfg(test)]
mod tests;

pub use import::*;
pub use run::*;
pub use suite::*;
pub use table::*;

/// Aborted transactions as a share of those tried (0 when none were).
pub fn abort_rate(ops: u64, aborts: u64) -> f64 {
    let tried = ops.saturating_add(aborts);
    if tried == 0 {
        0.0
    } else {
        aborts as f64 / tried as f64
    }
}

/// The system a run drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// dtkv's kvstore over DKSP.
    Dtkv,
    /// etcd through its v3 HTTP/JSON gateway.
    Etcd,
}

/// What each client does in its loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Autocommit PUT.
    Put,
    /// Autocommit GET.
    Get,
    /// Autocommit, each operation a GET or a PUT with equal odds.
    Mixed,
    /// A transaction reading ceil(K/2) keys and writing floor(K/2) of them back.
    Rmw,
}

/// How keys are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dist {
    /// Every key with equal odds.
    Uniform,
    /// Zipfian over the key count: a few hot keys take most operations.
    Zipfian,
}

impl Workload {
    /// The workload's name in tables, e.g. `put` or `rmw4` (with `rmw_ops` operations).
    pub fn name(self, rmw_ops: usize) -> String {
        match self {
            Workload::Put => "put".into(),
            Workload::Get => "get".into(),
            Workload::Mixed => "mixed".into(),
            Workload::Rmw => format!("rmw{rmw_ops}"),
        }
    }
}

impl Dist {
    /// The distribution's name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Dist::Uniform => "uniform",
            Dist::Zipfian => "zipfian",
        }
    }
}

/// When a run stops: after a time, or after a number of operations (transactions) in total.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// Stop after this long.
    Time(Duration),
    /// Stop after this many operations (transactions) over all clients.
    Ops(u64),
}

/// Everything that defines one run.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The system to drive.
    pub target: Target,
    /// Clients are spread over these round-robin (etcd: one per member).
    pub addrs: Vec<String>,
    /// What each client does.
    pub workload: Workload,
    /// Client connections, each a closed loop.
    pub clients: usize,
    /// Autocommit requests each client keeps in flight (transactions always have one).
    pub depth: usize,
    /// When the run stops.
    pub limit: Limit,
    /// Keys drawn from.
    pub keys: u64,
    /// How keys are drawn.
    pub dist: Dist,
    /// The zipfian exponent (unused with a uniform distribution).
    pub zipf_s: f64,
    /// Bytes per value written.
    pub value_size: usize,
    /// Operations per read-modify-write transaction.
    pub rmw_ops: usize,
    /// Print a progress line while running.
    pub progress: bool,
}

/// One line of a results table, from our own runs or imported from another tool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The system measured, e.g. `dtkv`, `etcd`, `redis`.
    pub system: String,
    /// The workload's name ([`Workload::name`], or the imported tool's test name).
    pub workload: String,
    /// The key distribution's name.
    pub dist: String,
    /// Client connections.
    pub clients: usize,
    /// Requests each client kept in flight.
    pub depth: usize,
    /// Keys drawn from.
    pub keys: u64,
    /// Bytes per value.
    pub value_size: usize,
    /// How long the run took.
    pub seconds: f64,
    /// Completed operations, or committed transactions.
    pub ops: u64,
    /// Transactions aborted (conflicts).
    pub aborts: u64,
    /// Operations that failed (`ERR`, a broken connection).
    pub errors: u64,
    /// Throughput: `ops / seconds`.
    pub per_sec: f64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 95th percentile latency, µs.
    pub p95_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// Slowest operation, µs.
    pub max_us: u64,
    /// How this system's row differs from the others (a tool's limitation, a substitute).
    #[serde(default)]
    pub note: String,
    /// Which round of an interleaved run (`make bench-peers`, `--round`) this row is. Files
    /// written before rounds existed have none: each such row counts as one round of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
}

impl Row {
    /// Rows of different systems with the same key are the same experiment.
    pub fn key(&self) -> (String, String, usize, usize) {
        (
            self.workload.clone(),
            self.dist.clone(),
            self.clients,
            self.depth,
        )
    }

    /// Aborted transactions as a fraction of those tried (0 when none were).
    pub fn abort_rate(&self) -> f64 {
        abort_rate(self.ops, self.aborts)
    }
}

/// A results file: `bench/results/<date>.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    /// The day the results were taken (the file's name).
    pub date: String,
    /// The machine they were taken on ([`machine`]).
    pub machine: String,
    /// Every row, of every system.
    pub rows: Vec<Row>,
}

impl Results {
    /// Reads a results file.
    pub fn load(path: &Path) -> anyhow::Result<Results> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Adds rows to the file, creating it if needed, so several tools can fill one file.
    pub fn append(path: &Path, date: &str, rows: &[Row]) -> anyhow::Result<()> {
        let mut r = if path.exists() {
            Results::load(path)?
        } else {
            Results {
                date: date.to_string(),
                machine: machine(),
                rows: Vec::new(),
            }
        };
        r.rows.extend_from_slice(rows);
        let text = serde_json::to_string_pretty(&r)?;
        std::fs::write(path, text + "\n").with_context(|| format!("{}", path.display()))
    }
}

/// `2 cores of <cpu model>, 23 GiB, Linux <release>`, from /proc (empty parts left out).
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores of {model}, {} GiB RAM, Linux {}",
        mem_kib / (1024 * 1024),
        kernel.trim()
    )
}

/// `10s`, `500ms`, `2m` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("duration must be positive: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The `p` quantile (0..=1) of already sorted samples; 0 for none.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Zipfian sampler over `0..n` by inverse CDF: rank 0 is the hottest key.
pub struct Zipf(Vec<f64>);

impl Zipf {
    /// A sampler over `n` keys with exponent `s`.
    pub fn new(n: u64, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut sum = 0.0;
        for i in 1..=n {
            sum += 1.0 / (i as f64).powf(s);
            cdf.push(sum);
        }
        cdf.iter_mut().for_each(|c| *c /= sum);
        Zipf(cdf)
    }

    /// A key, rank 0 the hottest.
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.gen();
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1) as u64
    }
}

/// The name of key `k`: `key` and seven digits.
pub fn key_name(k: u64) -> String {
    format!("key{k:07}")
}

/// A value of exactly `size` bytes that names its writer (useful when reading a dump).
pub fn value(size: usize, client: usize, seq: u64) -> Vec<u8> {
    let mut v = format!("c{client}-{seq}-").into_bytes();
    v.resize(size, b'x');
    v
}

/// A latency histogram in microseconds, 1 µs to 10 min at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

/// Builds a row from a run's totals and its merged latency histogram.
pub fn summarize(
    meta: &Row,
    hist: &Histogram<u64>,
    ops: u64,
    aborts: u64,
    errors: u64,
    seconds: f64,
) -> Row {
    let q = |p: f64| {
        if hist.is_empty() {
            0
        } else {
            hist.value_at_quantile(p)
        }
    };
    Row {
        seconds,
        ops,
        aborts,
        errors,
        per_sec: if seconds > 0.0 {
            ops as f64 / seconds
        } else {
            0.0
        },
        p50_us: q(0.50),
        p95_us: q(0.95),
        p99_us: q(0.99),
        max_us: hist.max(),
        ..meta.clone()
    }
}

/// The row's description without figures.
pub fn meta(system: &str, spec: &Spec) -> Row {
    Row {
        system: system.to_string(),
        workload: spec.workload.name(spec.rmw_ops),
        dist: spec.dist.name().to_string(),
        clients: spec.clients,
        depth: spec.depth,
        keys: spec.keys,
        value_size: spec.value_size,
        seconds: 0.0,
        ops: 0,
        aborts: 0,
        errors: 0,
        per_sec: 0.0,
        p50_us: 0,
        p95_us: 0,
        p99_us: 0,
        max_us: 0,
        note: String::new(),
        round: None,
    }
}
