//! The flusher thread: one fdatasync for every append queued meanwhile (group commit), and the
//! counts of appends made and flushed that the DKSP batcher paces itself by.
//!
//! Invariant: an append's callback fires only after every file it wrote is fdatasynced, and
//! callbacks fire in append order.

use openraft::storage::LogFlushed;
use std::fs::File;
use std::io;
use std::sync::{mpsc, Arc};

use crate::types::TypeConfig;
use protocol::hops::{self, Hop};

/// Counts of `append` calls and of those flushed, for the DKSP batcher: openraft 0.9's core
/// waits for each append's fdatasync before it takes the next, so an entry proposed while one
/// is being flushed gains nothing by going early; waiting lets it gather more (see
/// `server::batcher::run_batcher`). A performance hint only: nothing depends on it for correctness.
#[derive(Default)]
pub struct FlushGate {
    pub(super) appends: std::sync::atomic::AtomicU64,
    pub(super) flushed: std::sync::atomic::AtomicU64,
    pub(super) notify: tokio::sync::Notify,
}

impl FlushGate {
    /// Appends flushed so far.
    pub(super) fn flushed(&self) -> u64 {
        self.flushed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `append` calls so far.
    pub fn appends(&self) -> u64 {
        self.appends.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until an append after the `appends()` value `seen` was made and everything
    /// appended is flushed, or `limit` passes (the proposal may never be appended: refused,
    /// or this replica stopped leading).
    pub async fn settled_after(&self, seen: u64, limit: std::time::Duration) {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            let a = self.appends();
            if a > seen && self.flushed.load(std::sync::atomic::Ordering::SeqCst) >= a {
                return;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return;
            }
        }
    }
}

/// Files written by one `append`, and openraft's callback to fire once they are on disk.
pub(super) struct FlushReq {
    pub(super) files: Vec<Arc<File>>,
    pub(super) callback: LogFlushed<TypeConfig>,
    /// The Raft indices written, for `--trace-hops` (`None` if the append was empty).
    pub(super) indices: Option<(u64, u64)>,
}

/// The flusher thread: fdatasyncs, for everything queued at once, each distinct file once, then
/// reports each append flushed, in order. It ends when the last `LogStore` clone is dropped.
pub(super) fn run_flusher(rx: mpsc::Receiver<FlushReq>, gate: Arc<FlushGate>) {
    while let Ok(first) = rx.recv() {
        let mut reqs = vec![first];
        reqs.extend(rx.try_iter());
        let mut files: Vec<&Arc<File>> = Vec::new();
        for f in reqs.iter().flat_map(|r| &r.files) {
            if !files.iter().any(|g| Arc::ptr_eq(f, g)) {
                files.push(f);
            }
        }
        let result = files.iter().try_for_each(|f| f.sync_data());
        if let Err(e) = &result {
            tracing::error!("fdatasync of the Raft log failed: {e}");
        }
        let n = reqs.len() as u64;
        for r in reqs {
            if let (Some((first, last)), Ok(())) = (r.indices, &result) {
                hops::mark_range(Hop::LogFlushed, first, last, 0);
            }
            let r_result = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            r.callback.log_io_completed(r_result);
        }
        gate.flushed
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        gate.notify.notify_waiters();
    }
}
