//! Transactions: timestamps, snapshot isolation, commits through the log, recovery.
//!
//! **Timestamps.** All of them come from the sequencer, in blocks (`NEXT n`) that this process
//! hands out in order under one mutex. Taking a commit timestamp and registering the commit as
//! *in flight* happen in the same critical section, so there is no moment when a timestamp is
//! taken but invisible.
//!
//! **Snapshots.** `BEGIN` takes a start timestamp `s`. A read of key `k` at `s` first waits
//! until no in-flight commit below `s` writes `k` (a scan: none writes into its range). Any
//! commit that could still get a timestamp below `s` already has it and is registered, so after
//! the wait the store holds every commit below `s` that touches what is read, and reads at `s`
//! are a stable snapshot: a reader never skips a commit that has its timestamp but is not
//! applied yet. The wait, when there is one, is at most one log round trip.
//!
//! **First committer wins.** `COMMIT` checks, in that same critical section, each written key
//! against the newest committed version (newer than `s` means someone committed after we
//! started) and against in-flight commits newer than `s` (someone concurrent is committing it
//! now, and was first). Either aborts with `CONFLICT <key>`. Otherwise the commit gets its
//! timestamp and is queued. A single-statement `PUT`/`DEL` reads nothing, so it needs no
//! snapshot: its start is its commit timestamp and it never conflicts.
//!
//! **The committer** takes everything queued, writes it as one log entry (one `APPEND`: group
//! commit), and once the log has it on a majority of replicas applies it to the store, in log
//! order, and answers the clients. Its `(client, seq)` makes a retried append exactly-once, so
//! it retries through logserver failovers. Its invariants:
//! - *Acknowledged means durable*: a commit is answered `COMMITTED`/`OK` only once its entry is
//!   in the log, and never after it was answered anything else.
//! - *Only transient failures are retried* (no leader, a lost connection, no answer): a
//!   deterministic refusal (`ERR TOO_LARGE`, `ERR SYNTAX`, ...) fails the commits of that one
//!   entry and the committer goes on with the next; the log skips nothing for the unused seq.
//!   The refused line is never resent; only when an entry of several commits is refused as
//!   too large are its commits sent again, each in an entry of its own, so that one commit
//!   too large for the log fails alone.
//! - *An entry fits the log's line limit*: commits share an entry only up to [`BATCH_BYTES`] of
//!   `APPEND` line, counted as encoded; a larger transaction goes alone.
//! - *Bounded waits*: a commit not durable within `commit_timeout` is answered
//!   `ERR UNAVAILABLE commit outcome unknown` (or, if it never left the queue, dropped and
//!   answered that it was not made). A timed-out entry already sent keeps being retried with
//!   its `(client, seq)` and, if it lands, is applied in log order like any other: its commits
//!   stay in flight (snapshots wait for them) until the log has decided.
//!
//! **Fencing.** Each kvstore has an epoch (its first timestamp) and starts by appending
//! `EPOCH <e>`. Log indices are dense, so when an append comes back at an index other than the
//! next one, another writer has appended in between; the committer reads the gap, and if it
//! holds a newer `EPOCH` this kvstore has been replaced: it acknowledges nothing more and
//! answers `ERR FENCED`. Replay skips commits made under an epoch older than the newest `EPOCH`
//! before them, which are exactly the ones a fenced kvstore never acknowledged.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};

use protocol::hops::{self, Hop};
use protocol::log::Request as LogRequest;
use protocol::log_client::Replicas;
use protocol::{Client, ClientError, ErrorCode, LogClient, Response};

use crate::mvcc::Store;
use crate::record::Record;

/// Timestamps fetched from the sequencer at once.
const TS_BLOCK: u64 = 10_000;
/// Commits share a log entry up to this many bytes of `APPEND` line, counted as encoded (a
/// larger transaction goes alone); far below the log's line limit, [`protocol::log::LOG_MAX_LINE`].
const BATCH_BYTES: usize = 512 * 1024;
/// Checkpoint chunk size, before quoting (binary may quadruple when quoted).
const CKPT_CHUNK: usize = 192 * 1024;
/// Checkpoint chunks requested at once while loading.
const CKPT_WINDOW: usize = 8;
/// Keys a checkpoint copies between two chances for other tasks to run (~2 ms).
const CKPT_COPY_KEYS: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Unavailable(String),
    #[error("this kvstore was replaced by a newer one{}; connect to that one", epoch_note(*.0))]
    Fenced(u64),
    /// The log refused the commit's entry as over its line limit: it was not appended, so the
    /// commit did not happen (`ABORTED TOO_LARGE` at `COMMIT`, `ERR TOO_LARGE` for a `PUT`).
    #[error("{0}")]
    TooLarge(String),
}

/// The epoch of the kvstore that took over, when the log no longer shows it: another writer's
/// checkpoint compacted the part of the log that held its `EPOCH`.
pub const UNKNOWN_EPOCH: u64 = u64::MAX;

fn epoch_note(epoch: u64) -> String {
    if epoch == UNKNOWN_EPOCH {
        String::new()
    } else {
        format!(" (epoch {epoch})")
    }
}

/// Why entries appended by someone else could not be read and applied.
#[derive(Debug, thiserror::Error)]
enum GapError {
    /// The range was compacted by a checkpoint past our applied index: only another writer
    /// checkpoints there, so another kvstore has taken over.
    #[error("compacted by another writer's checkpoint; the log now starts at {0}")]
    Compacted(u64),
    /// An entry that is not kvstore records: nothing can be vouched for after it.
    #[error("entry {0} is not kvstore records: {1}")]
    Unreadable(u64, String),
    /// The log did not answer in time, or the connection failed: try again.
    #[error("{0}")]
    Transient(String),
}

/// A commit handed to the committer, or refused on the spot.
pub enum Submitted {
    Conflict(Bytes),
    /// Queued with this commit timestamp; the receiver says when it is durable.
    Queued(u64, oneshot::Receiver<Result<(), EngineError>>),
}

/// How a commit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed(u64),
    Conflict(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Starting,
    Replaying { done: u64, total: u64 },
    Serving,
    Fenced(u64),
}

pub struct Config {
    pub sequencer: String,
    pub log: Vec<String>,
    /// Write a checkpoint after this many commit records...
    pub checkpoint_every: u64,
    /// ...or after this many bytes of log payload, whichever comes first...
    pub checkpoint_bytes: u64,
    /// ...but only once the log payload since the last checkpoint is at least this fraction of
    /// that checkpoint's size. A checkpoint rewrites all the data, so without this a large
    /// store would spend most of its log bandwidth on checkpoints; with 0.5, checkpoints write
    /// at most two bytes per byte of commits, and replay stays shorter than loading one.
    pub checkpoint_ratio: f64,
    /// Follow the log with TAIL to notice a takeover at once (see `follow`).
    pub follow_log: bool,
    /// A commit not durable within this long is answered `ERR UNAVAILABLE commit outcome
    /// unknown` (`--commit-timeout-secs`).
    pub commit_timeout: Duration,
    /// Log entries the committer sends ahead without waiting for a reply, however little each
    /// holds (`--log-pipeline`; see [`MAX_INFLIGHT_BATCHES`]).
    pub log_pipeline: usize,
}

struct TxnState {
    /// Local block of timestamps `[next, end)`.
    next: u64,
    end: u64,
    /// Commits with a timestamp, not yet applied: ts -> keys.
    inflight: BTreeMap<u64, Vec<Bytes>>,
    /// Key -> timestamps of the in-flight commits writing it (several only for blind writes).
    inflight_keys: HashMap<Bytes, Vec<u64>>,
    /// Start timestamps of open transactions (with counts), for the GC watermark.
    active: BTreeMap<u64, usize>,
}

struct CommitReq {
    record: Record,
    /// `record` as it goes into the log entry (encoded by the session, off the committer).
    encoded: Vec<u8>,
    /// `encoded`'s length once quoted into the `APPEND` line, without the quote marks.
    quoted: usize,
    /// When the commit must have been answered.
    deadline: tokio::time::Instant,
    /// Taken when the commit is answered (an entry may land after its commits timed out).
    reply: Option<oneshot::Sender<Result<(), EngineError>>>,
    /// Goes in a log entry of its own: it shared one that the log refused as too large.
    alone: bool,
}

impl CommitReq {
    fn new(
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

    fn ts(&self) -> Option<u64> {
        match self.record {
            Record::Commit { ts, .. } => Some(ts),
            Record::Epoch(_) => None,
        }
    }

    fn answer(&mut self, result: Result<(), EngineError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
}

/// The checkpoint's content: the newest version of every live key as of a log index.
#[derive(Serialize, Deserialize)]
struct CheckpointData {
    index: u64,
    max_ts: u64,
    epoch: u64,
    entries: Vec<(Bytes, u64, Bytes)>,
}

pub struct Engine {
    pub store: RwLock<Store>,
    txns: Mutex<TxnState>,
    /// Fires when in-flight commits are resolved.
    resolved: Notify,
    committer: mpsc::Sender<CommitReq>,
    mode: Mutex<Mode>,
    sequencer: tokio::sync::Mutex<Option<Client>>,
    cfg: Config,
    epoch: AtomicU64,
    applied_index: AtomicU64,
    commits_since_checkpoint: AtomicU64,
    /// Bytes of log payload since the last checkpoint (the other trigger).
    bytes_since_checkpoint: AtomicU64,
    checkpointing: AtomicBool,
    /// Size of the last checkpoint written or loaded, in bytes.
    last_checkpoint_bytes: AtomicU64,
    /// After a failed checkpoint, no new one before this (the log may be down for a while).
    checkpoint_retry_at: Mutex<Option<std::time::Instant>>,
    /// Commit records applied in total (STATUS).
    pub commits: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Creates the engine and starts recovery and the committer in the background; data
    /// commands answer `ERR UNAVAILABLE` until recovery is done.
    pub fn start(cfg: Config) -> Arc<Engine> {
        // Small: the committer moves what arrives into its own queue at once (where deadlines
        // are kept); this only has to cover the moments it is busy applying.
        let (tx, rx) = mpsc::channel(4096);
        let engine = Arc::new(Engine {
            store: RwLock::new(Store::new()),
            txns: Mutex::new(TxnState {
                next: 0,
                end: 0,
                inflight: BTreeMap::new(),
                inflight_keys: HashMap::new(),
                active: BTreeMap::new(),
            }),
            resolved: Notify::new(),
            committer: tx,
            mode: Mutex::new(Mode::Starting),
            sequencer: tokio::sync::Mutex::new(None),
            cfg,
            epoch: AtomicU64::new(0),
            applied_index: AtomicU64::new(0),
            commits_since_checkpoint: AtomicU64::new(0),
            bytes_since_checkpoint: AtomicU64::new(0),
            checkpointing: AtomicBool::new(false),
            last_checkpoint_bytes: AtomicU64::new(0),
            checkpoint_retry_at: Mutex::new(None),
            commits: AtomicU64::new(0),
        });
        let e = engine.clone();
        tokio::spawn(async move {
            let mut log = LogClient::new(e.cfg.log.clone());
            log.deadline = Duration::from_secs(5);
            loop {
                match e.recover(&mut log).await {
                    Ok(()) => break,
                    Err(err) => {
                        tracing::warn!("recovery failed, retrying: {err}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            let from = e.applied_index.load(Ordering::SeqCst) + 1;
            if e.cfg.follow_log {
                tokio::spawn(crate::follow::follow(e.clone(), from));
            }
            committer_loop(e, rx, log).await;
        });
        let e = engine.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                e.collect_garbage();
            }
        });
        engine
    }

    /// This kvstore's epoch (0 until recovery has chosen it).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub fn log_addrs(&self) -> &[String] {
        &self.cfg.log
    }

    /// A newer kvstore (epoch `by`) has taken over the log: stop serving.
    pub fn fence(&self, by: u64) {
        let mut m = lock(&self.mode);
        match *m {
            Mode::Fenced(old) if old >= by => {}
            _ => *m = Mode::Fenced(by),
        }
    }

    /// Whether a checkpoint is being captured or uploaded (it holds a copy of the live data).
    pub fn checkpointing(&self) -> bool {
        self.checkpointing.load(Ordering::SeqCst)
    }

    /// The log index applied last: every entry up to it has been read or appended by us.
    pub fn applied_index(&self) -> u64 {
        self.applied_index.load(Ordering::SeqCst)
    }

    pub fn mode(&self) -> Mode {
        lock(&self.mode).clone()
    }

    fn set_mode(&self, m: Mode) {
        *lock(&self.mode) = m;
    }

    /// `Ok` if data commands may run now.
    pub fn check_serving(&self) -> Result<(), EngineError> {
        match self.mode() {
            Mode::Serving => Ok(()),
            Mode::Starting => Err(EngineError::Unavailable(
                "starting: waiting for the sequencer and the log".into(),
            )),
            Mode::Replaying { done, total } => Err(EngineError::Unavailable(format!(
                "replaying {done}/{total}"
            ))),
            Mode::Fenced(e) => Err(EngineError::Fenced(e)),
        }
    }

    /// Fetches a new block of timestamps if the local one is used up.
    async fn refill(&self) -> Result<(), EngineError> {
        let mut seq = self.sequencer.lock().await;
        {
            let t = lock(&self.txns);
            if t.next < t.end {
                return Ok(());
            }
        }
        let mut last_err = String::new();
        for attempt in 0..50u64 {
            if seq.is_none() {
                match Client::connect(self.cfg.sequencer.as_str()).await {
                    Ok(c) => *seq = Some(c),
                    Err(e) => last_err = e.to_string(),
                }
            }
            if let Some(c) = seq.as_mut() {
                match c.next_block(TS_BLOCK).await {
                    Ok(first) => {
                        let mut t = lock(&self.txns);
                        if first <= t.next.saturating_sub(1) {
                            return Err(EngineError::Unavailable(format!(
                                "sequencer went backwards ({first} after {})",
                                t.next
                            )));
                        }
                        t.next = first;
                        t.end = first + TS_BLOCK;
                        return Ok(());
                    }
                    Err(e) => {
                        last_err = e.to_string();
                        *seq = None;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20 * (attempt + 1).min(10))).await;
        }
        Err(EngineError::Unavailable(format!(
            "sequencer {} unreachable: {last_err}",
            self.cfg.sequencer
        )))
    }

    /// Takes a timestamp and runs `register` in the same critical section.
    async fn with_ts<T>(
        &self,
        mut register: impl FnMut(&mut TxnState, u64) -> T,
    ) -> Result<T, EngineError> {
        loop {
            {
                let mut t = lock(&self.txns);
                if t.next < t.end {
                    let ts = t.next;
                    t.next += 1;
                    return Ok(register(&mut t, ts));
                }
            }
            self.refill().await?;
        }
    }

    /// Starts a snapshot and returns its timestamp. The caller must `end_snapshot` it. Reads
    /// at the snapshot go through `get`/`scan`, which wait for the in-flight commits below it
    /// that touch what they read.
    pub async fn begin(&self) -> Result<u64, EngineError> {
        self.check_serving()?;
        self.with_ts(|t, ts| {
            *t.active.entry(ts).or_default() += 1;
            ts
        })
        .await
    }

    /// Waits until no in-flight commit below `s` writes a key that `touches` selects.
    async fn wait_inflight(&self, s: u64, touches: impl Fn(&[u8]) -> bool) {
        loop {
            let resolved = self.resolved.notified();
            tokio::pin!(resolved);
            resolved.as_mut().enable();
            let blocked = lock(&self.txns)
                .inflight
                .range(..s)
                .any(|(_, keys)| keys.iter().any(|k| touches(k)));
            if !blocked {
                return;
            }
            resolved.await;
        }
    }

    pub fn end_snapshot(&self, s: u64) {
        let mut t = lock(&self.txns);
        if let Some(n) = t.active.get_mut(&s) {
            *n -= 1;
            if *n == 0 {
                t.active.remove(&s);
            }
        }
    }

    /// `key` as of snapshot `s`, once no commit below `s` that writes it is still in flight.
    pub async fn get(&self, key: &[u8], s: u64) -> Option<Bytes> {
        let waits = lock(&self.txns)
            .inflight_keys
            .get(key)
            .is_some_and(|tss| tss.iter().any(|&t| t < s));
        if waits {
            self.wait_inflight(s, |k| k == key).await;
        }
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key, s)
    }

    /// Rows of `[start, end)` as of snapshot `s` (after the in-flight commits below `s` that
    /// write into the range).
    pub async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        s: u64,
        limit: usize,
    ) -> Vec<(Bytes, Bytes)> {
        self.wait_inflight(s, |k| k >= start && k < end).await;
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .scan(start, end, s, limit)
    }

    /// Waits until no in-flight commit below `s` writes into `[start, end)`. After it, pages of
    /// that range read at `s` (with `scan_page`, while `s` stays registered) are one stable
    /// snapshot: every commit that could still get a timestamp below `s` already had one.
    pub async fn wait_range(&self, start: &[u8], end: &[u8], s: u64) {
        self.wait_inflight(s, |k| k >= start && k < end).await;
    }

    /// One page of `(from, end)` at `s` (see [`Store::scan_page`]); call `wait_range` first.
    /// The store is locked only for the page, so a long scan lets commits and GC in between.
    pub fn scan_page(
        &self,
        from: std::ops::Bound<&[u8]>,
        end: &[u8],
        s: u64,
        max_keys: usize,
        max_bytes: usize,
    ) -> crate::mvcc::Page {
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .scan_page(from, end, s, max_keys, max_bytes)
    }

    /// Commits writes made on the snapshot `start_ts` (first committer wins). `start_ts` None
    /// is a blind single-statement write: it reads nothing, so its snapshot is its commit
    /// timestamp, nothing can commit in between, and it never conflicts.
    pub async fn commit(
        &self,
        start_ts: Option<u64>,
        writes: Vec<(Bytes, Option<Bytes>)>,
    ) -> Result<Outcome, EngineError> {
        match self.submit(start_ts, writes).await? {
            Submitted::Conflict(key) => Ok(Outcome::Conflict(key)),
            Submitted::Queued(ts, rx) => match rx.await {
                Ok(Ok(())) => Ok(Outcome::Committed(ts)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(EngineError::Unavailable("committer stopped".into())),
            },
        }
    }

    /// The first half of `commit`: decides conflicts, takes the timestamp and queues the
    /// commit, without waiting for the log. Commits submitted one after another reach the log
    /// in that order, so a session can pipeline writes and still read them back in order.
    pub async fn submit(
        &self,
        start_ts: Option<u64>,
        writes: Vec<(Bytes, Option<Bytes>)>,
    ) -> Result<Submitted, EngineError> {
        self.check_serving()?;
        let keys: Vec<Bytes> = writes.iter().map(|(k, _)| k.clone()).collect();
        let decided = self
            .with_ts(|t, ts| {
                if let Some(start) = start_ts {
                    for k in &keys {
                        let racing = t
                            .inflight_keys
                            .get(k)
                            .is_some_and(|tss| tss.iter().any(|&c| c > start));
                        if racing {
                            return Err(k.clone());
                        }
                    }
                    let store = self.store.read().unwrap_or_else(|p| p.into_inner());
                    for k in &keys {
                        if store.latest_ts(k).is_some_and(|c| c > start) {
                            return Err(k.clone());
                        }
                    }
                }
                t.inflight.insert(ts, keys.clone());
                for k in &keys {
                    t.inflight_keys.entry(k.clone()).or_default().push(ts);
                }
                Ok(ts)
            })
            .await?;
        // A conflict wastes one timestamp of the local block; nothing else saw it.
        let ts = match decided {
            Ok(ts) => ts,
            Err(key) => return Ok(Submitted::Conflict(key)),
        };
        // `--trace-hops`: decided here, before the committer can see the commit.
        hops::sample(ts);
        let record = Record::Commit {
            ts,
            epoch: self.epoch.load(Ordering::SeqCst),
            writes,
        };
        let deadline = tokio::time::Instant::now() + self.cfg.commit_timeout;
        let (req, rx) = CommitReq::new(record, deadline);
        // The committer's queue is bounded; when it is full (the log has been down for a while)
        // this waits, but not past the commit's deadline. Nothing was queued then.
        match tokio::time::timeout_at(deadline, self.committer.send(req)).await {
            Ok(Ok(())) => Ok(Submitted::Queued(ts, rx)),
            Ok(Err(_)) => {
                self.resolve(&[ts]);
                Err(EngineError::Unavailable("committer stopped".into()))
            }
            Err(_) => {
                self.resolve(&[ts]);
                Err(not_made(self.cfg.commit_timeout))
            }
        }
    }

    /// Removes commits from the in-flight set and wakes waiting snapshots.
    fn resolve(&self, tss: &[u64]) {
        {
            let mut t = lock(&self.txns);
            for ts in tss {
                if let Some(keys) = t.inflight.remove(ts) {
                    for k in keys {
                        if let Some(tss) = t.inflight_keys.get_mut(&k) {
                            tss.retain(|c| c != ts);
                            if tss.is_empty() {
                                t.inflight_keys.remove(&k);
                            }
                        }
                    }
                }
            }
        }
        self.resolved.notify_waiters();
    }

    fn collect_garbage(&self) {
        let watermark = {
            let t = lock(&self.txns);
            t.active.keys().next().copied().unwrap_or(t.next)
        };
        let dropped = self
            .store
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .collect_garbage(watermark);
        if dropped > 0 {
            tracing::debug!(dropped, watermark, "collected old versions");
        }
    }

    /// Applies one log entry (`bytes` of payload) in order and counts the commits it applied.
    fn apply_counted(&self, records: Vec<Record>, bytes: usize, epoch: &mut u64) {
        let n = self.apply_records(records, epoch);
        self.commits.fetch_add(n, Ordering::Relaxed);
        self.commits_since_checkpoint
            .fetch_add(n, Ordering::Relaxed);
        self.bytes_since_checkpoint
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn apply_records(&self, records: Vec<Record>, epoch: &mut u64) -> u64 {
        let mut applied = 0;
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        for r in records {
            match r {
                Record::Epoch(e) => *epoch = (*epoch).max(e),
                Record::Commit {
                    ts,
                    epoch: e,
                    writes,
                } => {
                    if e >= *epoch {
                        store.apply(ts, &writes);
                        applied += 1;
                    }
                }
            }
        }
        applied
    }

    /// Replays from `from` to the end of the log. A task of its own reads and parses pages
    /// ahead on a second connection, so the logserver's work, the network and parsing overlap
    /// with applying. Returns (last index applied, entries applied).
    async fn replay(&self, from: u64, epoch: &mut u64) -> Result<(u64, u64), String> {
        let mut pages = prefetch_pages(self.cfg.log.clone(), from);
        let mut last = from.saturating_sub(1);
        let mut count = 0;
        while let Some(page) = pages.recv().await {
            for (i, bytes, records) in page? {
                self.apply_counted(records, bytes, epoch);
                last = i;
                count += 1;
            }
            if let Mode::Replaying { total, .. } = self.mode() {
                self.set_mode(Mode::Replaying {
                    done: last,
                    total: total.max(last),
                });
            }
        }
        Ok((last, count))
    }

    /// Loads the checkpoint, replays the log, fences older kvstores, then serves.
    async fn recover(&self, log: &mut LogClient) -> Result<(), String> {
        // A failed attempt is retried from scratch with an empty store: what it counted goes.
        self.commits.store(0, Ordering::Relaxed);
        self.commits_since_checkpoint.store(0, Ordering::Relaxed);
        self.bytes_since_checkpoint.store(0, Ordering::Relaxed);
        // The epoch must come from the sequencer now, not from a block fetched before an
        // earlier attempt: it orders kvstores by start, and a stale one would lose to (or be
        // refused behind) every kvstore started meanwhile, attempt after attempt.
        {
            let mut t = lock(&self.txns);
            t.end = t.next;
        }
        self.refill().await.map_err(|e| e.to_string())?;
        let my_epoch = lock(&self.txns).next;
        // The epoch is a timestamp: it orders kvstores by start.
        lock(&self.txns).next += 1;
        self.epoch.store(my_epoch, Ordering::SeqCst);
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Store::new();

        let mut seen_epoch = 0u64;
        let mut index = 0u64;
        let started = std::time::Instant::now();
        if let Some((ck, len)) = load_checkpoint(log).await? {
            let fetched = started.elapsed().as_secs_f64();
            self.last_checkpoint_bytes.store(len, Ordering::Relaxed);
            let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
            *store = Store::from_latest(ck.entries);
            index = ck.index;
            seen_epoch = ck.epoch;
            tracing::info!(
                "loaded checkpoint at log index {index} ({} keys) in {:.2} s ({fetched:.2} s fetching and decoding)",
                store.stats().0,
                started.elapsed().as_secs_f64()
            );
        }
        let total = match log
            .call_leader(b"STATUS")
            .await
            .map_err(|e| e.to_string())?
        {
            Response::Ok(args) => args
                .iter()
                .filter_map(|a| a.strip_prefix(b"last="))
                .find_map(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                .unwrap_or(0),
            _ => 0,
        };
        self.set_mode(Mode::Replaying { done: index, total });
        let started = std::time::Instant::now();
        let commits_before = self.commits.load(Ordering::Relaxed);
        let after = index
            .checked_add(1)
            .ok_or_else(|| format!("log index {index} has no successor"))?;
        let replayed = self.replay(after, &mut seen_epoch).await?;
        index = replayed.0.max(index);
        let took = started.elapsed().as_secs_f64();
        let commits = self.commits.load(Ordering::Relaxed) - commits_before;
        tracing::info!(
            "replayed {} entries ({commits} commits) up to index {index} in {took:.2} s ({:.0} commits/s)",
            replayed.1,
            commits as f64 / took.max(1e-6)
        );
        if seen_epoch > my_epoch {
            return Err(format!(
                "the log has epoch {seen_epoch}, newer than ours ({my_epoch}); the sequencer is behind"
            ));
        }

        // Take over: EPOCH, then whatever was appended between the replay and it.
        let client = format!("kv-{my_epoch}");
        let mut payload = Vec::new();
        Record::Epoch(my_epoch).encode(&mut payload);
        let at = log
            .append(client.as_bytes(), 0, &payload)
            .await
            .map_err(|e| e.to_string())?;
        let after = index
            .checked_add(1)
            .ok_or_else(|| format!("log index {index} has no successor"))?;
        if at > after {
            let mut next = after;
            self.read_gap(log, &mut next, at - 1, &mut seen_epoch)
                .await
                .map_err(|e| e.to_string())?;
        }
        if seen_epoch > my_epoch {
            self.set_mode(Mode::Fenced(seen_epoch));
            return Err(format!("fenced by epoch {seen_epoch} while starting"));
        }
        self.applied_index.store(at, Ordering::SeqCst);
        self.set_mode(Mode::Serving);
        let (keys, versions, bytes) = self.store.read().unwrap_or_else(|p| p.into_inner()).stats();
        tracing::info!(
            "serving: epoch {my_epoch}, log index {at}, {keys} keys, {versions} versions, {bytes} bytes"
        );
        Ok(())
    }

    /// Reads and applies the entries `*next..=to`, advancing `*next` past each one applied, so
    /// a caller that retries after an error neither skips nor repeats one.
    async fn read_gap(
        &self,
        log: &mut LogClient,
        next: &mut u64,
        to: u64,
        epoch: &mut u64,
    ) -> Result<(), GapError> {
        let mut empty = 0;
        while *next <= to {
            let page = match log.read(*next, Some(to - *next + 1)).await {
                Ok(page) => page,
                Err(ClientError::Server(e)) if e.code == ErrorCode::Compacted => {
                    return Err(match e.compacted_first() {
                        Some(first) => GapError::Compacted(first),
                        None => GapError::Transient(format!("bad COMPACTED reply: {e}")),
                    });
                }
                Err(e) => return Err(GapError::Transient(e.to_string())),
            };
            if page.is_empty() {
                // A lagging replica: ask again until it has the entries we know exist, but not
                // forever: a replica cut off from the leader never will.
                empty += 1;
                if empty >= 100 {
                    let replica = log.connected_to().unwrap_or("?").to_string();
                    log.rotate();
                    return Err(GapError::Transient(format!(
                        "replica {replica} has not caught up to {next}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            empty = 0;
            if page.first().map(|(i, _)| *i) != Some(*next) {
                // Out of step with the replica (a reply left over from a failed call): only a
                // new connection is known good.
                log.rotate();
                return Err(GapError::Transient(format!(
                    "READ {next} answered from another index"
                )));
            }
            for (i, payload) in page.into_iter().take_while(|(i, _)| *i <= to) {
                let records =
                    Record::parse_entry(&payload).map_err(|e| GapError::Unreadable(i, e))?;
                self.apply_counted(records, payload.len(), epoch);
                *next = i
                    .checked_add(1)
                    .ok_or_else(|| GapError::Unreadable(i, "an index with no successor".into()))?;
            }
        }
        Ok(())
    }

    /// (applied log index, epoch, open snapshots, in-flight commits).
    pub fn positions(&self) -> (u64, u64, usize, usize) {
        let t = lock(&self.txns);
        (
            self.applied_index.load(Ordering::SeqCst),
            self.epoch.load(Ordering::SeqCst),
            t.active.values().sum(),
            t.inflight.len(),
        )
    }
}

/// One page of parsed log entries, or the error that ended the stream.
type Page = Result<Vec<(u64, usize, Vec<Record>)>, String>;

/// Pages of parsed log entries from `from` to the end (an empty page), read ahead of the
/// consumer on a connection of their own.
fn prefetch_pages(addrs: Vec<String>, from: u64) -> mpsc::Receiver<Page> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut log = LogClient::new(addrs);
        log.deadline = Duration::from_secs(5);
        let mut next = from;
        loop {
            let page = match log.read(next, None).await {
                Ok(page) => page,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    return;
                }
            };
            let Some(&(last, _)) = page.last() else {
                return;
            };
            let after = last.checked_add(1);
            let parsed: Page = page
                .into_iter()
                .map(|(i, payload)| Ok((i, payload.len(), Record::parse_entry(&payload)?)))
                .collect();
            if tx.send(parsed).await.is_err() {
                return;
            }
            let Some(after) = after else {
                let _ = tx
                    .send(Err(format!("log index {last} has no successor")))
                    .await;
                return;
            };
            next = after;
        }
    });
    rx
}

/// A second connection to the replica `log` is talking to, for pipelining on.
async fn connect_alongside(log: &LogClient) -> Result<(String, Client), String> {
    let addr = log
        .connected_to()
        .ok_or("no logserver connection")?
        .to_string();
    let conn = Client::connect(addr.as_str())
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    Ok((addr, conn))
}

/// The latest checkpoint and its size in bytes, if there is one.
async fn load_checkpoint(log: &mut LogClient) -> Result<Option<(CheckpointData, u64)>, String> {
    let info = match log
        .call_leader(b"CKPT_INFO")
        .await
        .map_err(|e| e.to_string())?
    {
        Response::Ok(args) => args,
        Response::Err(e) if e.code == ErrorCode::NotFound => return Ok(None),
        r => return Err(format!("CKPT_INFO: {r:?}")),
    };
    let field = |name: &str| -> Result<u64, String> {
        info.iter()
            .filter_map(|a| std::str::from_utf8(a).ok())
            .filter_map(|a| a.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| format!("CKPT_INFO lacks {name}"))
    };
    let (id, len, crc) = (field("id")?, field("len")?, field("crc")?);
    // Chunks are requested CKPT_WINDOW at a time on one connection to the replica that
    // answered, so its work and ours overlap instead of taking turns.
    let (addr, mut conn) = connect_alongside(log).await?;
    let mut data = Vec::with_capacity(len as usize);
    let mut requested = 0u64;
    let mut outstanding = 0usize;
    while (data.len() as u64) < len {
        while outstanding < CKPT_WINDOW && requested < len {
            let req = LogRequest::CkptRead {
                id,
                offset: requested,
                max: CKPT_CHUNK as u64,
            };
            conn.send(&req.encode());
            requested += CKPT_CHUNK as u64;
            outstanding += 1;
        }
        conn.flush().await.map_err(|e| format!("{addr}: {e}"))?;
        match conn.recv().await.map_err(|e| format!("{addr}: {e}"))? {
            Response::Value(chunk) if !chunk.is_empty() && chunk.len() <= CKPT_CHUNK => {
                data.extend_from_slice(&chunk);
                outstanding -= 1;
                // A short chunk anywhere but at the end would misalign the requests in flight.
                if chunk.len() < CKPT_CHUNK && (data.len() as u64) < len {
                    return Err(format!("CKPT_READ: short chunk at offset {}", data.len()));
                }
            }
            r => return Err(format!("CKPT_READ: {r:?}")),
        }
    }
    if data.len() as u64 != len {
        return Err(format!(
            "checkpoint is {} bytes, expected {len}",
            data.len()
        ));
    }
    if crc32c::crc32c(&data) != crc as u32 {
        return Err("checkpoint fails its CRC".into());
    }
    tracing::info!("fetched checkpoint {id}: {len} bytes");
    postcard::from_bytes(&data)
        .map(|ck| Some((ck, len)))
        .map_err(|e| format!("undecodable checkpoint: {e}"))
}

/// Log entries the committer keeps in flight at most. A new entry goes out while others are in
/// flight only if the one sent last was full (`BATCH_BYTES`): under a light or moderate load
/// everything that arrives during a log round trip then goes out as the next single entry, so
/// each Raft round carries one large entry instead of several small ones and the replicas do
/// less work per commit, while a heavy pipelined load still keeps several full entries moving.
/// Measured with 64 clients, one PUT in flight each (bench-kv, one run): always up to 8 in
/// flight gave 25,000-28,700 PUT/s at 22-29 µs of log-replica CPU per commit; one at a time
/// gave 31,700-31,900 at 17.6-18.2 µs.
const MAX_INFLIGHT_BATCHES: usize = 8;
/// Default of [`Config::log_pipeline`].
pub const DEFAULT_LOG_PIPELINE: usize = 4;
/// With appends in flight and no reply for this long, the committer tries another replica: a
/// log leader cut off from its majority keeps appends without ever answering them.
const APPEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Commits the committer holds that are not sent yet, at most (by count and by encoded bytes);
/// past either it stops taking from its channel, and `submit` waits (up to the deadline).
const QUEUE_COMMITS: usize = 64 * 1024;
const QUEUE_BYTES: usize = 64 << 20;

/// One log entry on its way: its APPEND line (which carries its `(client, seq)`) and who waits
/// for it.
struct Batch {
    line: Vec<u8>,
    reqs: Vec<CommitReq>,
    tss: Vec<u64>,
    /// Payload bytes (the records, before quoting), for the checkpoint trigger.
    bytes: usize,
    /// `reqs[..answered]` timed out and were answered already (deadlines are in queue order).
    answered: usize,
}

/// The committer's pipelined connection to the log leader.
struct Leader {
    replicas: Replicas,
    conn: Option<Client>,
}

impl Leader {
    /// Connects to the current guess and sends every batch still in flight, in order.
    async fn reconnect(&mut self, inflight: &VecDeque<Batch>) -> bool {
        let addr = self.replicas.current().to_string();
        let connected =
            tokio::time::timeout(Duration::from_secs(1), Client::connect(addr.as_str())).await;
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

/// The answer to a commit whose entry was sent but is not known to be in the log by its
/// deadline: it may still land (and then it is applied, unacknowledged).
fn outcome_unknown(timeout: Duration) -> EngineError {
    EngineError::Unavailable(format!(
        "commit outcome unknown: the log did not make it durable within {} s (--commit-timeout-secs); it may still be applied, read it back to find out",
        timeout.as_secs()
    ))
}

/// The answer to a commit that never reached the log (it waited in the queue past its
/// deadline and was dropped): it did not happen.
fn not_made(timeout: Duration) -> EngineError {
    EngineError::Unavailable(format!(
        "commit not made: the log took no commit for {} s (--commit-timeout-secs); retry",
        timeout.as_secs()
    ))
}

/// Group commit with pipelining: everything queued becomes one log entry (up to
/// [`BATCH_BYTES`] of `APPEND` line), up to [`MAX_INFLIGHT_BATCHES`] entries are in flight on
/// one connection, and their replies come back in log order, so batches are applied in log
/// order. If the connection fails or the leader changes, every unacknowledged batch is sent
/// again with its `(client, seq)`: the log's dedupe returns the original index for those that
/// did commit. A refusal is not retried (see [`reject_batch`]); deadlines are kept by
/// [`expire`], at the top of every turn.
async fn committer_loop(e: Arc<Engine>, mut rx: mpsc::Receiver<CommitReq>, mut log: LogClient) {
    let epoch = e.epoch.load(Ordering::SeqCst);
    let mut out = Outbox {
        leader: Leader {
            replicas: Replicas::new(e.cfg.log.clone()),
            conn: None,
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
        let can_send = !out.queue.is_empty()
            && (out.inflight.len() < e.cfg.log_pipeline.max(1)
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

/// Answers every commit past its deadline; returns the next deadline and the timestamps of the
/// commits dropped (the caller resolves them). A commit in an entry already sent gets "outcome
/// unknown" and its entry stays in flight; one still queued is dropped, since it never reached
/// the log, and gets "not made".
fn expire(
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
fn expire_sent(
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
        ErrorCode::TooLarge | ErrorCode::Syntax | ErrorCode::UnknownCommand | ErrorCode::Rejected
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

/// The committer's side of the log connection: what is in flight, what is queued, and the
/// `(client, seq)` the next entry gets.
struct Outbox {
    leader: Leader,
    inflight: VecDeque<Batch>,
    /// Commits taken from the channel, not sent yet (in submit order, so deadline order).
    queue: VecDeque<CommitReq>,
    /// Encoded bytes of `queue`.
    queued_bytes: usize,
    /// Timestamps of refused entries that may have been appended all the same (see
    /// [`reject_batch`]), resolved once a later entry lands.
    unsettled: Vec<u64>,
    client: Bytes,
    seq: u64,
}

impl Outbox {
    fn has_room(&self) -> bool {
        self.queue.len() < QUEUE_COMMITS && self.queued_bytes < QUEUE_BYTES
    }

    fn push(&mut self, req: CommitReq) {
        self.queued_bytes = self.queued_bytes.saturating_add(req.encoded.len());
        self.queue.push_back(req);
    }
}

/// One log entry built from the front of the queue: the `APPEND` line and the commits in it.
struct Built {
    line: Vec<u8>,
    reqs: Vec<CommitReq>,
    /// Payload bytes (records and their newlines, before the `APPEND` quoting).
    bytes: usize,
    /// Whether commits were left queued because the entry was full.
    full: bool,
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
fn build_batch(queue: &mut VecDeque<CommitReq>, client: &Bytes, seq: u64) -> Built {
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

/// Makes the front of the queue one log entry and sends it; returns whether it was full. A
/// fenced kvstore answers them `ERR FENCED` instead.
async fn send_batch(e: &Engine, out: &mut Outbox) -> bool {
    if let Mode::Fenced(by) = e.mode() {
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
    let expected = e.applied_index.load(Ordering::SeqCst) + 1;
    if let (true, Mode::Fenced(by)) = (index > expected, e.mode()) {
        // The follower already saw the takeover. The gap may or may not hold it (this entry
        // may have landed just before the newer EPOCH), so this batch's outcome is unknown:
        // it gets ERR FENCED, which leaves a COMMIT's outcome open, without reading the gap.
        // With no gap the entry is certainly before the takeover and is acknowledged below.
        *seen_epoch = (*seen_epoch).max(by);
    }
    if index > expected && *seen_epoch <= epoch {
        // Someone else appended in between: read what, and check for a newer epoch. Nothing is
        // acknowledged until the whole gap is read: a newer EPOCH in it means this batch landed
        // after a takeover, and every replay will skip it.
        let mut next = expected;
        let mut wait = Duration::from_millis(20);
        loop {
            match e.read_gap(log, &mut next, index - 1, seen_epoch).await {
                Ok(()) => break,
                Err(GapError::Transient(err)) => {
                    tracing::warn!(
                        "reading log entries {next}..{index} by another writer: {err}; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                    // The log may be down for long: commits still get their answer in time.
                    let now = tokio::time::Instant::now();
                    let timeout = e.cfg.commit_timeout;
                    expire_sent(&mut batch, now, timeout);
                    let (_, dropped) = expire(out, now, timeout);
                    if !dropped.is_empty() {
                        e.resolve(&dropped);
                    }
                    if let Mode::Fenced(by) = e.mode() {
                        *seen_epoch = (*seen_epoch).max(by);
                        break;
                    }
                }
                Err(err @ (GapError::Compacted(_) | GapError::Unreadable(..))) => {
                    tracing::error!("log entries {next}..{index} by another writer: {err}");
                    *seen_epoch = UNKNOWN_EPOCH;
                    break;
                }
            }
        }
    }
    if *seen_epoch > epoch {
        tracing::error!("fenced: kvstore epoch {seen_epoch} took over the log");
        e.fence(*seen_epoch);
        e.resolve(&batch.tss);
        for mut r in batch.reqs {
            r.answer(Err(EngineError::Fenced(*seen_epoch)));
        }
        return;
    }
    if index < expected {
        // The logserver proposes a connection's appends in the order they were sent, so this
        // means the entry was already read back and applied as someone else's; applying it
        // twice would duplicate versions.
        tracing::error!("log entry {index} came back after {expected} was expected; not reapplied");
        e.resolve(&batch.tss);
        for mut r in batch.reqs {
            // Those that timed out were answered already and are not answered again.
            r.answer(Ok(()));
        }
        return;
    }
    let applied = {
        let mut store = e.store.write().unwrap_or_else(|p| p.into_inner());
        for r in &batch.reqs {
            if let Record::Commit { ts, writes, .. } = &r.record {
                store.apply(*ts, writes);
            }
        }
        batch.tss.len() as u64
    };
    e.applied_index.store(index, Ordering::SeqCst);
    e.commits.fetch_add(applied, Ordering::Relaxed);
    e.resolve(&batch.tss);
    for mut r in batch.reqs {
        // Those that timed out were answered already: never `COMMITTED` after that.
        r.answer(Ok(()));
    }
    let since = e
        .commits_since_checkpoint
        .fetch_add(applied, Ordering::Relaxed)
        + applied;
    let bytes = batch.bytes as u64;
    let bytes_since = e.bytes_since_checkpoint.fetch_add(bytes, Ordering::Relaxed) + bytes;
    let last = e.last_checkpoint_bytes.load(Ordering::Relaxed);
    let due = checkpoint_due(&e.cfg, since, bytes_since, last)
        && lock(&e.checkpoint_retry_at).is_none_or(|t| std::time::Instant::now() >= t);
    if due && !e.checkpointing.swap(true, Ordering::SeqCst) {
        let in_flight = CheckpointInFlight {
            e: e.clone(),
            commits: e.commits_since_checkpoint.swap(0, Ordering::Relaxed),
            bytes: e.bytes_since_checkpoint.swap(0, Ordering::Relaxed),
            done: false,
        };
        start_checkpoint(in_flight, index).await;
    }
}

/// Whether a checkpoint is due after `commits` commits and `bytes` bytes of log payload since the
/// last one, which was `last` bytes long (see [`Config::checkpoint_ratio`]).
fn checkpoint_due(cfg: &Config, commits: u64, bytes: u64, last: u64) -> bool {
    let triggered = commits >= cfg.checkpoint_every || bytes >= cfg.checkpoint_bytes;
    triggered && bytes as f64 >= cfg.checkpoint_ratio * last as f64
}

/// Captures the store as of log index `index` (the committer has applied exactly up to it and
/// is waiting for us) and uploads it in the background.
/// How long after a failed checkpoint the next may start.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(5);

/// A checkpoint under way. Dropped, it clears `checkpointing` whatever happened (an error, a
/// panic, the task cancelled); unless the checkpoint made it into the log, it also gives back
/// the commits and bytes it was meant to cover, so a failed upload does not defer the next
/// checkpoint by a whole ratio's worth of log (the next try waits [`CHECKPOINT_RETRY`]).
struct CheckpointInFlight {
    e: Arc<Engine>,
    commits: u64,
    bytes: u64,
    done: bool,
}

impl Drop for CheckpointInFlight {
    fn drop(&mut self) {
        if !self.done {
            self.e
                .commits_since_checkpoint
                .fetch_add(self.commits, Ordering::Relaxed);
            self.e
                .bytes_since_checkpoint
                .fetch_add(self.bytes, Ordering::Relaxed);
            *lock(&self.e.checkpoint_retry_at) = Some(std::time::Instant::now() + CHECKPOINT_RETRY);
        }
        self.e.checkpointing.store(false, Ordering::SeqCst);
    }
}

async fn start_checkpoint(mut in_flight: CheckpointInFlight, index: u64) {
    let e = in_flight.e.clone();
    let started = std::time::Instant::now();
    // Sized up front: growing a vector of a million entries copies it over and over.
    let live = e.store.read().unwrap_or_else(|p| p.into_inner()).stats().0;
    let mut entries: Vec<(Bytes, u64, Bytes)> = Vec::with_capacity(live);
    let mut after = None;
    loop {
        let next = e
            .store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .copy_latest(after.as_ref(), CKPT_COPY_KEYS, &mut entries);
        let Some(key) = next else { break };
        after = Some(key);
        // Let readers in between pieces (the whole copy takes ~100 ms at a million keys).
        tokio::task::yield_now().await;
    }
    let max_ts = entries.iter().map(|(_, ts, _)| *ts).max().unwrap_or(0);
    // The committer is the one calling and applies nothing until the copy is done, so the
    // pieces add up to exactly the state at `index`. The copy is the only part of a checkpoint
    // that holds up commits; reads go on between its pieces.
    let copied = started.elapsed();
    let keys = entries.len();
    tokio::spawn(async move {
        let data = CheckpointData {
            index,
            max_ts,
            epoch: e.epoch.load(Ordering::SeqCst),
            entries,
        };
        // Encoding a large checkpoint takes a CPU for a while: keep it off the runtime's
        // threads, which serve clients and the committer meanwhile. The copy is freed there too.
        let encoded = tokio::task::spawn_blocking(move || postcard::to_stdvec(&data)).await;
        let result = match encoded {
            Ok(Ok(bytes)) => upload_checkpoint(&e.cfg.log, index, &bytes).await,
            Ok(Err(err)) => Err(err.to_string()),
            Err(err) => Err(format!("encoding task: {err}")),
        };
        match result {
            Ok(len) => {
                in_flight.done = true;
                e.last_checkpoint_bytes.store(len as u64, Ordering::Relaxed);
                tracing::info!(
                    "checkpoint at log index {index}: {keys} keys, {len} bytes, {:.2} s ({:.1} ms copying)",
                    started.elapsed().as_secs_f64(),
                    copied.as_secs_f64() * 1e3
                )
            }
            Err(err) => tracing::warn!("checkpoint at {index} failed: {err}"),
        }
        drop(in_flight);
    });
}

async fn upload_checkpoint(addrs: &[String], index: u64, data: &[u8]) -> Result<usize, String> {
    let mut log = LogClient::new(addrs.to_vec());
    let id = index;
    // The first chunk goes through `call_leader`, which finds the leader; the rest are
    // pipelined to it, CKPT_WINDOW at a time: the leader proposes them in the order sent, which
    // is the order staging needs. Any failure (a leader change, say) abandons this checkpoint;
    // the next one starts over.
    let mut chunks = data.chunks(CKPT_CHUNK).enumerate();
    let put = |n: usize, chunk: &[u8]| {
        LogRequest::CkptPut {
            id,
            offset: (n * CKPT_CHUNK) as u64,
            data: Bytes::copy_from_slice(chunk),
        }
        .encode()
    };
    if let Some((n, chunk)) = chunks.next() {
        match log.call_leader(&put(n, chunk)).await {
            Ok(Response::Ok(_)) => {}
            Ok(r) => return Err(format!("CKPT_PUT: {r:?}")),
            Err(err) => return Err(err.to_string()),
        }
    }
    let (addr, mut conn) = connect_alongside(&log).await?;
    loop {
        let mut sent = 0;
        for (n, chunk) in chunks.by_ref().take(CKPT_WINDOW) {
            conn.send(&put(n, chunk));
            sent += 1;
        }
        if sent == 0 {
            break;
        }
        conn.flush().await.map_err(|e| format!("{addr}: {e}"))?;
        for _ in 0..sent {
            match conn.recv().await.map_err(|e| format!("{addr}: {e}"))? {
                Response::Ok(_) => {}
                r => return Err(format!("CKPT_PUT: {r:?}")),
            }
        }
    }
    let req = LogRequest::CkptCommit {
        id,
        index,
        len: data.len() as u64,
        crc: crc32c::crc32c(data),
    };
    match conn.call(&req.encode()).await {
        Ok(Response::Ok(_)) => Ok(data.len()),
        Ok(r) => Err(format!("CKPT_COMMIT: {r:?}")),
        Err(err) => Err(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ratio: f64) -> Config {
        Config {
            sequencer: String::new(),
            log: Vec::new(),
            checkpoint_every: 100,
            checkpoint_bytes: 1_000_000,
            checkpoint_ratio: ratio,
            follow_log: false,
            commit_timeout: Duration::from_secs(10),
            log_pipeline: DEFAULT_LOG_PIPELINE,
        }
    }

    fn commit_req(
        ts: u64,
        writes: Vec<(Bytes, Option<Bytes>)>,
        deadline: tokio::time::Instant,
    ) -> (CommitReq, oneshot::Receiver<Result<(), EngineError>>) {
        CommitReq::new(
            Record::Commit {
                ts,
                epoch: ts,
                writes,
            },
            deadline,
        )
    }

    fn outbox() -> Outbox {
        Outbox {
            leader: Leader {
                replicas: Replicas::new(Vec::new()),
                conn: None,
            },
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            unsettled: Vec::new(),
            client: Bytes::from(format!("kv-{}", u64::MAX)),
            seq: 0,
        }
    }

    #[test]
    fn the_worst_case_transaction_fits_one_append_under_the_logs_default_line_limit() {
        // 1 MiB of writes (--max-txn-bytes' default), every byte one that is quoted as \xHH,
        // with a key of the largest size, and the longest timestamps, client and seq.
        let max_txn_bytes = 1 << 20;
        let key = Bytes::from(vec![0xffu8; protocol::cmd::MAX_KEY_LEN]);
        let value = Bytes::from(vec![0xffu8; max_txn_bytes - key.len()]);
        let (req, _rx) = commit_req(
            u64::MAX,
            vec![(key, Some(value))],
            tokio::time::Instant::now(),
        );
        let mut queue = VecDeque::from([req]);
        let built = build_batch(&mut queue, &outbox().client, u64::MAX);
        assert_eq!(built.reqs.len(), 1);
        // This is the line the committer sends, byte for byte.
        let parsed = LogRequest::parse(&built.line);
        assert!(matches!(parsed, Ok(Some(LogRequest::Append { .. }))));
        assert!(
            built.line.len() < protocol::log::LOG_MAX_LINE,
            "APPEND line of {} bytes is over the log's default --max-line {}",
            built.line.len(),
            protocol::log::LOG_MAX_LINE
        );
        // About 5x the raw bytes (\xff in the record, \\xff in the APPEND line).
        assert!(built.line.len() > 5 * max_txn_bytes);
    }

    #[test]
    fn commits_share_an_entry_only_up_to_the_batch_limit_counted_as_encoded() {
        let now = tokio::time::Instant::now();
        let mut queue = VecDeque::new();
        let mut keep = Vec::new();
        // Small commits whose raw size is far below BATCH_BYTES but whose quoted size is not.
        for ts in 1..=40u64 {
            let v = Bytes::from(vec![0x01u8; 8 * 1024]);
            let (r, rx) = commit_req(ts, vec![(Bytes::from_static(b"k"), Some(v))], now);
            queue.push_back(r);
            keep.push(rx);
        }
        let big = Bytes::from(vec![b'"'; BATCH_BYTES]);
        let (r, rx) = commit_req(41, vec![(Bytes::from_static(b"big"), Some(big))], now);
        queue.push_back(r);
        keep.push(rx);
        let client = outbox().client;
        let mut seq = 0;
        let mut batches = Vec::new();
        while !queue.is_empty() {
            seq += 1;
            batches.push(build_batch(&mut queue, &client, seq));
        }
        let sizes: Vec<usize> = batches.iter().map(|b| b.reqs.len()).collect();
        // 40 x 8 KiB raw is 320 KiB, but 8 KiB of \x01 is 40 KiB in the APPEND line.
        assert!(sizes.len() >= 3, "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 41);
        for b in &batches[..batches.len() - 1] {
            assert!(b.line.len() <= BATCH_BYTES, "{}", b.line.len());
            assert!(b.full);
        }
        // The large one goes alone, and last, in order.
        let last = batches.last().map(|b| (b.reqs.len(), b.reqs[0].ts()));
        assert_eq!(last, Some((1, Some(41))));
        let order: Vec<u64> = batches
            .iter()
            .flat_map(|b| b.reqs.iter().filter_map(CommitReq::ts))
            .collect();
        assert_eq!(order, (1..=41).collect::<Vec<_>>());
    }

    #[test]
    fn a_timed_out_commit_is_answered_once_and_never_acknowledged_later() {
        let t0 = tokio::time::Instant::now();
        let timeout = Duration::from_secs(10);
        let mut out = outbox();
        let (sent, mut sent_rx) = commit_req(1, vec![(Bytes::from_static(b"a"), None)], t0);
        let (queued, mut queued_rx) = commit_req(
            2,
            vec![(Bytes::from_static(b"b"), None)],
            t0 + Duration::from_secs(1),
        );
        let (fresh, mut fresh_rx) = commit_req(
            3,
            vec![(Bytes::from_static(b"c"), None)],
            t0 + Duration::from_secs(30),
        );
        out.push(sent);
        let built = build_batch(&mut out.queue, &out.client, 1);
        out.inflight.push_back(Batch {
            line: built.line,
            tss: vec![1],
            reqs: built.reqs,
            bytes: built.bytes,
            answered: 0,
        });
        out.push(queued);
        out.push(fresh);

        let (next, dropped) = expire(&mut out, t0 + Duration::from_secs(2), timeout);
        assert_eq!(next, Some(t0 + Duration::from_secs(30)));
        // The queued one never reached the log: dropped, and said so.
        assert_eq!(dropped, vec![2]);
        assert_eq!(out.queue.len(), 1);
        let msg = |r: Result<Result<(), EngineError>, _>| match r {
            Ok(Err(EngineError::Unavailable(m))) => m,
            other => panic!("{other:?}"),
        };
        assert!(msg(queued_rx.try_recv()).starts_with("commit not made"));
        // The sent one: outcome unknown, and its entry stays in flight to be settled.
        assert!(msg(sent_rx.try_recv()).starts_with("commit outcome unknown"));
        assert_eq!(out.inflight.len(), 1);
        assert!(fresh_rx.try_recv().is_err());

        // The entry lands after all: answering it again sends nothing.
        if let Some(b) = out.inflight.pop_front() {
            for mut r in b.reqs {
                r.answer(Ok(()));
            }
        }
        assert!(sent_rx.try_recv().is_err());
    }

    #[test]
    fn a_checkpoint_is_due_on_either_trigger() {
        let c = cfg(0.5);
        assert!(!checkpoint_due(&c, 99, 999_999, 0));
        assert!(checkpoint_due(&c, 100, 10, 0));
        assert!(checkpoint_due(&c, 1, 1_000_000, 0));
    }

    #[test]
    fn a_large_last_checkpoint_defers_the_next_until_the_log_has_grown_enough() {
        let c = cfg(0.5);
        // 100 commits are due against a small checkpoint...
        assert!(checkpoint_due(&c, 100, 5_000, 10_000));
        // ...but not against one of 100 MB: the log must first hold half of that.
        assert!(!checkpoint_due(&c, 100_000, 999_999, 100_000_000));
        assert!(!checkpoint_due(&c, 100_000, 49_999_999, 100_000_000));
        assert!(checkpoint_due(&c, 100_000, 50_000_000, 100_000_000));
        // Ratio 0: the triggers alone.
        assert!(checkpoint_due(&cfg(0.0), 100, 1, 100_000_000));
    }
}
