//! Snapshot reads and first-committer-wins commits.
//!
//! **Snapshots.** `BEGIN` takes a start timestamp `s`. A read of key `k` at `s` first waits
//! until no in-flight commit below `s` writes `k` (a scan: none writes into its range). Any
//! commit that could still get a timestamp below `s` already has it and is registered, so after
//! the wait the store holds every commit below `s` that touches what is read, and reads at `s`
//! are a stable snapshot: a reader never skips a commit that has its timestamp but is not
//! applied yet. The wait, when there is one, is at most one log round trip.
//!
//! **First committer wins.** `COMMIT` checks, in the critical section that takes its
//! timestamp, each written key against the newest committed version (newer than `s` means
//! someone committed after we started) and against in-flight commits newer than `s` (someone
//! concurrent is committing it now, and was first). Either aborts with `CONFLICT <key>`.
//! Otherwise the commit gets its timestamp and is queued for the committer. A single-statement
//! `PUT`/`DEL` reads nothing, so it needs no snapshot: its start is its commit timestamp and it
//! never conflicts.

use bytes::Bytes;
use protocol::hops;

use super::batch::CommitReq;
use super::error::not_made;
use super::{Engine, EngineError};
use crate::lifecycle::lock;
use crate::record::Record;

/// A commit handed to the committer, or refused on the spot.
pub enum Submitted {
    /// A newer commit of this key won.
    Conflict(Bytes),
    /// Queued with this commit timestamp; the receiver says when it is durable.
    Queued(u64, tokio::sync::oneshot::Receiver<Result<(), EngineError>>),
}

/// A commit handed to the committer.
#[derive(Debug)]
pub struct Queued {
    /// Its commit timestamp.
    pub ts: u64,
    /// Says when it is durable (or why it is not).
    pub durable: tokio::sync::oneshot::Receiver<Result<(), EngineError>>,
}

/// How a commit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durable in the log at this timestamp.
    Committed(u64),
    /// A newer commit of this key won.
    Conflict(Bytes),
}

impl Engine {
    /// Starts a snapshot and returns its timestamp. The caller must `end_snapshot` it. Reads
    /// at the snapshot go through `get`/`scan`, which wait for the in-flight commits below it
    /// that touch what they read.
    pub async fn begin(&self) -> Result<u64, EngineError> {
        self.check_serving()?;
        self.with_ts(|t, ts| {
            t.open_snapshot(ts);
            ts
        })
        .await
    }

    /// Ends the snapshot `s` started with `begin`.
    pub fn end_snapshot(&self, s: u64) {
        lock(&self.txns).close_snapshot(s);
    }

    /// `key` as of snapshot `s`, once no commit below `s` that writes it is still in flight.
    pub async fn get(&self, key: &[u8], s: u64) -> Option<Bytes> {
        let waits = lock(&self.txns).blocks(s, key);
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

    /// One page of `(from, end)` at `s` (see [`crate::mvcc::Store::scan_page`]); call
    /// `wait_range` first. The store is locked only for the page, so a long scan lets commits
    /// and GC in between.
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

    /// Commits writes made on the snapshot `start` (first committer wins) and waits until the
    /// log has made them durable.
    pub async fn commit(
        &self,
        start: u64,
        writes: Vec<(Bytes, Option<Bytes>)>,
    ) -> Result<Outcome, EngineError> {
        match self.submit_txn(start, writes).await? {
            Submitted::Conflict(key) => Ok(Outcome::Conflict(key)),
            Submitted::Queued(ts, rx) => match rx.await {
                Ok(Ok(())) => Ok(Outcome::Committed(ts)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(EngineError::Unavailable("committer stopped".into())),
            },
        }
    }

    /// The first half of `commit`: decides conflicts against the snapshot `start`, takes the
    /// timestamp and queues the commit, without waiting for the log. Commits submitted one
    /// after another reach the log in that order, so a session can pipeline writes and still
    /// read them back in order.
    pub async fn submit_txn(
        &self,
        start: u64,
        writes: Vec<(Bytes, Option<Bytes>)>,
    ) -> Result<Submitted, EngineError> {
        self.check_serving()?;
        let keys: Vec<Bytes> = writes.iter().map(|(k, _)| k.clone()).collect();
        let decided = self
            .with_ts(|t, ts| {
                if let Some(k) = keys.iter().find(|k| t.racing(start, k)) {
                    return Err(k.clone());
                }
                let store = self.store.read().unwrap_or_else(|p| p.into_inner());
                if let Some(k) = keys
                    .iter()
                    .find(|k| store.latest_ts(k).is_some_and(|c| c > start))
                {
                    return Err(k.clone());
                }
                t.register(ts, keys.clone());
                Ok(ts)
            })
            .await?;
        // A conflict wastes one timestamp of the local block; nothing else saw it.
        match decided {
            Ok(ts) => {
                let q = self.enqueue(ts, writes).await?;
                Ok(Submitted::Queued(q.ts, q.durable))
            }
            Err(key) => Ok(Submitted::Conflict(key)),
        }
    }

    /// Queues a blind write (an autocommit `PUT`/`DEL`): it reads nothing, so its snapshot is
    /// its commit timestamp, nothing can commit in between, and it cannot conflict.
    pub async fn submit_blind(
        &self,
        writes: Vec<(Bytes, Option<Bytes>)>,
    ) -> Result<Queued, EngineError> {
        self.check_serving()?;
        let keys: Vec<Bytes> = writes.iter().map(|(k, _)| k.clone()).collect();
        let ts = self
            .with_ts(|t, ts| {
                t.register(ts, keys.clone());
                ts
            })
            .await?;
        self.enqueue(ts, writes).await
    }

    /// Hands the commit at `ts` (registered in flight) to the committer.
    async fn enqueue(
        &self,
        ts: u64,
        writes: Vec<(Bytes, Option<Bytes>)>,
    ) -> Result<Queued, EngineError> {
        // `--trace-hops`: decided here, before the committer can see the commit.
        hops::sample(ts);
        let record = Record::Commit {
            ts,
            epoch: self.life.epoch(),
            writes,
        };
        let deadline = tokio::time::Instant::now() + self.cfg.commit_timeout;
        let (req, rx) = CommitReq::new(record, deadline);
        // The committer's queue is bounded; when it is full (the log has been down for a while)
        // this waits, but not past the commit's deadline. Nothing was queued then.
        match tokio::time::timeout_at(deadline, self.committer.send(req)).await {
            Ok(Ok(())) => Ok(Queued { ts, durable: rx }),
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
}
