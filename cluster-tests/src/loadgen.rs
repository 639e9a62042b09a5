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

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use hdrhistogram::Histogram;
use protocol::{Client, Response};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Dtkv,
    Etcd,
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dist {
    Uniform,
    Zipfian,
}

impl Workload {
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
    Time(Duration),
    Ops(u64),
}

/// Everything that defines one run.
#[derive(Clone, Debug)]
pub struct Spec {
    pub target: Target,
    /// Clients are spread over these round-robin (etcd: one per member).
    pub addrs: Vec<String>,
    pub workload: Workload,
    pub clients: usize,
    pub depth: usize,
    pub limit: Limit,
    pub keys: u64,
    pub dist: Dist,
    pub zipf_s: f64,
    pub value_size: usize,
    pub rmw_ops: usize,
    pub progress: bool,
}

/// One line of a results table, from our own runs or imported from another tool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub system: String,
    pub workload: String,
    pub dist: String,
    pub clients: usize,
    pub depth: usize,
    pub keys: u64,
    pub value_size: usize,
    pub seconds: f64,
    /// Completed operations, or committed transactions.
    pub ops: u64,
    pub aborts: u64,
    pub errors: u64,
    pub per_sec: f64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
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

    pub fn abort_rate(&self) -> f64 {
        let tried = self.ops + self.aborts;
        if tried == 0 {
            0.0
        } else {
            self.aborts as f64 / tried as f64
        }
    }
}

/// A results file: `bench/results/<date>.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub date: String,
    pub machine: String,
    pub rows: Vec<Row>,
}

impl Results {
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

/// "2 cores of <cpu model>, 23 GiB, Linux <release>", from /proc (empty parts left out).
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

    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.gen();
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1) as u64
    }
}

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

// ---------------------------------------------------------------------------------------------
// The standard set

/// One experiment of the standard set; every system runs the same list (`dtkv-bench list`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SuiteRow {
    pub workload: Workload,
    pub dist: Dist,
    pub clients: usize,
    pub depth: usize,
}

/// The standard set: each workload at 16 clients (the issue's reference point), the writes and
/// transactions again at 64, and pipelined autocommit rows (16 in flight per connection).
pub fn standard_suite() -> Vec<SuiteRow> {
    use Dist::*;
    use Workload::*;
    let r = |workload, dist, clients, depth| SuiteRow {
        workload,
        dist,
        clients,
        depth,
    };
    vec![
        r(Put, Uniform, 16, 1),
        r(Get, Uniform, 16, 1),
        r(Mixed, Uniform, 16, 1),
        r(Rmw, Uniform, 16, 1),
        r(Rmw, Zipfian, 16, 1),
        r(Put, Uniform, 64, 1),
        r(Rmw, Uniform, 64, 1),
        r(Put, Uniform, 16, 16),
        r(Get, Uniform, 16, 16),
    ]
}

impl SuiteRow {
    /// `rmw zipfian 16 1`: what `dtkv-bench list` prints and `suite --only` matches.
    pub fn line(&self) -> String {
        let w = match self.workload {
            Workload::Rmw => "rmw".to_string(),
            w => w.name(0),
        };
        format!("{w} {} {} {}", self.dist.name(), self.clients, self.depth)
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

/// How one request or transaction ended, short of a broken connection.
#[derive(Debug, PartialEq)]
enum Outcome {
    Done,
    Aborted,
    /// The server answered with an error (`ERR`, HTTP status): counted, the connection is kept.
    Failed,
}

enum Conn {
    Dtkv(Client),
    Etcd(Http),
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

impl Conn {
    async fn connect(target: Target, addr: &str) -> anyhow::Result<Conn> {
        Ok(match target {
            Target::Dtkv => Conn::Dtkv(Client::connect(addr).await?),
            Target::Etcd => Conn::Etcd(Http::connect(addr).await?),
        })
    }

    /// Queues an autocommit write; its reply is read by [`Conn::recv`].
    fn send_put(&mut self, key: &str, value: &[u8]) {
        match self {
            Conn::Dtkv(c) => {
                let mut line = Vec::with_capacity(key.len() + value.len() + 5);
                line.extend_from_slice(b"PUT ");
                line.extend_from_slice(key.as_bytes());
                line.push(b' ');
                line.extend_from_slice(value);
                c.send(&line);
            }
            Conn::Etcd(h) => {
                let body = format!(
                    r#"{{"key":"{}","value":"{}"}}"#,
                    b64(key.as_bytes()),
                    b64(value)
                );
                h.send("/v3/kv/put", &body);
            }
        }
    }

    fn send_get(&mut self, key: &str) {
        match self {
            Conn::Dtkv(c) => c.send(format!("GET {key}").as_bytes()),
            Conn::Etcd(h) => h.send(
                "/v3/kv/range",
                &format!(r#"{{"key":"{}"}}"#, b64(key.as_bytes())),
            ),
        }
    }

    async fn recv(&mut self) -> anyhow::Result<Outcome> {
        match self {
            Conn::Dtkv(c) => Ok(match c.recv().await? {
                Response::Err(_) => Outcome::Failed,
                _ => Outcome::Done,
            }),
            Conn::Etcd(h) => Ok(match h.recv().await?.0 {
                200 => Outcome::Done,
                _ => Outcome::Failed,
            }),
        }
    }

    /// One read-modify-write transaction: read every key, write the first `writes` back.
    async fn rmw(
        &mut self,
        keys: &[String],
        writes: usize,
        value: &[u8],
    ) -> anyhow::Result<Outcome> {
        match self {
            Conn::Dtkv(c) => {
                let mut failed = !matches!(c.call(b"BEGIN").await?, Response::Ok(_));
                for k in keys {
                    if failed {
                        break;
                    }
                    failed = matches!(
                        c.call(format!("GET {k}").as_bytes()).await?,
                        Response::Err(_)
                    );
                }
                for k in &keys[..writes] {
                    if failed {
                        break;
                    }
                    let mut line = format!("PUT {k} ").into_bytes();
                    line.extend_from_slice(value);
                    failed = matches!(c.call(&line).await?, Response::Err(_));
                }
                if failed {
                    // Leaves the connection outside any transaction; the reply does not matter.
                    c.call(b"ABORT").await?;
                    return Ok(Outcome::Failed);
                }
                Ok(match c.call(b"COMMIT").await? {
                    Response::Committed(_) => Outcome::Done,
                    Response::Aborted(_) => Outcome::Aborted,
                    _ => Outcome::Failed,
                })
            }
            Conn::Etcd(h) => {
                // etcd rejects a txn that puts one key twice, so a key drawn twice is read and
                // written once.
                let mut distinct: Vec<&String> = Vec::with_capacity(keys.len());
                for k in keys {
                    if !distinct.contains(&k) {
                        distinct.push(k);
                    }
                }
                let written: Vec<&String> = distinct
                    .iter()
                    .copied()
                    .filter(|k| keys[..writes].contains(k))
                    .collect();
                let mut revs = Vec::with_capacity(distinct.len());
                for k in &distinct {
                    h.send(
                        "/v3/kv/range",
                        &format!(r#"{{"key":"{}"}}"#, b64(k.as_bytes())),
                    );
                    let (status, body) = h.recv().await?;
                    if status != 200 {
                        return Ok(Outcome::Failed);
                    }
                    match etcd_mod_revision(&body) {
                        Some(r) => revs.push(r),
                        None => return Ok(Outcome::Failed),
                    }
                }
                let compare: Vec<String> = distinct
                    .iter()
                    .zip(&revs)
                    .map(|(k, r)| {
                        format!(
                            r#"{{"key":"{}","target":"MOD","result":"EQUAL","mod_revision":"{r}"}}"#,
                            b64(k.as_bytes())
                        )
                    })
                    .collect();
                let success: Vec<String> = written
                    .iter()
                    .map(|k| {
                        format!(
                            r#"{{"request_put":{{"key":"{}","value":"{}"}}}}"#,
                            b64(k.as_bytes()),
                            b64(value)
                        )
                    })
                    .collect();
                let body = format!(
                    r#"{{"compare":[{}],"success":[{}]}}"#,
                    compare.join(","),
                    success.join(",")
                );
                h.send("/v3/kv/txn", &body);
                let (status, body) = h.recv().await?;
                if status != 200 {
                    return Ok(Outcome::Failed);
                }
                Ok(match etcd_succeeded(&body) {
                    Some(true) => Outcome::Done,
                    Some(false) => Outcome::Aborted,
                    None => Outcome::Failed,
                })
            }
        }
    }
}

/// The `mod_revision` of the first key of a range reply; 0 if the key does not exist (which is
/// what etcd compares a missing key's revision against). The gateway writes int64 as strings.
fn etcd_mod_revision(body: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    match v.get("kvs").and_then(|kvs| kvs.get(0)) {
        None => Some(0),
        Some(kv) => match kv.get("mod_revision")? {
            serde_json::Value::String(s) => s.parse().ok(),
            n => n.as_u64(),
        },
    }
}

/// Whether a txn reply says its compares held. proto3 JSON may leave out a false field.
fn etcd_succeeded(body: &[u8]) -> Option<bool> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("header")?;
    Some(
        v.get("succeeded")
            .and_then(|s| s.as_bool())
            .unwrap_or(false),
    )
}

/// A keep-alive HTTP/1.1 client for small JSON POSTs, pipelining like [`Client`]: `send`
/// queues, `recv` flushes and reads the next response in order.
struct Http {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    out: Vec<u8>,
    host: String,
}

impl Http {
    async fn connect(addr: &str) -> anyhow::Result<Http> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        Ok(Http {
            rd: BufReader::new(rd),
            wr,
            out: Vec::new(),
            host: addr.to_string(),
        })
    }

    fn send(&mut self, path: &str, body: &str) {
        self.out.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.host,
                body.len()
            )
            .as_bytes(),
        );
        self.out.extend_from_slice(body.as_bytes());
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.rd.read_line(&mut line).await? == 0 {
            bail!("server closed the connection");
        }
        Ok(line.trim_end().to_string())
    }

    /// The next response's status and body (Content-Length or chunked).
    async fn recv(&mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        if !self.out.is_empty() {
            self.wr.write_all(&self.out).await?;
            self.out.clear();
        }
        let status_line = self.line().await?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad HTTP status line {status_line:?}"))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            let h = self.line().await?;
            if h.is_empty() {
                break;
            }
            let Some((name, v)) = h.split_once(':') else {
                continue;
            };
            let v = v.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse::<usize>().context("Content-Length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let size_line = self.line().await?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .with_context(|| format!("chunk size {size_line:?}"))?;
                let start = body.len();
                body.resize(start + size, 0);
                self.rd.read_exact(&mut body[start..]).await?;
                self.line().await?;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            self.rd.read_exact(&mut body).await?;
        }
        Ok((status, body))
    }
}

// ---------------------------------------------------------------------------------------------
// Running

/// Shared by the clients: what the progress line shows, and the operation budget.
struct Shared {
    ops: AtomicU64,
    aborts: AtomicU64,
    errors: AtomicU64,
    /// Operations (transactions) still to start, for `Limit::Ops`.
    remaining: AtomicI64,
    deadline: Option<Instant>,
}

impl Shared {
    /// Whether the client may start another operation.
    fn take(&self) -> bool {
        match self.deadline {
            Some(d) => Instant::now() < d,
            None => self.remaining.fetch_sub(1, Ordering::Relaxed) > 0,
        }
    }
}

struct ClientTotals {
    hist: Histogram<u64>,
    ops: u64,
    aborts: u64,
    errors: u64,
}

/// Keeps a client connected: after a failure it waits a little, so a dead server costs one
/// error per 100 ms per client rather than a busy loop.
async fn reconnect(
    target: Target,
    addr: &str,
    shared: &Shared,
    t: &mut ClientTotals,
) -> Option<Conn> {
    loop {
        if let Some(d) = shared.deadline {
            if Instant::now() >= d {
                return None;
            }
        } else if shared.remaining.load(Ordering::Relaxed) <= 0 {
            return None;
        }
        match Conn::connect(target, addr).await {
            Ok(c) => return Some(c),
            Err(_) => {
                t.errors += 1;
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn client(
    spec: Arc<Spec>,
    id: usize,
    shared: Arc<Shared>,
    zipf: Option<Arc<Zipf>>,
) -> ClientTotals {
    let addr = spec.addrs[id % spec.addrs.len()].clone();
    let mut rng = StdRng::seed_from_u64(id as u64);
    let mut t = ClientTotals {
        hist: histogram(),
        ops: 0,
        aborts: 0,
        errors: 0,
    };
    let pick = |rng: &mut StdRng| match &zipf {
        Some(z) => z.sample(rng),
        None => rng.gen_range(0..spec.keys),
    };
    let mut seq = 0u64;
    let Some(mut conn) = reconnect(spec.target, &addr, &shared, &mut t).await else {
        return t;
    };
    if spec.workload == Workload::Rmw {
        let reads = spec.rmw_ops.div_ceil(2).max(1);
        let writes = (spec.rmw_ops / 2).min(reads);
        while shared.take() {
            let keys: Vec<String> = (0..reads).map(|_| key_name(pick(&mut rng))).collect();
            seq += 1;
            let v = value(spec.value_size, id, seq);
            let t0 = Instant::now();
            match conn.rmw(&keys, writes, &v).await {
                Ok(Outcome::Done) => {
                    t.hist.saturating_record(t0.elapsed().as_micros() as u64);
                    t.ops += 1;
                    shared.ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Outcome::Aborted) => {
                    t.aborts += 1;
                    shared.aborts.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Outcome::Failed) | Err(_) => {
                    t.errors += 1;
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    // The transaction state on the connection is unknown after a failure.
                    match reconnect(spec.target, &addr, &shared, &mut t).await {
                        Some(c) => conn = c,
                        None => break,
                    }
                }
            }
        }
        return t;
    }
    let mut inflight: VecDeque<Instant> = VecDeque::with_capacity(spec.depth);
    loop {
        while inflight.len() < spec.depth && shared.take() {
            let key = key_name(pick(&mut rng));
            let put = match spec.workload {
                Workload::Put => true,
                Workload::Get => false,
                _ => rng.gen_bool(0.5),
            };
            if put {
                seq += 1;
                conn.send_put(&key, &value(spec.value_size, id, seq));
            } else {
                conn.send_get(&key);
            }
            inflight.push_back(Instant::now());
        }
        let Some(&t0) = inflight.front() else {
            break;
        };
        match conn.recv().await {
            Ok(outcome) => {
                inflight.pop_front();
                if outcome == Outcome::Done {
                    t.hist.saturating_record(t0.elapsed().as_micros() as u64);
                    t.ops += 1;
                    shared.ops.fetch_add(1, Ordering::Relaxed);
                } else {
                    t.errors += 1;
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                let lost = inflight.len() as u64;
                inflight.clear();
                t.errors += lost;
                shared.errors.fetch_add(lost, Ordering::Relaxed);
                match reconnect(spec.target, &addr, &shared, &mut t).await {
                    Some(c) => conn = c,
                    None => break,
                }
            }
        }
    }
    t
}

/// Runs one experiment and returns its row (`system` names it in the tables).
pub async fn run(system: &str, spec: &Spec) -> Row {
    let spec = Arc::new(spec.clone());
    let zipf = (spec.dist == Dist::Zipfian).then(|| Arc::new(Zipf::new(spec.keys, spec.zipf_s)));
    let start = Instant::now();
    let shared = Arc::new(Shared {
        ops: AtomicU64::new(0),
        aborts: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        remaining: AtomicI64::new(match spec.limit {
            Limit::Ops(n) => n as i64,
            Limit::Time(_) => i64::MAX,
        }),
        deadline: match spec.limit {
            Limit::Time(d) => Some(start + d),
            Limit::Ops(_) => None,
        },
    });
    let label = format!(
        "{system} {} {} c{} d{}",
        spec.workload.name(spec.rmw_ops),
        spec.dist.name(),
        spec.clients,
        spec.depth
    );
    let progress = spec.progress.then(|| {
        let shared = shared.clone();
        tokio::spawn(progress_line(label, shared, start))
    });
    let tasks: Vec<_> = (0..spec.clients)
        .map(|id| tokio::spawn(client(spec.clone(), id, shared.clone(), zipf.clone())))
        .collect();
    let mut hist = histogram();
    let (mut ops, mut aborts, mut errors) = (0, 0, 0);
    for task in tasks {
        match task.await {
            Ok(t) => {
                // Same bounds on both sides, so adding cannot fail.
                let _ = hist.add(&t.hist);
                ops += t.ops;
                aborts += t.aborts;
                errors += t.errors;
            }
            Err(_) => errors += 1,
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    summarize(&meta(system, &spec), &hist, ops, aborts, errors, seconds)
}

async fn progress_line(label: String, shared: Arc<Shared>, start: Instant) {
    let tty = std::io::stderr().is_terminal();
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let ops = shared.ops.load(Ordering::Relaxed);
        let line = format!(
            "  {label}: {:>4.0} s, {ops} done, {}/s now, {} aborted, {} errors",
            start.elapsed().as_secs_f64(),
            ops - last,
            shared.aborts.load(Ordering::Relaxed),
            shared.errors.load(Ordering::Relaxed)
        );
        last = ops;
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
}

/// Writes every key once (pipelined, 16 connections) so reads find values; returns the errors.
pub async fn preload(spec: &Spec) -> u64 {
    let conns = 16.min(spec.keys as usize).max(1);
    let tasks: Vec<_> = (0..conns)
        .map(|id| {
            let spec = spec.clone();
            tokio::spawn(async move {
                let addr = &spec.addrs[id % spec.addrs.len()];
                let Ok(mut c) = Conn::connect(spec.target, addr).await else {
                    return 1u64;
                };
                let mine: Vec<u64> = (id as u64..spec.keys).step_by(conns).collect();
                let (mut sent, mut errors) = (0, 0u64);
                for done in 0..mine.len() {
                    while sent < mine.len() && sent - done < 64 {
                        c.send_put(&key_name(mine[sent]), &value(spec.value_size, id, 0));
                        sent += 1;
                    }
                    match c.recv().await {
                        Ok(Outcome::Done) => {}
                        Ok(_) => errors += 1,
                        Err(_) => return errors + (mine.len() - done) as u64,
                    }
                }
                errors
            })
        })
        .collect();
    let mut errors = 0;
    for t in tasks {
        errors += t.await.unwrap_or(1);
    }
    errors
}

// ---------------------------------------------------------------------------------------------
// Other tools' output

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
    pub test: String,
    pub rps: f64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
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

// ---------------------------------------------------------------------------------------------
// Tables

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One system's rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| system | workload | key choice | clients | in flight | ops/s | abort rate | errors | p50 µs | p95 µs | p99 µs | max µs |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.1}% | {} | {} | {} | {} | {} |\n",
            r.system,
            r.workload,
            r.dist,
            r.clients,
            r.depth,
            thousands(r.per_sec),
            100.0 * r.abort_rate(),
            r.errors,
            thousands(r.p50_us as f64),
            thousands(r.p95_us as f64),
            thousands(r.p99_us as f64),
            thousands(r.max_us as f64),
        );
    }
    out
}

/// The median of `values`: the middle one, or the mean of the middle two for an even count;
/// `None` for no values. NaNs sort last (`total_cmp`), so one cannot panic the sort.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// One system's rounds of one experiment, reduced to what the side-by-side table shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Rounds {
    pub rounds: usize,
    /// ops/s: the median over rounds, and the slowest and fastest round.
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The median of the rounds' p99 latencies, µs.
    pub p99_us: f64,
    /// Summed over rounds.
    pub ops: u64,
    pub aborts: u64,
    pub errors: u64,
}

impl Rounds {
    /// The rounds of `rows` (all of one system and experiment); `None` for no rows.
    pub fn of(rows: &[&Row]) -> Option<Rounds> {
        let per_sec: Vec<f64> = rows.iter().map(|r| r.per_sec).collect();
        let p99: Vec<f64> = rows.iter().map(|r| r.p99_us as f64).collect();
        Some(Rounds {
            rounds: rows.len(),
            median: median(&per_sec)?,
            min: per_sec.iter().copied().fold(f64::INFINITY, f64::min),
            max: per_sec.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            p99_us: median(&p99)?,
            ops: rows.iter().map(|r| r.ops).sum(),
            aborts: rows.iter().map(|r| r.aborts).sum(),
            errors: rows.iter().map(|r| r.errors).sum(),
        })
    }

    /// The slowest and the fastest round as a percentage off the median (-4.0, 2.5); zeros
    /// when the median is zero.
    pub fn spread_pct(&self) -> (f64, f64) {
        if self.median > 0.0 {
            (
                100.0 * (self.min / self.median - 1.0),
                100.0 * (self.max / self.median - 1.0),
            )
        } else {
            (0.0, 0.0)
        }
    }

    pub fn abort_rate(&self) -> f64 {
        let tried = self.ops + self.aborts;
        if tried == 0 {
            0.0
        } else {
            self.aborts as f64 / tried as f64
        }
    }

    /// Our median ops/s divided by theirs; `None` when theirs is zero.
    pub fn ratio(&self, theirs: &Rounds) -> Option<f64> {
        (theirs.median > 0.0).then(|| self.median / theirs.median)
    }
}

/// The experiments (row keys) `system` ran, in the order its first rows came.
fn experiments_of(rows: &[Row], system: &str) -> Vec<(String, String, usize, usize)> {
    let mut keys = Vec::new();
    for r in rows.iter().filter(|r| r.system == system) {
        if !keys.contains(&r.key()) {
            keys.push(r.key());
        }
    }
    keys
}

/// The side-by-side table: one line per experiment `ours` ran, for each system the median
/// ops/s over its rounds with the slowest and fastest round as % of that median and the median
/// p99, and our median divided by theirs. Every row of a system and experiment is one round
/// (rows of old files carry no round number and are still one each). Notes on other systems'
/// rows go below.
pub fn compare(rows: &[Row], ours: &str, peers: &[&str]) -> String {
    let mut out = format!(
        "| workload | key choice | clients × in flight | rounds | {ours} ops/s [spread] (p99 ms) |"
    );
    let mut rule = String::from("|---|---|---:|---:|---:|");
    for p in peers {
        out += &format!(" {p} ops/s [spread] (p99 ms) | {ours} ÷ {p} |");
        rule += "---:|---:|";
    }
    out += "\n";
    out += &rule;
    out += "\n";
    let cell = |r: &Rounds, rounds: usize| {
        let mut c = thousands(r.median);
        if r.rounds > 1 {
            let (lo, hi) = r.spread_pct();
            c += &format!(" [{lo:.0}/+{hi:.0}%]");
        }
        c += &format!(" ({:.1})", r.p99_us / 1000.0);
        if r.rounds != rounds {
            c += &format!(", {} rounds", r.rounds);
        }
        if r.aborts > 0 {
            c += &format!(", {:.1}% aborted", 100.0 * r.abort_rate());
        }
        if r.errors > 0 {
            c += &format!(", {} errors", r.errors);
        }
        c
    };
    let of = |system: &str, key: &(String, String, usize, usize)| {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.system == system && &r.key() == key)
            .collect();
        Rounds::of(&mine).map(|r| (r, mine))
    };
    let mut notes = Vec::new();
    let mut most_rounds = 0;
    for key in experiments_of(rows, ours) {
        let Some((us, _)) = of(ours, &key) else {
            continue;
        };
        most_rounds = most_rounds.max(us.rounds);
        let (workload, dist, clients, depth) = &key;
        out += &format!(
            "| {workload} | {dist} | {clients} × {depth} | {} | {} |",
            us.rounds,
            cell(&us, us.rounds)
        );
        for p in peers {
            match of(p, &key) {
                Some((them, their_rows)) => {
                    let ratio = us
                        .ratio(&them)
                        .map_or("—".to_string(), |x| format!("{x:.2}×"));
                    out += &format!(" {} | {ratio} |", cell(&them, us.rounds));
                    for o in their_rows {
                        let seen = notes.iter().any(|n: &String| n.ends_with(&o.note));
                        if !o.note.is_empty() && !seen {
                            notes.push(format!("- {p}, {} {}: {}", o.workload, o.dist, o.note));
                        }
                    }
                }
                None => out += " — | — |",
            }
        }
        out += "\n";
    }
    if most_rounds > 1 {
        out += "\nops/s: the median over rounds, in brackets the slowest and the fastest round \
                as % off it; p99: the median of the rounds' p99; the ratio is of the medians.\n";
    }
    if !notes.is_empty() {
        out += "\n";
        out += &notes.join("\n");
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn zipf_puts_most_weight_on_the_first_ranks() {
        let z = Zipf::new(1000, 0.99);
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        // p(rank 0) = 1 / H(1000, 0.99) ≈ 0.13; uniform would give 0.001.
        assert!(counts[0] > 10_000, "rank 0 drew {}", counts[0]);
        assert!(counts[0] > counts[1] && counts[1] > counts[9]);
        assert!(counts[999] < 100);
    }

    #[test]
    fn summary_takes_percentiles_from_the_merged_histogram() {
        let mut a = histogram();
        let mut b = histogram();
        for us in 1..=50 {
            a.saturating_record(us * 100);
        }
        for us in 51..=100 {
            b.saturating_record(us * 100);
        }
        a.add(&b).unwrap();
        let spec = Spec {
            target: Target::Dtkv,
            addrs: vec!["x".into()],
            workload: Workload::Rmw,
            clients: 4,
            depth: 1,
            limit: Limit::Ops(1),
            keys: 10,
            dist: Dist::Zipfian,
            zipf_s: 0.99,
            value_size: 100,
            rmw_ops: 4,
            progress: false,
        };
        let r = summarize(&meta("dtkv", &spec), &a, 100, 25, 3, 2.0);
        assert_eq!(r.workload, "rmw4");
        assert_eq!(r.per_sec, 50.0);
        assert_eq!(r.abort_rate(), 0.2);
        // 3 significant digits: within 0.1% of the exact value.
        assert!((4990..=5010).contains(&r.p50_us), "p50 {}", r.p50_us);
        assert!((9890..=9910).contains(&r.p99_us), "p99 {}", r.p99_us);
        assert!((9990..=10010).contains(&r.max_us), "max {}", r.max_us);
    }

    #[test]
    fn pgbench_log_counts_failed_transactions_apart() {
        let log = "0 0 1200 0 1700000000 100\n0 1 failed 0 1700000000 200\n1 0 800 0 1700000000 300\n\ngarbage\n";
        let (hist, ok, failed, bad) = import_pgbench_log(log);
        assert_eq!((ok, failed, bad), (2, 1, 1));
        assert!((1195..=1205).contains(&hist.max()));
    }

    #[test]
    fn redis_csv_is_read_by_column_name() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"SET\",\"36231.88\",\"0.426\",\"0.112\",\"0.399\",\"0.655\",\"1.015\",\"5.671\"\n";
        let f = import_redis_csv(csv).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].test, "SET");
        assert_eq!(f[0].rps, 36231.88);
        assert_eq!((f[0].p50_us, f[0].p99_us, f[0].max_us), (399, 1015, 5671));
        assert!(import_redis_csv("\"test\",\"rps\"\n").is_err());
        // A custom command's name is its whole command line, commas included.
        let eval = csv.replace("\"SET\"", "\"EVAL redis.call('GET', KEYS[1]) \"\"x\"\"\"");
        let f = import_redis_csv(&eval).unwrap();
        assert_eq!(f[0].test, "EVAL redis.call('GET', KEYS[1]) \"x\"");
        assert_eq!(f[0].p99_us, 1015);
    }

    /// A hand-made row: 16 × 1 uniform, p99 in ms.
    fn row(system: &str, workload: &str, round: Option<u32>, per_sec: f64, p99_ms: u64) -> Row {
        Row {
            system: system.into(),
            workload: workload.into(),
            dist: "uniform".into(),
            clients: 16,
            depth: 1,
            keys: 10_000,
            value_size: 100,
            seconds: 1.0,
            ops: per_sec as u64,
            aborts: 0,
            errors: 0,
            per_sec,
            p50_us: 1000,
            p95_us: 2000,
            p99_us: p99_ms * 1000,
            max_us: 40_000,
            note: String::new(),
            round,
        }
    }

    #[test]
    fn comparison_divides_ours_by_theirs_for_matching_rows_only() {
        // One round each, as in files written before rounds: no spread, no legend.
        let rows = vec![
            row("dtkv", "rmw4", None, 9000.0, 3),
            row("dtkv", "get", None, 100_000.0, 3),
            row("postgresql", "rmw4", None, 3000.0, 3),
        ];
        let table = compare(&rows, "dtkv", &["postgresql"]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines[2].contains("| 1 | 9,000 (3.0) |") && lines[2].ends_with("| 3.00× |"),
            "{}",
            lines[2]
        );
        assert!(lines[3].ends_with("| — | — |"), "{}", lines[3]);
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        // A NaN sorts last instead of panicking the sort.
        assert_eq!(median(&[f64::NAN, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn rounds_reduce_to_the_median_the_spread_and_a_ratio_of_medians() {
        // Four rounds of ours (an even count), three of theirs with one noisy round.
        let ours: Vec<Row> = [
            (1, 9000.0, 2),
            (2, 11_000.0, 4),
            (3, 10_000.0, 3),
            (4, 8000.0, 5),
        ]
        .into_iter()
        .map(|(n, ops, p99)| row("dtkv", "put", Some(n), ops, p99))
        .collect();
        let theirs: Vec<Row> = [(1, 5000.0, 2), (2, 2000.0, 9), (3, 4000.0, 3)]
            .into_iter()
            .map(|(n, ops, p99)| row("postgresql", "put", Some(n), ops, p99))
            .collect();
        let us = Rounds::of(&ours.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(us.rounds, 4);
        assert_eq!((us.median, us.min, us.max), (9500.0, 8000.0, 11_000.0));
        assert_eq!(us.p99_us, 3500.0);
        assert_eq!(us.ops, 38_000);
        let (lo, hi) = us.spread_pct();
        assert!(
            (lo + 15.79).abs() < 0.01 && (hi - 15.79).abs() < 0.01,
            "{lo} {hi}"
        );
        let them = Rounds::of(&theirs.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!((them.median, them.p99_us), (4000.0, 3000.0));
        // The ratio of medians, not the median of per-round ratios nor a ratio of means.
        assert_eq!(us.ratio(&them), Some(2.375));
        let stalled = Rounds {
            median: 0.0,
            ..them.clone()
        };
        assert_eq!(us.ratio(&stalled), None);
        assert_eq!(stalled.spread_pct(), (0.0, 0.0));
        assert_eq!(Rounds::of(&[]), None);
    }

    #[test]
    fn the_comparison_shows_medians_and_spreads_and_a_dash_for_a_missing_peer_row() {
        let mut rows = Vec::new();
        for (n, put, get, pg) in [
            (1, 9000.0, 100_000.0, 5000.0),
            (2, 11_000.0, 90_000.0, 2000.0),
        ] {
            rows.push(row("dtkv", "put", Some(n), put, 2 + u64::from(n)));
            rows.push(row("dtkv", "get", Some(n), get, 1));
            rows.push(row("postgresql", "put", Some(n), pg, 4));
        }
        // A third PostgreSQL put round: its rounds differ from ours, which the cell says.
        rows.push(row("postgresql", "put", Some(3), 4000.0, 6));
        rows[2].aborts = 10;
        rows[2].note = "one node".into();
        let table = compare(&rows, "dtkv", &["postgresql", "etcd"]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].contains("| rounds | dtkv ops/s [spread] (p99 ms) |"),
            "{}",
            lines[0]
        );
        assert_eq!(
            lines[2],
            "| put | uniform | 16 × 1 | 2 | 10,000 [-10/+10%] (3.5) \
             | 4,000 [-50/+25%] (4.0), 3 rounds, 0.1% aborted | 2.50× | — | — |"
        );
        assert_eq!(
            lines[3],
            "| get | uniform | 16 × 1 | 2 | 95,000 [-5/+5%] (1.0) | — | — | — | — |"
        );
        assert!(
            lines[5].starts_with("ops/s: the median over rounds"),
            "{}",
            lines[5]
        );
        assert_eq!(lines[7], "- postgresql, put uniform: one node");
        assert_eq!(lines.len(), 8, "{table}");
    }

    #[test]
    fn results_files_without_rounds_still_load_and_rounds_are_kept() {
        let old = r#"{"date":"2026-11-24","machine":"m","rows":[{"system":"dtkv","workload":"put",
            "dist":"uniform","clients":16,"depth":1,"keys":10000,"value_size":100,"seconds":10.0,
            "ops":100,"aborts":0,"errors":0,"per_sec":10.0,"p50_us":1,"p95_us":2,"p99_us":3,
            "max_us":4}]}"#;
        let r: Results = serde_json::from_str(old).unwrap();
        assert_eq!(r.rows[0].round, None);
        assert!(!serde_json::to_string(&r.rows[0]).unwrap().contains("round"));
        let with = row("dtkv", "put", Some(3), 1.0, 1);
        let back: Row = serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back.round, Some(3));
    }

    #[test]
    fn values_have_the_requested_size() {
        assert_eq!(value(100, 3, 42).len(), 100);
        assert_eq!(value(4, 3, 42), b"c3-4".to_vec());
        assert_eq!(key_name(42), "key0000042");
    }
}
