//! Checkpoints: the newest version of every live key as of a log index, written to the log so
//! that it can compact what is before and a restart replays only what is after.
//!
//! The [`Checkpointer`] owns the bookkeeping: what was committed since the last checkpoint
//! (the two triggers), that one is under way, the last one's size (the ratio), and when to try
//! again after a failure. Its invariants:
//! - at most one checkpoint is under way ([`Checkpointer::due`] hands out one [`Ticket`]);
//! - a ticket dropped without `Ticket::written` (an error, a panic, the task cancelled) gives
//!   back the commits and bytes it was meant to cover, so a failed upload does not defer the
//!   next checkpoint by a whole ratio's worth of log, and the next try waits
//!   `CHECKPOINT_RETRY`;
//! - the capture sees exactly the state at its log index: the committer calls `start` with
//!   everything up to the index applied and applies nothing until the copy is done. The copy is
//!   the only part that holds up commits; reads go on between its pieces, and encoding and
//!   upload run in the background.

use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::kvlog::Checkpoint;
use protocol::log::Request as LogRequest;
use protocol::{Client, LogClient, Response};

use super::error::CheckpointError;
use super::{Config, Engine};
use crate::lifecycle::lock;

/// Checkpoint chunk size, before quoting (binary may quadruple when quoted).
pub(crate) const CKPT_CHUNK: usize = 192 * 1024;
/// Checkpoint chunks requested (or sent) at once.
pub(crate) const CKPT_WINDOW: usize = 8;
/// Keys a checkpoint copies between two chances for other tasks to run (~2 ms).
const CKPT_COPY_KEYS: usize = 16 * 1024;
/// How long after a failed checkpoint the next may start.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(5);

/// When checkpoints are due, and whether one is under way (see the module header).
pub struct Checkpointer {
    every: u64,
    max_bytes: u64,
    ratio: f64,
    commits_since: AtomicU64,
    /// Bytes of log payload since the last checkpoint (the other trigger).
    bytes_since: AtomicU64,
    running: AtomicBool,
    /// Size of the last checkpoint written or loaded, in bytes.
    last_bytes: AtomicU64,
    /// After a failed checkpoint, no new one before this (the log may be down for a while).
    retry_at: Mutex<Option<std::time::Instant>>,
}

/// The right to write one checkpoint (see [`Checkpointer::due`]).
pub struct Ticket {
    owner: Arc<Checkpointer>,
    commits: u64,
    bytes: u64,
    done: bool,
}

impl Checkpointer {
    /// A checkpointer with `cfg`'s triggers and ratio.
    pub fn new(cfg: &Config) -> Checkpointer {
        Checkpointer {
            every: cfg.checkpoint_every,
            max_bytes: cfg.checkpoint_bytes,
            ratio: cfg.checkpoint_ratio,
            commits_since: AtomicU64::new(0),
            bytes_since: AtomicU64::new(0),
            running: AtomicBool::new(false),
            last_bytes: AtomicU64::new(0),
            retry_at: Mutex::new(None),
        }
    }

    /// Counts `commits` commit records in `bytes` bytes of log payload applied.
    pub fn count(&self, commits: u64, bytes: u64) {
        self.commits_since.fetch_add(commits, Ordering::Relaxed);
        self.bytes_since.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Forgets what was counted (a recovery attempt starts over from an empty store).
    pub fn reset(&self) {
        self.commits_since.store(0, Ordering::Relaxed);
        self.bytes_since.store(0, Ordering::Relaxed);
    }

    /// A checkpoint of `len` bytes was loaded: the ratio counts against it.
    pub fn loaded(&self, len: u64) {
        self.last_bytes.store(len, Ordering::Relaxed);
    }

    /// Commits and bytes counted towards the next checkpoint.
    #[cfg(test)]
    pub(crate) fn counted(&self) -> (u64, u64) {
        (
            self.commits_since.load(Ordering::Relaxed),
            self.bytes_since.load(Ordering::Relaxed),
        )
    }

    /// Whether a checkpoint is being captured or uploaded (it holds a copy of the live data).
    pub fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Whether a checkpoint is due after `commits` commits and `bytes` bytes of log payload
    /// since the last one, which was `last` bytes long (see [`Config::checkpoint_ratio`]).
    pub fn is_due(&self, commits: u64, bytes: u64, last: u64) -> bool {
        let triggered = commits >= self.every || bytes >= self.max_bytes;
        triggered && bytes as f64 >= self.ratio * last as f64
    }

    /// A ticket to write a checkpoint now, if one is due, none is under way and the last
    /// failure is long enough ago. It takes over what was counted.
    pub fn due(self: &Arc<Self>) -> Option<Ticket> {
        let due = self.is_due(
            self.commits_since.load(Ordering::Relaxed),
            self.bytes_since.load(Ordering::Relaxed),
            self.last_bytes.load(Ordering::Relaxed),
        ) && lock(&self.retry_at).is_none_or(|t| std::time::Instant::now() >= t);
        if !due || self.running.swap(true, Ordering::SeqCst) {
            return None;
        }
        Some(Ticket {
            owner: self.clone(),
            commits: self.commits_since.swap(0, Ordering::Relaxed),
            bytes: self.bytes_since.swap(0, Ordering::Relaxed),
            done: false,
        })
    }
}

impl Ticket {
    /// The checkpoint, `len` bytes, is in the log.
    fn written(mut self, len: u64) {
        self.done = true;
        self.owner.last_bytes.store(len, Ordering::Relaxed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.owner.count(self.commits, self.bytes);
            *lock(&self.owner.retry_at) = Some(std::time::Instant::now() + CHECKPOINT_RETRY);
        }
        self.owner.running.store(false, Ordering::SeqCst);
    }
}

/// Captures the store as of log index `index` (the committer has applied exactly up to it and
/// is waiting for us) and uploads it in the background.
pub(crate) async fn start(e: &Arc<Engine>, ticket: Ticket, index: u64) {
    let e = e.clone();
    let started = std::time::Instant::now();
    // Sized up front: growing a vector of a million entries copies it over and over.
    let live = e
        .store
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .stats()
        .keys;
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
        let data = Checkpoint {
            index,
            max_ts,
            epoch: e.life.epoch(),
            entries,
        };
        // Encoding a large checkpoint takes a CPU for a while: keep it off the runtime's
        // threads, which serve clients and the committer meanwhile. The copy is freed there too.
        let encoded = tokio::task::spawn_blocking(move || data.encode()).await;
        let result = match encoded {
            Ok(Ok(bytes)) => upload_checkpoint(&e.cfg.log, &e.cfg.trust, index, &bytes).await,
            Ok(Err(err)) => Err(CheckpointError::Encode(err.to_string())),
            Err(err) => Err(CheckpointError::Encode(format!("encoding task: {err}"))),
        };
        match result {
            Ok(len) => {
                ticket.written(len as u64);
                tracing::info!(
                    "checkpoint at log index {index}: {keys} keys, {len} bytes, {:.2} s ({:.1} ms copying)",
                    started.elapsed().as_secs_f64(),
                    copied.as_secs_f64() * 1e3
                )
            }
            // Dropping the ticket gives back what it was to cover.
            Err(err) => tracing::warn!("checkpoint at {index} failed: {err}"),
        }
    });
}

/// Writes the encoded checkpoint `data` of log index `index` to the log; returns its length.
async fn upload_checkpoint(
    addrs: &[String],
    trust: &protocol::trust::Trust,
    index: u64,
    data: &[u8],
) -> Result<usize, CheckpointError> {
    let mut log = LogClient::new(addrs.to_vec()).with_trust(trust.clone());
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
            Ok(r) => return Err(CheckpointError::Refused("CKPT_PUT", format!("{r:?}"))),
            Err(err) => return Err(err.into()),
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
        conn.flush()
            .await
            .map_err(|e| CheckpointError::Replica(addr.clone(), e))?;
        for _ in 0..sent {
            match conn
                .recv()
                .await
                .map_err(|e| CheckpointError::Replica(addr.clone(), e))?
            {
                Response::Ok(_) => {}
                r => return Err(CheckpointError::Refused("CKPT_PUT", format!("{r:?}"))),
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
        Ok(r) => Err(CheckpointError::Refused("CKPT_COMMIT", format!("{r:?}"))),
        Err(err) => Err(err.into()),
    }
}

/// A second connection to the replica `log` is talking to, for pipelining on.
pub(crate) async fn connect_alongside(
    log: &LogClient,
) -> Result<(String, Client), CheckpointError> {
    let addr = log
        .connected_to()
        .ok_or(CheckpointError::NotConnected)?
        .to_string();
    let conn = Client::connect_trusted(&addr, log.trust())
        .await
        .map_err(|e| CheckpointError::Replica(addr.clone(), e))?;
    Ok((addr, conn))
}
