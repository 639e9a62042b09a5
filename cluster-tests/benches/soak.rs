//! Soak: the full-size patterns of issue #18 (what a careless or hostile client sends), `make
//! soak`.
//!
//! Each row starts its own system (3 log replicas, sequencer, kvstore; release binaries, temp
//! dirs, free ports), sends one pattern at full size and reports:
//! - the servers' memory: VmRSS of the kvstore, each log replica and the sequencer before the
//!   row, its peak (sampled every 100 ms on a thread of its own) and 2 s after the row's clients
//!   are gone (whether memory is given back);
//! - latencies (p50 / p99 / max) where a client waits for answers;
//! - whether the system still serves afterwards: a PUT and a GET on a new connection.
//!
//! Rows, with the item numbers:
//! - 1 (items 1, 2): 500 autocommit PUTs of 1,000,000-byte values pipelined on one connection,
//!   the log leader killed (SIGKILL) after 250 acks and restarted once another replica leads;
//!   acks/s, failover time, every acknowledged value read back (also after a kvstore restart,
//!   i.e. from the log). 1b: 200 PUTs of 215,000 bytes of `\xff` (860 KB quoted on the client
//!   line, 1,075,000 bytes once quoted twice into an `APPEND`). 1c: a transaction of two 600 KB
//!   values.
//! - 2 (item 9): 1,000 connections each sending an unfinished line of ~1 MiB, held 2 s.
//! - 3 (item 10): `BEGIN` and 2,000 × 1 MB PUTs on one connection; 3b: 1,000 connections each
//!   with a transaction of 1,000 × 100 B PUTs, held, then `ABORT`.
//! - 4 (item 11): 150,000 keys × 1 KB, then 5 clients send `SCAN "" "\xff"` and never read
//!   for 5 s while a sixth times PING/GET.
//! - 5 (item 12): a transaction kept open by a blank line every second for 20 s while another
//!   client overwrites ten keys; versions and RSS over time (with `--max-snapshot-age-secs 10`
//!   when the kvstore has that flag). 5b: the same blank lines with `--txn-timeout-secs 5`.
//! - 6 (item 15): 1,000,000 keys × 100 B, then full SCANs while 4 clients time PING/GET
//!   (before and during).
//! - 7 (item 16): servers started with a soft limit of 1,024 open files, 2,000 connections
//!   opened and held (each sends a PING), then a new client's PING.
//!
//! Every wait is bounded and every row has a time budget, so a row that wedges the system
//! reports that and the soak goes on. Nothing is asserted: these are figures to read.
//! `SOAK_ROWS=1,4` runs only rows 1 (with 1b, 1c) and 4; `SOAK_SCAN_KEYS=n` changes row 6's
//! million and `SOAK_BIG_VALUE=n` row 1's value size. The summary table also goes to
//! bench/results/<date>-soak.md (`SOAK_DATE` names it).

use cluster_tests::loadgen::{machine, percentile};
use cluster_tests::System;
use protocol::{Client, Response};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// How often the memory sampler reads /proc.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long after a row's clients are gone its "after" memory is read.
const SETTLE: Duration = Duration::from_secs(2);
/// A pipelined run stops when no reply comes for this long (a wedged commit path).
const STALL: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest value a client line of the default 1 MiB limit carries with room to spare.
const MAX_VALUE: usize = 1_000_000;
/// The usual soft limit on open files of a login shell (row 7 starts its servers with it).
const LOGIN_NOFILE: u64 = 1024;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// "p50 / p99 / max" in ms, sorted in place.
fn lat_text(lat: &mut [u32]) -> String {
    if lat.is_empty() {
        return "no replies".into();
    }
    lat.sort_unstable();
    let f = |us: u32| {
        let ms = f64::from(us) / 1000.0;
        if ms < 100.0 {
            format!("{ms:.2}")
        } else {
            format!("{ms:.0}")
        }
    };
    format!(
        "{} / {} / {} ms (n={})",
        f(percentile(lat, 0.5)),
        f(percentile(lat, 0.99)),
        f(lat[lat.len() - 1]),
        lat.len()
    )
}

/// At most 80 characters of one line, for messages in a table.
fn short(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    match line.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// A reply as a table cell: `OK`, `ERR TOO_LARGE ...`, `ABORTED TOO_OLD`.
fn reply_kind(r: &Response) -> String {
    let s = match r {
        Response::Ok(_) => "OK".to_string(),
        Response::Pong => "PONG".to_string(),
        Response::Err(e) => format!("ERR {e}"),
        Response::Committed(_) => "COMMITTED".to_string(),
        Response::Nil => "NIL".to_string(),
        Response::Value(v) => format!("VALUE ({} bytes)", v.len()),
        Response::Aborted(words) => {
            let words: Vec<_> = words.iter().map(|w| String::from_utf8_lossy(w)).collect();
            format!("ABORTED {}", words.join(" "))
        }
        other => format!("{other:?}"),
    };
    short(&s)
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => short(
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)"),
        ),
        Err(e) => short(&e.to_string()),
    }
}

/// How many connections (or requests) ended which way, most frequent first.
#[derive(Default)]
struct Outcomes(BTreeMap<String, usize>);

impl Outcomes {
    fn add(&mut self, what: impl Into<String>) {
        *self.0.entry(what.into()).or_default() += 1;
    }

    fn text(&self) -> String {
        let mut v: Vec<_> = self.0.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        let parts: Vec<_> = v.iter().map(|(k, n)| format!("{n} × {k}")).collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

// --- memory ----------------------------------------------------------------------------------

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// KiB by process name (`kvstore`, `log-1`, ..., `sequencer`).
type Kib = BTreeMap<String, u64>;

fn read_all(pids: &[(String, u32)]) -> Kib {
    pids.iter()
        .filter_map(|(name, pid)| Some((name.clone(), rss_kib(*pid)?)))
        .collect()
}

struct Sampled {
    pids: Vec<(String, u32)>,
    peak: Kib,
}

/// Reads the VmRSS of a set of processes every [`SAMPLE_EVERY`] on a thread of its own (so a
/// busy runtime does not hide a peak) and keeps each one's peak. A restarted process keeps its
/// name; its new pid is given with [`set_pid`](Self::set_pid).
struct RssSampler {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<Sampled>>,
    thread: Option<std::thread::JoinHandle<()>>,
    before: Kib,
}

impl RssSampler {
    fn start(pids: Vec<(String, u32)>) -> RssSampler {
        let before = read_all(&pids);
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(Sampled {
            pids,
            peak: before.clone(),
        }));
        let thread = {
            let (stop, state) = (stop.clone(), state.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    {
                        let mut st = lock(&state);
                        for (name, kib) in read_all(&st.pids) {
                            let peak = st.peak.entry(name).or_default();
                            *peak = (*peak).max(kib);
                        }
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })
        };
        RssSampler {
            stop,
            state,
            thread: Some(thread),
            before,
        }
    }

    /// A process was restarted (`Some(pid)`) or stopped (`None`).
    fn set_pid(&self, name: &str, pid: Option<u32>) {
        let mut st = lock(&self.state);
        st.pids.retain(|(n, _)| n != name);
        if let Some(pid) = pid {
            st.pids.push((name.to_string(), pid));
        }
    }

    fn finish(mut self) -> Rss {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let st = lock(&self.state);
        Rss {
            before: std::mem::take(&mut self.before),
            peak: st.peak.clone(),
            after: read_all(&st.pids),
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Memory before, at the peak and after one row, KiB by process.
struct Rss {
    before: Kib,
    peak: Kib,
    after: Kib,
}

impl Rss {
    fn cell(b: Option<u64>, p: Option<u64>, a: Option<u64>) -> String {
        let f = |k: Option<u64>| k.map_or("-".to_string(), |k| format!("{:.0}", k as f64 / 1024.0));
        format!("{} / {} / {}", f(b), f(p), f(a))
    }

    /// Before / peak / after in MiB of one process.
    fn of(&self, name: &str) -> String {
        Rss::cell(
            self.before.get(name).copied(),
            self.peak.get(name).copied(),
            self.after.get(name).copied(),
        )
    }

    /// The largest log replica in each column.
    fn log_max(&self) -> String {
        let max = |m: &Kib| {
            m.iter()
                .filter(|(n, _)| n.starts_with("log-"))
                .map(|(_, k)| *k)
                .max()
        };
        Rss::cell(max(&self.before), max(&self.peak), max(&self.after))
    }
}

// --- rows ------------------------------------------------------------------------------------

/// What a row has measured so far. Rows fill it in as they go, so a row stopped at its time
/// budget still reports everything up to that point.
#[derive(Default)]
struct RowState {
    sampler: Option<RssSampler>,
    rss: Option<Rss>,
    latency: Vec<String>,
    serves: Option<String>,
    figures: Vec<String>,
}

struct Row {
    id: &'static str,
    item: &'static str,
    pattern: &'static str,
    state: Mutex<RowState>,
}

impl Row {
    fn new(id: &'static str, item: &'static str, pattern: &'static str) -> Arc<Row> {
        Arc::new(Row {
            id,
            item,
            pattern,
            state: Mutex::default(),
        })
    }

    /// Starts sampling the memory of `sys`'s servers: the "before" column is now.
    fn watch(&self, sys: &System) {
        lock(&self.state).sampler = Some(RssSampler::start(sys.pids()));
    }

    fn set_pid(&self, name: &str, pid: Option<u32>) {
        if let Some(s) = &lock(&self.state).sampler {
            s.set_pid(name, pid);
        }
    }

    /// Waits [`SETTLE`] and stops the sampler: the "after" column is memory once the row's
    /// clients are gone and the servers had a moment to give memory back.
    async fn settle(&self) {
        tokio::time::sleep(SETTLE).await;
        self.stop_sampler();
    }

    fn stop_sampler(&self) {
        let sampler = lock(&self.state).sampler.take();
        if let Some(s) = sampler {
            let rss = s.finish();
            lock(&self.state).rss = Some(rss);
        }
    }

    fn fig(&self, s: impl Into<String>) {
        let s = s.into();
        println!("  [{}] {s}", self.id);
        lock(&self.state).figures.push(s);
    }

    fn latency(&self, what: &str, lat: &mut [u32]) {
        let s = format!("{what}: {}", lat_text(lat));
        println!("  [{}] latency {s}", self.id);
        lock(&self.state).latency.push(s);
    }

    /// A PUT and a GET on a new connection: does the system still serve?
    async fn probe(&self, addr: SocketAddr) {
        let p = probe(addr).await;
        println!("  [{}] still serves: {p}", self.id);
        lock(&self.state).serves = Some(p);
    }

    fn finished(&self) -> bool {
        lock(&self.state).serves.is_some()
    }

    fn table_line(&self) -> String {
        let st = lock(&self.state);
        let (kv, log, seq) = st.rss.as_ref().map_or_else(
            || ("-".into(), "-".into(), "-".into()),
            |r| (r.of("kvstore"), r.log_max(), r.of("sequencer")),
        );
        let cell = |s: &str| s.replace('|', "/");
        format!(
            "| {} | {} | {} | {kv} | {log} | {seq} | {} | {} | {} |",
            self.id,
            self.item,
            cell(self.pattern),
            cell(&if st.latency.is_empty() {
                "-".to_string()
            } else {
                st.latency.join("; ")
            }),
            cell(st.serves.as_deref().unwrap_or("not probed")),
            cell(&st.figures.join("; ")),
        )
    }
}

const TABLE_HEAD: &str = "| row | item | pattern | kvstore RSS MiB before / peak / after | largest log replica RSS MiB | sequencer RSS MiB | latency p50 / p99 / max | still serves | figures |\n|---|---|---|---|---|---|---|---|---|";

/// Runs one row's task (which may fill several rows) within `budget`. A task that stops early
/// (its budget, an error, a panic in the harness) is noted in every row it had not finished;
/// its servers are killed when the task is dropped.
async fn run_rows<Fut>(rows: &[Arc<Row>], budget: Duration, task: Fut)
where
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let started = Instant::now();
    let ids: Vec<_> = rows.iter().map(|r| r.id).collect();
    println!("\n== row {}: {}", ids.join(", "), rows[0].pattern);
    let mut task = tokio::spawn(task);
    let ending = match timeout(budget, &mut task).await {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(e))) => Some(format!("stopped by an error: {}", short(&format!("{e:#}")))),
        Ok(Err(e)) => Some(format!("stopped by a panic: {}", panic_text(e))),
        Err(_) => {
            // Memory first, while the servers still run; dropping the task kills them.
            for r in rows {
                r.stop_sampler();
            }
            task.abort();
            let _ = task.await;
            Some(format!("stopped at its {} s budget", budget.as_secs()))
        }
    };
    for r in rows {
        r.stop_sampler();
    }
    if let Some(e) = ending {
        for r in rows.iter().filter(|r| !r.finished()) {
            r.fig(e.clone());
        }
    }
    println!("== took {:.1} s", started.elapsed().as_secs_f64());
    for r in rows {
        println!("{}", r.table_line());
    }
}

/// [`run_rows`] for a task that fills one row, which then joins `done`.
async fn run_one<Fut>(done: &mut Vec<Arc<Row>>, row: Arc<Row>, budget: Duration, task: Fut)
where
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    run_rows(std::slice::from_ref(&row), budget, task).await;
    done.push(row);
}

/// A PUT of a fresh value and a GET of it on a new connection, within [`PROBE_TIMEOUT`].
async fn probe(addr: SocketAddr) -> String {
    let t0 = Instant::now();
    let r = timeout(PROBE_TIMEOUT, async {
        let mut c = Client::connect(addr).await?;
        let v = format!("probe-{}", std::process::id());
        c.put("soak:probe", v.clone()).await?;
        let got = c.get("soak:probe").await?;
        anyhow::ensure!(got.as_deref() == Some(v.as_bytes()), "read back {got:?}");
        Ok(())
    })
    .await;
    match r {
        Ok(Ok(())) => format!("yes ({} ms)", ms(t0.elapsed())),
        Ok(Err(e)) => format!("NO: {}", short(&e.to_string())),
        Err(_) => format!("NO: no answer in {} s", PROBE_TIMEOUT.as_secs()),
    }
}

/// Restarts the kvstore (kill -9, then replay from the log) within `limit`. The system is lost
/// (its servers killed) if it does not serve again in time.
async fn restart_kv(sys: System, limit: Duration) -> Result<(System, Duration), String> {
    let mut task = tokio::spawn(async move {
        let t0 = Instant::now();
        let mut sys = sys;
        sys.restart_kv().await;
        (sys, t0.elapsed())
    });
    match timeout(limit, &mut task).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(panic_text(e)),
        Err(_) => {
            task.abort();
            Err(format!(
                "not serving {} s after the restart",
                limit.as_secs()
            ))
        }
    }
}

/// GETs every key of `acked` and compares it with its value, within 60 s in all.
async fn read_back(
    addr: SocketAddr,
    acked: &[usize],
    key: fn(usize) -> String,
    value: fn(usize) -> Vec<u8>,
) -> String {
    let deadline = Instant::now() + secs(60);
    let Ok(Ok(mut c)) = timeout(secs(5), Client::connect(addr)).await else {
        return "could not connect".into();
    };
    let (mut right, mut wrong, mut missing, mut note) = (0, 0, 0, String::new());
    for (n, &i) in acked.iter().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(secs(5));
        match timeout(left, c.get(key(i))).await {
            Ok(Ok(Some(v))) if v[..] == value(i)[..] => right += 1,
            Ok(Ok(Some(_))) => wrong += 1,
            Ok(Ok(None)) => missing += 1,
            Ok(Err(e)) => {
                note = format!(", {} not read: {}", acked.len() - n, short(&e.to_string()));
                break;
            }
            Err(_) => {
                note = format!(", {} not read: GET timed out", acked.len() - n);
                break;
            }
        }
    }
    format!(
        "{right} of {} right, {wrong} wrong, {missing} missing{note}",
        acked.len()
    )
}

// --- row 1: large values, and a leader kill under them -----------------------------------------

fn big_key(i: usize) -> String {
    format!("big:{i:04}")
}

/// Row 1's value size: [`MAX_VALUE`], or `SOAK_BIG_VALUE` (to try the row's leader kill on a
/// build that wedges under full-size values).
fn big_len() -> usize {
    static LEN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LEN.get_or_init(|| {
        std::env::var("SOAK_BIG_VALUE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(MAX_VALUE)
    })
}

fn big_value(i: usize) -> Vec<u8> {
    let mut v = format!("{i:06}").into_bytes();
    v.resize(big_len().max(6), b'a');
    v
}

fn big_line(i: usize) -> Vec<u8> {
    let mut l = format!("PUT {} ", big_key(i)).into_bytes();
    l.extend_from_slice(&big_value(i));
    l
}

/// The figure: each byte is 4 on the client line (860,015 bytes, under the 1 MiB
/// limit) and 5 in the `APPEND` that carries the log record (1,075,000 bytes).
const XFF_LEN: usize = 215_000;

fn xff_key(i: usize) -> String {
    format!("xff:{i:04}")
}

fn xff_value(_: usize) -> Vec<u8> {
    vec![0xff; XFF_LEN]
}

/// `PUT xff:0001 "\xff\xff..."`.
fn xff_line(i: usize) -> Vec<u8> {
    format!("PUT {} \"{}\"", xff_key(i), "\\xff".repeat(XFF_LEN)).into_bytes()
}

/// A pipelined run of autocommit PUTs on one connection.
struct PutRun {
    acked: Vec<usize>,
    lat: Vec<u32>,
    refused: Outcomes,
    elapsed: Duration,
    stopped: Option<String>,
    max_gap: Duration,
}

/// Sends PUT `line(0..n)` on one connection with up to `window` unanswered, until every one is
/// answered, no answer comes for [`STALL`], or the connection is lost. `kill` (if any) is told
/// of every answer, to kill the log leader midway.
async fn pipelined_puts(
    sys: &mut System,
    row: &Row,
    n: usize,
    window: usize,
    line: fn(usize) -> Vec<u8>,
    mut kill: Option<&mut LeaderKill>,
) -> anyhow::Result<PutRun> {
    let mut c = Client::connect(sys.kv_addr).await?;
    let mut run = PutRun {
        acked: Vec::new(),
        lat: Vec::new(),
        refused: Outcomes::default(),
        elapsed: Duration::ZERO,
        stopped: None,
        max_gap: Duration::ZERO,
    };
    let mut inflight = VecDeque::new();
    let (start, mut sent) = (Instant::now(), 0);
    let mut last_answer = start;
    loop {
        while sent < n && inflight.len() < window {
            c.send(&line(sent));
            inflight.push_back((sent, Instant::now()));
            sent += 1;
        }
        let Some(&(i, t0)) = inflight.front() else {
            break;
        };
        let r = match timeout(STALL, c.recv()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                run.stopped = Some(format!("connection lost: {}", short(&e.to_string())));
                break;
            }
            Err(_) => {
                run.stopped = Some(format!(
                    "no answer for {} s with {} PUTs unanswered",
                    STALL.as_secs(),
                    inflight.len()
                ));
                break;
            }
        };
        inflight.pop_front();
        let now = Instant::now();
        run.lat.push(us(now - t0));
        run.max_gap = run.max_gap.max(now - last_answer);
        last_answer = now;
        match r {
            Response::Ok(_) => run.acked.push(i),
            other => run.refused.add(reply_kind(&other)),
        }
        if let Some(k) = kill.as_deref_mut() {
            k.on_answer(sys, row, run.acked.len(), sent, i, now).await;
        }
    }
    run.elapsed = last_answer - start;
    Ok(run)
}

impl PutRun {
    fn report(&mut self, row: &Row, n: usize, value_len: usize) {
        let s = self.elapsed.as_secs_f64().max(1e-9);
        row.fig(format!(
            "{} of {n} acknowledged in {s:.1} s: {:.0} acks/s, {:.0} MB/s of values; refused: {}; longest wait between answers {} ms{}",
            self.acked.len(),
            self.acked.len() as f64 / s,
            (self.acked.len() * value_len) as f64 / s / 1e6,
            self.refused.text(),
            ms(self.max_gap),
            self.stopped.as_ref().map_or(String::new(), |e| format!("; stopped: {e}")),
        ));
        row.latency("PUT (pipelined, send to answer)", &mut self.lat);
    }
}

/// Kills the log leader once `after` PUTs are acknowledged, restarts it once another replica
/// leads, and times the failover.
struct LeaderKill {
    after: usize,
    killed: Option<Killed>,
}

struct Killed {
    replica: usize,
    at: Instant,
    /// PUTs sent before the kill; the first answer to a later one is the failover's end.
    sent_before: usize,
    /// Resolves to the time from the kill to a surviving replica saying it leads.
    elected: Option<JoinHandle<Option<Duration>>>,
    elected_after: Option<Duration>,
    first_ack_after: Option<Duration>,
    restarted: Option<String>,
}

impl LeaderKill {
    async fn on_answer(
        &mut self,
        sys: &mut System,
        row: &Row,
        acked: usize,
        sent: usize,
        i: usize,
        now: Instant,
    ) {
        let Some(k) = &mut self.killed else {
            if acked >= self.after {
                self.kill(sys, row, sent).await;
            }
            return;
        };
        if k.first_ack_after.is_none() && i >= k.sent_before {
            k.first_ack_after = Some(now - k.at);
        }
        if k.elected.as_ref().is_some_and(JoinHandle::is_finished) {
            Self::restart(k, sys, row).await;
        }
    }

    async fn kill(&mut self, sys: &mut System, row: &Row, sent: usize) {
        let deadline = Instant::now() + secs(5);
        let leader = loop {
            if let Some(l) = sys.log.leader().await {
                break l;
            }
            if Instant::now() > deadline {
                row.fig("no agreed log leader within 5 s: not killed");
                // Do not try again at every answer.
                self.after = usize::MAX;
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        sys.log.kill9(leader);
        let at = Instant::now();
        row.set_pid(&format!("log-{}", leader + 1), None);
        let others: Vec<SocketAddr> = (0..sys.log.replicas.len())
            .filter(|&j| j != leader)
            .map(|j| sys.log.replicas[j].dksp)
            .collect();
        let elected = tokio::spawn(async move {
            while at.elapsed() < secs(30) {
                for a in &others {
                    let role = cluster_tests::status(*a)
                        .await
                        .and_then(|s| s.get("role").cloned());
                    if role.as_deref() == Some("leader") {
                        return Some(at.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            None
        });
        self.killed = Some(Killed {
            replica: leader,
            at,
            sent_before: sent,
            elected: Some(elected),
            elected_after: None,
            first_ack_after: None,
            restarted: None,
        });
    }

    /// Waits (bounded) for another replica to lead, then restarts the killed one.
    async fn restart(k: &mut Killed, sys: &mut System, row: &Row) {
        let Some(elected) = k.elected.take() else {
            return;
        };
        k.elected_after = timeout(secs(30), elected)
            .await
            .ok()
            .and_then(|r| r.ok().flatten());
        let t0 = Instant::now();
        k.restarted = Some(match timeout(secs(30), sys.log.restart(k.replica)).await {
            Ok(()) => {
                let pid = sys.log.replicas[k.replica]
                    .proc_
                    .as_ref()
                    .and_then(|p| p.pid());
                row.set_pid(&format!("log-{}", k.replica + 1), pid);
                format!("answering PING {} ms after its restart", ms(t0.elapsed()))
            }
            Err(_) => "not answering PING 30 s after its restart".to_string(),
        });
    }

    /// Restarts the killed replica if the run ended first, and reports.
    async fn finish(&mut self, sys: &mut System, row: &Row, n: usize) {
        let Some(k) = &mut self.killed else {
            row.fig(format!(
                "log leader not killed: fewer than {} of {n} PUTs acknowledged",
                self.after.min(n)
            ));
            return;
        };
        Self::restart(k, sys, row).await;
        let t = |d: Option<Duration>| d.map_or("never".to_string(), |d| format!("{} ms", ms(d)));
        row.fig(format!(
            "log-{} (leader) killed after {} acks: another replica leads after {}; first ack of a PUT sent after the kill {} after it; killed replica {}",
            k.replica + 1,
            self.after,
            t(k.elected_after),
            t(k.first_ack_after),
            k.restarted.as_deref().unwrap_or("not restarted"),
        ));
    }
}

const BIG_N: usize = 500;

async fn row1_large_values(row: Arc<Row>) -> anyhow::Result<()> {
    let mut sys = System::start(&[]).await;
    row.watch(&sys);
    let mut kill = LeaderKill {
        after: BIG_N / 2,
        killed: None,
    };
    let mut run = pipelined_puts(&mut sys, &row, BIG_N, 16, big_line, Some(&mut kill)).await?;
    run.report(&row, BIG_N, big_len());
    kill.finish(&mut sys, &row, BIG_N).await;
    let rb = read_back(sys.kv_addr, &run.acked, big_key, big_value).await;
    row.fig(format!("acknowledged values read back: {rb}"));
    row.settle().await;
    row.probe(sys.kv_addr).await;
    // What the log holds: a new kvstore replays it.
    match restart_kv(sys, secs(30)).await {
        Ok((sys, took)) => {
            let rb = read_back(sys.kv_addr, &run.acked, big_key, big_value).await;
            row.fig(format!(
                "after a kvstore restart (serving in {} ms, replayed from the log): {rb}",
                ms(took)
            ));
        }
        Err(e) => row.fig(format!("kvstore restart: {e}")),
    }
    Ok(())
}

async fn row1b_quoted_values(row: Arc<Row>) -> anyhow::Result<()> {
    const N: usize = 200;
    let mut sys = System::start(&[]).await;
    row.watch(&sys);
    let mut run = pipelined_puts(&mut sys, &row, N, 16, xff_line, None).await?;
    run.report(&row, N, XFF_LEN);
    let rb = read_back(sys.kv_addr, &run.acked, xff_key, xff_value).await;
    row.fig(format!("acknowledged values read back: {rb}"));
    row.settle().await;
    row.probe(sys.kv_addr).await;
    Ok(())
}

async fn row1c_large_txn(row: Arc<Row>) -> anyhow::Result<()> {
    let sys = System::start(&[]).await;
    row.watch(&sys);
    let mut c = Client::connect(sys.kv_addr).await?;
    c.send(b"BEGIN");
    for k in ["a", "b"] {
        let mut line = format!("PUT txn600:{k} ").into_bytes();
        line.resize(line.len() + 600_000, b'v');
        c.send(&line);
    }
    c.send(b"COMMIT");
    let mut replies = Vec::new();
    for what in ["BEGIN", "PUT", "PUT", "COMMIT"] {
        match timeout(STALL, c.recv()).await {
            Ok(Ok(r)) => replies.push(format!("{what} → {}", reply_kind(&r))),
            Ok(Err(e)) => {
                replies.push(format!("then {}", short(&e.to_string())));
                break;
            }
            Err(_) => {
                // A reply the server has queued behind a hanging COMMIT waits with it.
                replies.push(format!("then no answer for {} s", STALL.as_secs()));
                break;
            }
        }
    }
    row.fig(replies.join(", "));
    drop(c);
    row.settle().await;
    row.probe(sys.kv_addr).await;
    Ok(())
}

// --- row 2: unfinished lines -----------------------------------------------------------------

/// At most this many of a row's connections are being set up at once. A burst of a thousand
/// connects at one listener overflows its accept queue, and the kernel's SYN cookies then
/// reset some of them: that would measure the kernel, not the server.
const CONNECTING: usize = 64;

/// Runs `f` (a connect) holding one of `gate`'s permits.
async fn gated<T>(gate: &Semaphore, f: impl Future<Output = T>) -> T {
    let _permit = gate.acquire().await;
    f.await
}

/// Reads one line: what the server said, or that it closed the connection.
async fn first_line(rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> String {
    let mut s = String::new();
    match rd.read_line(&mut s).await {
        Ok(0) => "closed by the server".into(),
        Ok(_) => format!("answered {}", short(s.trim_end())),
        Err(e) => format!("{:?}", e.kind()),
    }
}

/// One connection that sends `line` without its newline by `deadline`, then holds it open
/// until `close`; says on `sent` when the sending ended. Returns what happened.
async fn hold_partial_line(
    addr: SocketAddr,
    line: Arc<Vec<u8>>,
    deadline: Instant,
    gate: Arc<Semaphore>,
    sent: mpsc::UnboundedSender<()>,
    mut close: watch::Receiver<bool>,
) -> String {
    let stream = match gated(&gate, timeout(secs(5), TcpStream::connect(addr))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return format!("connect failed ({:?})", e.kind()),
        Err(_) => return "connect timed out".into(),
    };
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let sending = tokio::select! {
        w = tokio::time::timeout_at(deadline.into(), wr.write_all(&line)) => match w {
            Ok(Ok(())) => "sent",
            Ok(Err(_)) => "send failed",
            Err(_) => "send blocked (server stopped reading)",
        },
        said = first_line(&mut rd) => return format!("before the line was sent: {said}"),
    };
    drop(sent);
    tokio::select! {
        said = first_line(&mut rd) => format!("{sending}, then {said}"),
        _ = close.wait_for(|c| *c) => format!("{sending}, held open"),
    }
}

async fn row2_partial_lines(row: Arc<Row>) -> anyhow::Result<()> {
    const CONNS: usize = 1000;
    let sys = System::start(&[]).await;
    row.watch(&sys);
    let mut line = b"PUT partial ".to_vec();
    line.resize(1_048_000, b'p');
    let line = Arc::new(line);
    let gate = Arc::new(Semaphore::new(CONNECTING));
    let (close_tx, close_rx) = watch::channel(false);
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let deadline = t0 + secs(30);
    let conns: Vec<_> = (0..CONNS)
        .map(|_| {
            let task = hold_partial_line(
                sys.kv_addr,
                line.clone(),
                deadline,
                gate.clone(),
                sent_tx.clone(),
                close_rx.clone(),
            );
            tokio::spawn(task)
        })
        .collect();
    drop(sent_tx);
    // Every connection has sent (or given up) once the last sender is gone.
    while sent_rx.recv().await.is_some() {}
    let sending = t0.elapsed();
    tokio::time::sleep(secs(2)).await;
    let _ = close_tx.send(true);
    let mut outcomes = Outcomes::default();
    for c in conns {
        outcomes.add(c.await.unwrap_or_else(panic_text));
    }
    row.fig(format!(
        "{CONNS} connections × 1,048,000 bytes without a newline, sent in {} ms, held 2 s: {}",
        ms(sending),
        outcomes.text()
    ));
    row.settle().await;
    row.probe(sys.kv_addr).await;
    Ok(())
}

// --- row 3: buffered transaction writes --------------------------------------------------------

async fn row3_big_txn(row: Arc<Row>) -> anyhow::Result<()> {
    const N: usize = 2000;
    const WINDOW: usize = 8;
    let sys = System::start(&[]).await;
    row.watch(&sys);
    let mut c = Client::connect(sys.kv_addr).await?;
    let begin = timeout(STALL, c.call(b"BEGIN")).await??;
    let t0 = Instant::now();
    let (mut sent, mut answered, mut ok) = (0, 0, 0);
    let mut refusal = None;
    let mut stopped = None;
    while answered < sent || (sent < N && refusal.is_none()) {
        while sent < N && sent - answered < WINDOW && refusal.is_none() {
            let mut line = format!("PUT txbig:{sent:04} ").into_bytes();
            line.resize(line.len() + MAX_VALUE, b't');
            c.send(&line);
            sent += 1;
        }
        match timeout(STALL, c.recv()).await {
            Ok(Ok(Response::Ok(_))) => ok += 1,
            Ok(Ok(r)) => {
                refusal
                    .get_or_insert_with(|| format!("PUT #{} → {}", answered + 1, reply_kind(&r)));
            }
            Ok(Err(e)) => {
                stopped = Some(short(&e.to_string()));
                break;
            }
            Err(_) => {
                stopped = Some(format!("no answer for {} s", STALL.as_secs()));
                break;
            }
        }
        answered += 1;
    }
    let abort = match stopped {
        Some(_) => "not sent".to_string(),
        None => match timeout(STALL, c.call(b"ABORT")).await {
            Ok(Ok(r)) => reply_kind(&r),
            Ok(Err(e)) => short(&e.to_string()),
            Err(_) => "no answer".into(),
        },
    };
    row.fig(format!(
        "BEGIN → {}; {ok} PUTs of 1 MB accepted in the transaction in {:.1} s; first refusal: {}{}; ABORT → {abort}",
        reply_kind(&begin),
        t0.elapsed().as_secs_f64(),
        refusal.as_deref().unwrap_or("none"),
        stopped.map_or(String::new(), |s| format!("; stopped: {s}")),
    ));
    drop(c);
    row.settle().await;
    row.probe(sys.kv_addr).await;
    Ok(())
}

/// One connection with a transaction of 1,000 × 100 B PUTs, all sent at once; says on `done`
/// how the writes were answered, holds the transaction until `close`, then aborts it.
async fn hold_txn(
    addr: SocketAddr,
    id: usize,
    gate: Arc<Semaphore>,
    done: mpsc::UnboundedSender<String>,
    mut close: watch::Receiver<bool>,
) -> String {
    const PUTS: usize = 1000;
    let Ok(Ok(mut c)) = gated(&gate, timeout(secs(5), Client::connect(addr))).await else {
        let _ = done.send("connect failed".into());
        return "-".into();
    };
    c.send(b"BEGIN");
    let value = "x".repeat(100);
    for i in 0..PUTS {
        c.send(format!("PUT t{id:04}:{i:04} {value}").as_bytes());
    }
    let deadline = Instant::now() + secs(30);
    let mut outcome = format!("BEGIN and {PUTS} PUTs OK");
    for n in 0..=PUTS {
        match tokio::time::timeout_at(deadline.into(), c.recv()).await {
            Ok(Ok(Response::Ok(_))) => {}
            Ok(Ok(r)) => {
                if outcome.ends_with("OK") {
                    outcome = format!("refused at request {}: {}", n + 1, reply_kind(&r));
                }
            }
            Ok(Err(e)) => {
                outcome = short(&e.to_string());
                break;
            }
            Err(_) => {
                outcome = "no answer within 30 s".into();
                break;
            }
        }
    }
    let _ = done.send(outcome);
    drop(done);
    let _ = close.wait_for(|c| *c).await;
    match timeout(STALL, c.call(b"ABORT")).await {
        Ok(Ok(r)) => reply_kind(&r),
        Ok(Err(e)) => short(&e.to_string()),
        Err(_) => "no answer".into(),
    }
}

async fn row3b_many_txns(row: Arc<Row>) -> anyhow::Result<()> {
    const CONNS: usize = 1000;
    let sys = System::start(&[]).await;
    row.watch(&sys);
    let (close_tx, close_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(CONNECTING));
    let t0 = Instant::now();
    let conns: Vec<_> = (0..CONNS)
        .map(|id| {
            let task = hold_txn(
                sys.kv_addr,
                id,
                gate.clone(),
                done_tx.clone(),
                close_rx.clone(),
            );
            tokio::spawn(task)
        })
        .collect();
    drop(done_tx);
    let mut written = Outcomes::default();
    while let Some(o) = done_rx.recv().await {
        written.add(o);
    }
    let took = t0.elapsed();
    // Held a moment so the sampler sees them all open.
    tokio::time::sleep(secs(1)).await;
    let _ = close_tx.send(true);
    let mut aborted = Outcomes::default();
    for c in conns {
        aborted.add(c.await.unwrap_or_else(panic_text));
    }
    row.fig(format!(
        "{CONNS} transactions × 1,000 PUTs of 100 B, all answered in {} ms: {}; then ABORT → {}",
        ms(took),
        written.text(),
        aborted.text()
    ));
    row.settle().await;
    row.probe(sys.kv_addr).await;
    Ok(())
}

// --- rows 4 and 6: SCAN ----------------------------------------------------------------------

/// `n` autocommit PUTs `<prefix>:<i>` of `value_len` bytes over `conns` connections, 128 in
/// flight each. Returns how long it took. A checkpoint of a large store holds commits up for a
/// while, so a loader waits up to 30 s for an answer.
async fn load(
    addr: SocketAddr,
    prefix: &'static str,
    n: usize,
    value_len: usize,
    conns: usize,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let per = n.div_ceil(conns);
    let tasks: Vec<JoinHandle<anyhow::Result<()>>> = (0..conns)
        .map(|w| {
            tokio::spawn(async move {
                let value = "v".repeat(value_len);
                let keys = (w * per)..((w + 1) * per).min(n);
                let total = keys.len();
                let mut c = Client::connect(addr).await?;
                let (mut sent, mut got) = (0, 0);
                while got < total {
                    while sent < total && sent - got < 128 {
                        c.send(format!("PUT {prefix}:{:07} {value}", keys.start + sent).as_bytes());
                        sent += 1;
                    }
                    let r = timeout(secs(30), c.recv()).await.map_err(|_| {
                        anyhow::anyhow!(
                            "loading {prefix}: no answer for 30 s after {got} of {total}"
                        )
                    })??;
                    match r {
                        Response::Ok(_) => got += 1,
                        r => anyhow::bail!("loading {prefix}: {}", reply_kind(&r)),
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(t0.elapsed())
}

/// `clients` connections each alternating PING and a GET of a random `load:` key, one request
/// in flight, until `stop`. A request unanswered for 10 s ends that client (counted as 10 s).
fn spawn_pingers(
    addr: SocketAddr,
    clients: usize,
    keys: usize,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<Vec<u32>>> {
    (0..clients)
        .map(|w| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64);
                let mut lat = Vec::new();
                let Ok(mut c) = Client::connect(addr).await else {
                    return lat;
                };
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let line = if n.is_multiple_of(2) {
                        "PING".to_string()
                    } else {
                        format!("GET load:{:07}", rng.gen_range(0..keys.max(1)))
                    };
                    n += 1;
                    let t0 = Instant::now();
                    match timeout(secs(10), c.call(line.as_bytes())).await {
                        Ok(Ok(_)) => lat.push(us(t0.elapsed())),
                        Ok(Err(_)) => break,
                        Err(_) => {
                            lat.push(us(t0.elapsed()));
                            break;
                        }
                    }
                }
                lat
            })
        })
        .collect()
}

async fn join_pingers(stop: &AtomicBool, pingers: Vec<JoinHandle<Vec<u32>>>) -> Vec<u32> {
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for p in pingers {
        all.extend(p.await.unwrap_or_default());
    }
    all
}

/// Pingers for `d`, their latencies.
async fn ping_for(addr: SocketAddr, clients: usize, keys: usize, d: Duration) -> Vec<u32> {
    let stop = Arc::new(AtomicBool::new(false));
    let pingers = spawn_pingers(addr, clients, keys, stop.clone());
    tokio::time::sleep(d).await;
    join_pingers(&stop, pingers).await
}

/// A whole `SCAN "" "\xff"`, read as fast as it comes: (rows, bytes), within 60 s.
async fn full_scan(addr: SocketAddr) -> anyhow::Result<(usize, usize)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"SCAN \"\" \"\\xff\"\n").await?;
    let mut rd = BufReader::with_capacity(1 << 20, s);
    let (mut rows, mut bytes, mut line) = (0, 0, Vec::new());
    let deadline = Instant::now() + secs(60);
    loop {
        line.clear();
        let n = tokio::time::timeout_at(deadline.into(), rd.read_until(b'\n', &mut line)).await??;
        anyhow::ensure!(n > 0, "connection closed after {rows} rows");
        bytes += n;
        if line.starts_with(b"END") {
            return Ok((rows, bytes));
        }
        anyhow::ensure!(
            line.starts_with(b"KV "),
            "SCAN answered {}",
            short(&String::from_utf8_lossy(&line))
        );
        rows += 1;
    }
}

const SCAN_STORE_KEYS: usize = 150_000;

async fn row4_unread_scans(row: Arc<Row>) -> anyhow::Result<()> {
    let sys = System::start(&[]).await;
    let addr = sys.kv_addr;
    let took = load(addr, "load", SCAN_STORE_KEYS, 1000, 8).await?;
    let bytes = cluster_tests::status(addr)
        .await
        .and_then(|s| s.get("bytes").cloned())
        .unwrap_or_default();
    row.fig(format!(
        "loaded {SCAN_STORE_KEYS} keys × 1 KB in {:.1} s (STATUS bytes={bytes})",
        took.as_secs_f64()
    ));
    row.watch(&sys);
    let mut stuck = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"SCAN \"\" \"\\xff\"\n").await?;
        stuck.push(s);
    }
    let mut lat = ping_for(addr, 1, SCAN_STORE_KEYS, secs(5)).await;
    drop(stuck);
    row.fig("5 connections sent SCAN \"\" \"\\xff\" and read nothing for 5 s, then closed");
    row.latency("a 6th client's PING/GET meanwhile", &mut lat);
    row.settle().await;
    row.probe(addr).await;
    Ok(())
}

async fn row6_scan_fairness(row: Arc<Row>) -> anyhow::Result<()> {
    let keys: usize = std::env::var("SOAK_SCAN_KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let sys = System::start(&[]).await;
    let addr = sys.kv_addr;
    let took = load(addr, "load", keys, 100, 16).await?;
    row.fig(format!(
        "{keys} keys × 100 B loaded in {:.1} s",
        took.as_secs_f64()
    ));
    row.watch(&sys);
    let mut before = ping_for(addr, 4, keys, secs(3)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let pingers = spawn_pingers(addr, 4, keys, stop.clone());
    // Scans back to back for at least 3 s, so the "during" figures have enough samples.
    let t0 = Instant::now();
    let mut scans = Vec::new();
    while t0.elapsed() < secs(3) && scans.len() < 3 {
        let s0 = Instant::now();
        let (rows, bytes) = full_scan(addr).await?;
        scans.push(format!(
            "{rows} rows ({:.0} MB) in {:.2} s",
            bytes as f64 / 1e6,
            s0.elapsed().as_secs_f64()
        ));
    }
    let mut during = join_pingers(&stop, pingers).await;
    row.fig(format!("full scans: {}", scans.join(", ")));
    row.latency("4 clients' PING/GET before", &mut before);
    row.latency("during the scans", &mut during);
    row.settle().await;
    row.probe(addr).await;
    Ok(())
}

// --- row 5: a transaction kept open by blank lines ------------------------------------------

/// The kvstore's flag for the oldest snapshot it lets a transaction keep (`--max-snapshot-age-secs`
/// or a flag of a like name), if this build has one: the soak runs against older and newer
/// builds.
fn snapshot_age_flag() -> Option<String> {
    let help = std::process::Command::new(cluster_tests::bin("kvstore"))
        .arg("--help")
        .output()
        .ok()?;
    String::from_utf8_lossy(&help.stdout)
        .split_whitespace()
        .find(|w| {
            w.starts_with("--")
                && w.contains("-age")
                && (w.contains("snapshot") || w.contains("txn"))
        })
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
}

/// Ends a transaction as a client would at the end: `GET hot:0`, then `COMMIT`.
async fn end_txn(c: &mut Client) -> String {
    c.send(b"GET hot:0");
    c.send(b"COMMIT");
    let mut replies = Vec::new();
    for what in ["GET", "COMMIT"] {
        replies.push(match timeout(STALL, c.recv()).await {
            Ok(Ok(r)) => format!("{what} → {}", reply_kind(&r)),
            Ok(Err(e)) => format!("{what} → {}", short(&e.to_string())),
            Err(_) => format!("{what} → no answer"),
        });
    }
    replies.join(", ")
}

async fn row5_old_snapshot(row: Arc<Row>) -> anyhow::Result<()> {
    const SECONDS: u64 = 20;
    let flag = snapshot_age_flag();
    let flags: Vec<&str> = match &flag {
        Some(f) => {
            row.fig(format!("kvstore started with {f} 10"));
            vec![f, "10"]
        }
        None => {
            row.fig("this kvstore has no --max-snapshot-age-secs: defaults");
            Vec::new()
        }
    };
    let sys = System::start(&flags).await;
    let addr = sys.kv_addr;
    let kv_pid = sys.kv.as_ref().and_then(|p| p.pid()).unwrap_or(0);
    row.watch(&sys);
    let stop = Arc::new(AtomicBool::new(false));
    let writer: JoinHandle<anyhow::Result<usize>> = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut c = Client::connect(addr).await?;
            let (mut sent, mut got) = (0, 0);
            while !stop.load(Ordering::Relaxed) || got < sent {
                while !stop.load(Ordering::Relaxed) && sent - got < 64 {
                    c.send(format!("PUT hot:{} v{sent}", sent % 10).as_bytes());
                    sent += 1;
                }
                timeout(STALL, c.recv()).await??;
                got += 1;
            }
            Ok(got)
        }
    });
    let mut txn = Client::connect(addr).await?;
    let begin = timeout(STALL, txn.call(b"BEGIN")).await??;
    let first = timeout(STALL, txn.call(b"GET hot:0")).await??;
    row.fig(format!(
        "BEGIN → {}, GET → {}; then a blank line every 1 s",
        reply_kind(&begin),
        reply_kind(&first)
    ));
    let t0 = Instant::now();
    let mut series = Vec::new();
    let mut ended_by = None;
    for s in 1..=SECONDS {
        tokio::time::sleep_until((t0 + secs(s)).into()).await;
        txn.send(b"");
        txn.flush().await?;
        if s % 2 == 0 {
            let st = cluster_tests::status(addr).await.unwrap_or_default();
            let get = |k: &str| st.get(k).cloned().unwrap_or_else(|| "?".into());
            if ended_by.is_none() && get("open_txns") == "0" {
                ended_by = Some(s);
            }
            series.push(format!(
                "{s}s: {} versions, {} MiB",
                get("versions"),
                rss_kib(kv_pid).unwrap_or(0) / 1024
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.map_err(|e| anyhow::anyhow!(panic_text(e)))??;
    row.fig(format!(
        "{writes} overwrites of 10 keys meanwhile; {}",
        series.join(", ")
    ));
    row.fig(format!(
        "transaction ended by the kvstore: {}; at the end: {}",
        ended_by.map_or("no (open_txns stayed 1)".to_string(), |s| format!(
            "yes, open_txns=0 by {s} s"
        )),
        end_txn(&mut txn).await
    ));
    drop(txn);
    row.settle().await;
    let versions = cluster_tests::status(addr)
        .await
        .and_then(|s| s.get("versions").cloned())
        .unwrap_or_default();
    row.fig(format!("{versions} versions once the transaction is gone"));
    row.probe(addr).await;
    Ok(())
}

async fn row5b_blank_lines(row: Arc<Row>) -> anyhow::Result<()> {
    let sys = System::start(&["--txn-timeout-secs", "5"]).await;
    row.watch(&sys);
    let mut txn = Client::connect(sys.kv_addr).await?;
    timeout(STALL, txn.call(b"BEGIN")).await??;
    let t0 = Instant::now();
    for s in 1..=8 {
        tokio::time::sleep_until((t0 + secs(s)).into()).await;
        txn.send(b"");
        txn.flush().await?;
    }
    row.fig(format!(
        "--txn-timeout-secs 5, BEGIN, a blank line every 1 s for 8 s, then: {}",
        end_txn(&mut txn).await
    ));
    drop(txn);
    row.settle().await;
    row.probe(sys.kv_addr).await;
    Ok(())
}

// --- row 7: many connections -----------------------------------------------------------------

/// Lowers this process's soft limit on open files while it lives (the servers it starts
/// inherit it), and puts it back when dropped.
struct SoftNofile(Option<libc::rlimit>);

impl SoftNofile {
    fn lower_to(n: u64) -> SoftNofile {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass; setrlimit only reads it.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) != 0 {
                return SoftNofile(None);
            }
            let new = libc::rlimit {
                rlim_cur: n.min(old.rlim_max),
                rlim_max: old.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
                return SoftNofile(None);
            }
        }
        SoftNofile(Some(old))
    }
}

impl Drop for SoftNofile {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            // SAFETY: setrlimit only reads the struct.
            unsafe {
                libc::setrlimit(libc::RLIMIT_NOFILE, &old);
            }
        }
    }
}

/// The soft "Max open files" of a process, from /proc/<pid>/limits.
fn nofile_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("Max open files"))?;
            Some(l.split_whitespace().nth(3)?.to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// Connects and PINGs, reports on `done`, holds the connection until `close`.
async fn hold_connection(
    addr: SocketAddr,
    gate: Arc<Semaphore>,
    done: mpsc::UnboundedSender<String>,
    mut close: watch::Receiver<bool>,
) {
    let outcome = match gated(&gate, timeout(secs(5), TcpStream::connect(addr))).await {
        Err(_) => ("connect timed out".to_string(), None),
        Ok(Err(e)) => (format!("connect failed ({:?})", e.kind()), None),
        Ok(Ok(s)) => {
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            match wr.write_all(b"PING\n").await {
                Err(e) => (format!("send failed ({:?})", e.kind()), None),
                Ok(()) => match timeout(secs(3), first_line(&mut rd)).await {
                    Ok(said) => (said, Some((rd, wr))),
                    Err(_) => ("no answer to PING in 3 s".to_string(), Some((rd, wr))),
                },
            }
        }
    };
    let _ = done.send(outcome.0);
    drop(done);
    let _ = close.wait_for(|c| *c).await;
}

async fn row7_connections(row: Arc<Row>) -> anyhow::Result<()> {
    const CONNS: usize = 2000;
    let sys = {
        let _limit = SoftNofile::lower_to(LOGIN_NOFILE);
        System::start(&[]).await
    };
    let addr = sys.kv_addr;
    let kv_pid = sys.kv.as_ref().and_then(|p| p.pid()).unwrap_or(0);
    row.fig(format!(
        "servers started with a soft limit of {LOGIN_NOFILE} open files; the kvstore's soft limit: {}",
        nofile_of(kv_pid)
    ));
    row.watch(&sys);
    let (close_tx, close_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    // More connects at once than elsewhere: against a server that stops accepting, each of
    // the rest waits out its 5 s connect timeout.
    let gate = Arc::new(Semaphore::new(4 * CONNECTING));
    let t0 = Instant::now();
    let conns: Vec<_> = (0..CONNS)
        .map(|_| {
            let task = hold_connection(addr, gate.clone(), done_tx.clone(), close_rx.clone());
            tokio::spawn(task)
        })
        .collect();
    drop(done_tx);
    let mut outcomes = Outcomes::default();
    while let Some(o) = done_rx.recv().await {
        outcomes.add(o);
    }
    row.fig(format!(
        "{CONNS} connections opened, each sent PING ({} ms): {}",
        ms(t0.elapsed()),
        outcomes.text()
    ));
    let t1 = Instant::now();
    let fresh = match timeout(secs(5), async {
        let mut c = Client::connect(addr).await?;
        c.ping().await
    })
    .await
    {
        Ok(Ok(())) => format!("PONG in {} ms", ms(t1.elapsed())),
        Ok(Err(e)) => format!("failed: {}", short(&e.to_string())),
        Err(_) => "no PONG within 5 s".into(),
    };
    row.fig(format!("with them held, a new client's PING: {fresh}"));
    let _ = close_tx.send(true);
    for c in conns {
        let _ = c.await;
    }
    row.settle().await;
    row.probe(addr).await;
    Ok(())
}

// --- the soak --------------------------------------------------------------------------------

fn today() -> String {
    std::env::var("SOAK_DATE").unwrap_or_else(|_| {
        std::process::Command::new("date")
            .arg("+%F")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "undated".into())
    })
}

async fn soak() {
    let only: Vec<String> = std::env::var("SOAK_ROWS")
        .map(|s| s.split(',').map(|w| w.trim().to_string()).collect())
        .unwrap_or_default();
    // A row "1b" is selected by "1".
    let wanted = |id: &str| {
        let n = id.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        only.is_empty() || only.iter().any(|w| w == n || w == id)
    };
    let date = today();
    let started = Instant::now();
    println!("dtkv soak, {date}, {}", machine());
    let mut rows: Vec<Arc<Row>> = Vec::new();

    if wanted("1") {
        let r = Row::new(
            "1",
            "1, 2",
            "500 autocommit PUTs × 1,000,000 B on one connection, 16 in flight; log leader killed after 250 acks",
        );
        run_one(&mut rows, r.clone(), secs(150), row1_large_values(r)).await;
        let r = Row::new(
            "1b",
            "1",
            "200 autocommit PUTs × 215,000 B of \\xff (860 KB quoted), 16 in flight",
        );
        run_one(&mut rows, r.clone(), secs(60), row1b_quoted_values(r)).await;
        let r = Row::new("1c", "1", "a transaction of two 600 KB PUTs");
        run_one(&mut rows, r.clone(), secs(45), row1c_large_txn(r)).await;
    }
    if wanted("2") {
        let r = Row::new(
            "2",
            "9",
            "1,000 connections × an unfinished ~1 MiB line, held 2 s, closed",
        );
        run_one(&mut rows, r.clone(), secs(60), row2_partial_lines(r)).await;
    }
    if wanted("3") {
        let r = Row::new("3", "10", "BEGIN, then up to 2,000 PUTs × 1 MB, then ABORT");
        run_one(&mut rows, r.clone(), secs(60), row3_big_txn(r)).await;
        let r = Row::new(
            "3b",
            "10",
            "1,000 connections × a transaction of 1,000 PUTs × 100 B, held, then ABORT",
        );
        run_one(&mut rows, r.clone(), secs(60), row3b_many_txns(r)).await;
    }
    if wanted("4") {
        let r = Row::new(
            "4",
            "11",
            "150k keys × 1 KB; 5 clients SCAN \"\" \"\\xff\" and never read for 5 s",
        );
        run_one(&mut rows, r.clone(), secs(90), row4_unread_scans(r)).await;
    }
    if wanted("5") {
        let r = Row::new(
            "5",
            "12",
            "a transaction kept open by a blank line every 1 s for 20 s; another client overwrites 10 keys",
        );
        run_one(&mut rows, r.clone(), secs(50), row5_old_snapshot(r)).await;
        let r = Row::new(
            "5b",
            "12",
            "--txn-timeout-secs 5; a transaction kept open by a blank line every 1 s for 8 s",
        );
        run_one(&mut rows, r.clone(), secs(30), row5b_blank_lines(r)).await;
    }
    if wanted("6") {
        let r = Row::new(
            "6",
            "15",
            "1M keys × 100 B; full SCANs while 4 clients PING/GET",
        );
        run_one(&mut rows, r.clone(), secs(120), row6_scan_fairness(r)).await;
    }
    if wanted("7") {
        let r = Row::new(
            "7",
            "16",
            "servers with a soft limit of 1,024 files; 2,000 connections held; a new client PINGs",
        );
        run_one(&mut rows, r.clone(), secs(60), row7_connections(r)).await;
    }

    let total = started.elapsed().as_secs_f64();
    let mut md = format!(
        "# dtkv soak (make soak)\n\n{date}, {}. Each row on a fresh system; memory is VmRSS, MiB, before the row / peak (sampled every 100 ms) / 2 s after its clients are gone. Total {total:.0} s.\n\n{TABLE_HEAD}\n",
        machine()
    );
    for r in &rows {
        md.push_str(&r.table_line());
        md.push('\n');
    }
    println!("\n{md}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.parent().unwrap_or(root).join("bench/results");
    let path = dir.join(format!("{date}-soak.md"));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &md)) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => println!("could not write {}: {e}", path.display()),
    }
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(soak());
}
