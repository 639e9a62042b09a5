//! Other tools' output: pgbench's per-transaction log and redis-benchmark's CSV, as the same
//! figures.

use anyhow::anyhow;
use hdrhistogram::Histogram;

use super::histogram;

/// pgbench's per-transaction log (`--log`): `client txn latency_us script epoch epoch_us ...`,
/// with `failed` as the latency of a transaction that ended in a serialization or deadlock
/// failure. Returns (histogram of the completed ones, completed, failed, unparseable lines).
pub fn import_pgbench_log(text: &str) -> (Histogram<u64>, u64, u64, u64) {
    let mut hist = histogram();
    let (mut ok, mut failed, mut bad) = (0, 0, 0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match line.split_whitespace().nth(2) {
            Some("failed") => failed += 1,
            Some(t) => match t.parse::<u64>() {
                Ok(us) => {
                    hist.saturating_record(us);
                    ok += 1;
                }
                Err(_) => bad += 1,
            },
            None => bad += 1,
        }
    }
    (hist, ok, failed, bad)
}

/// The fields of one CSV line; a quoted field may hold commas (redis-benchmark's test name is
/// the whole command line of a custom command) and doubled quotes.
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let (mut quoted, mut chars) = (false, line.trim().chars().peekable());
    while let Some(c) = chars.next() {
        let field = fields.len() - 1;
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                fields[field].push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            c => fields[field].push(c),
        }
    }
    fields
}

/// One test of `redis-benchmark --csv`: requests/s and latency percentiles in µs.
#[derive(Clone, Debug, PartialEq)]
pub struct RedisFigures {
    /// The benchmark's test name, e.g. `SET`.
    pub test: String,
    /// Requests per second.
    pub rps: f64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 95th percentile latency, µs.
    pub p95_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// Slowest request, µs.
    pub max_us: u64,
}

/// Parses `redis-benchmark --csv` (Redis 7: `"test","rps","avg_latency_ms","min_latency_ms",
/// "p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"`), by header names.
pub fn import_redis_csv(text: &str) -> anyhow::Result<Vec<RedisFigures>> {
    let split = csv_fields;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = split(
        lines
            .next()
            .ok_or_else(|| anyhow!("empty redis-benchmark output"))?,
    );
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| anyhow!("no column {name} in redis-benchmark output"))
    };
    let (test, rps, p50, p95, p99, max) = (
        col("test")?,
        col("rps")?,
        col("p50_latency_ms")?,
        col("p95_latency_ms")?,
        col("p99_latency_ms")?,
        col("max_latency_ms")?,
    );
    lines
        .map(|l| {
            let f = split(l);
            let num = |i: usize| -> anyhow::Result<f64> {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow!("bad redis-benchmark line {l:?}"))
            };
            let us = |i: usize| num(i).map(|ms| (ms * 1000.0).round() as u64);
            Ok(RedisFigures {
                test: f.get(test).cloned().unwrap_or_default(),
                rps: num(rps)?,
                p50_us: us(p50)?,
                p95_us: us(p95)?,
                p99_us: us(p99)?,
                max_us: us(max)?,
            })
        })
        .collect()
}
