//! Timestamps and the in-flight registry.
//!
//! All timestamps come from the sequencer, in blocks (`NEXT n`) that this process hands out in
//! order under one mutex. Taking a commit timestamp and registering the commit as *in flight*
//! happen in the same critical section (`Engine::with_ts`), so there is no moment when a
//! timestamp is taken but invisible. Invariants of [`Registry`]:
//! - every timestamp handed out is below `next`, and `next` only grows;
//! - a commit is in flight from its timestamp until it is applied or known never to be, and
//!   while it is, a snapshot above it that reads one of its keys waits ([`Registry::blocks`]);
//! - the GC watermark is the oldest open snapshot, or `next` when there is none: no version a
//!   reader can still ask for is below it.

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use protocol::Client;

use super::{Engine, EngineError};
use crate::lifecycle::lock;

/// Timestamps fetched from the sequencer at once.
pub(crate) const TS_BLOCK: u64 = 10_000;

/// The local timestamp block, the commits in flight and the open snapshots.
#[derive(Debug, Default)]
pub struct Registry {
    /// Local block of timestamps `[next, end)`.
    pub(crate) next: u64,
    pub(crate) end: u64,
    /// Commits with a timestamp, not yet applied: ts -> keys.
    inflight: BTreeMap<u64, Vec<Bytes>>,
    /// Key -> timestamps of the in-flight commits writing it (several only for blind writes).
    inflight_keys: HashMap<Bytes, Vec<u64>>,
    /// Start timestamps of open transactions (with counts), for the GC watermark.
    active: BTreeMap<u64, usize>,
}

impl Registry {
    /// The next timestamp of the local block, if it has one left.
    pub fn take(&mut self) -> Option<u64> {
        if self.next < self.end {
            let ts = self.next;
            self.next += 1;
            Some(ts)
        } else {
            None
        }
    }

    /// A new block starting at `first` from the sequencer; refused if it goes backwards.
    pub fn refill(&mut self, first: u64) -> Result<(), EngineError> {
        if first <= self.next.saturating_sub(1) {
            return Err(EngineError::Unavailable(format!(
                "sequencer went backwards ({first} after {})",
                self.next
            )));
        }
        let end = first.checked_add(TS_BLOCK).ok_or_else(|| {
            EngineError::Unavailable(format!("sequencer block at {first} overflows"))
        })?;
        self.next = first;
        self.end = end;
        Ok(())
    }

    /// Drops what is left of the local block, so the next timestamp comes from the sequencer.
    pub fn discard_block(&mut self) {
        self.end = self.next;
    }

    /// Opens a snapshot at `s`.
    pub fn open_snapshot(&mut self, s: u64) {
        *self.active.entry(s).or_default() += 1;
    }

    /// Closes a snapshot opened at `s`.
    pub fn close_snapshot(&mut self, s: u64) {
        if let Some(n) = self.active.get_mut(&s) {
            *n -= 1;
            if *n == 0 {
                self.active.remove(&s);
            }
        }
    }

    /// Registers the commit `ts` writing `keys` as in flight.
    pub fn register(&mut self, ts: u64, keys: Vec<Bytes>) {
        for k in &keys {
            self.inflight_keys.entry(k.clone()).or_default().push(ts);
        }
        self.inflight.insert(ts, keys);
    }

    /// Removes commits from the in-flight set (unknown timestamps are ignored).
    pub fn resolve(&mut self, tss: &[u64]) {
        for ts in tss {
            if let Some(keys) = self.inflight.remove(ts) {
                for k in keys {
                    if let Some(tss) = self.inflight_keys.get_mut(&k) {
                        tss.retain(|c| c != ts);
                        if tss.is_empty() {
                            self.inflight_keys.remove(&k);
                        }
                    }
                }
            }
        }
    }

    /// Whether a read of `key` at snapshot `s` must wait: a commit below `s` writing it is in
    /// flight.
    pub fn blocks(&self, s: u64, key: &[u8]) -> bool {
        self.inflight_keys
            .get(key)
            .is_some_and(|tss| tss.iter().any(|&t| t < s))
    }

    /// Whether a read at `s` of the keys `touches` selects must wait.
    pub fn blocks_any(&self, s: u64, touches: impl Fn(&[u8]) -> bool) -> bool {
        self.inflight
            .range(..s)
            .any(|(_, keys)| keys.iter().any(|k| touches(k)))
    }

    /// Whether a commit newer than `start` writing `key` is in flight: a transaction on
    /// snapshot `start` that writes `key` lost the race to it.
    pub fn racing(&self, start: u64, key: &[u8]) -> bool {
        self.inflight_keys
            .get(key)
            .is_some_and(|tss| tss.iter().any(|&c| c > start))
    }

    /// Versions below this are not readable by any open snapshot (the GC watermark).
    pub fn watermark(&self) -> u64 {
        self.active.keys().next().copied().unwrap_or(self.next)
    }

    /// Open snapshots.
    pub fn open_snapshots(&self) -> usize {
        self.active.values().sum()
    }

    /// Commits in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }
}

impl Engine {
    /// Fetches a new block of timestamps if the local one is used up.
    pub(super) async fn refill(&self) -> Result<(), EngineError> {
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
                match Client::connect_trusted(&self.cfg.sequencer, &self.cfg.trust).await {
                    Ok(c) => *seq = Some(c),
                    Err(e) => last_err = e.to_string(),
                }
            }
            if let Some(c) = seq.as_mut() {
                match c.next_block(TS_BLOCK).await {
                    Ok(first) => {
                        // The whole block is handed out now: records up to its end pass
                        // `vet` without asking the sequencer.
                        let last = first.saturating_add(TS_BLOCK - 1);
                        self.handed_out
                            .fetch_max(last, std::sync::atomic::Ordering::SeqCst);
                        return lock(&self.txns).refill(first);
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
    pub(super) async fn with_ts<T>(
        &self,
        mut register: impl FnMut(&mut Registry, u64) -> T,
    ) -> Result<T, EngineError> {
        loop {
            {
                let mut t = lock(&self.txns);
                if let Some(ts) = t.take() {
                    return Ok(register(&mut t, ts));
                }
            }
            self.refill().await?;
        }
    }

    /// Waits until no in-flight commit below `s` writes a key that `touches` selects.
    pub(super) async fn wait_inflight(&self, s: u64, touches: impl Fn(&[u8]) -> bool) {
        loop {
            let resolved = self.resolved.notified();
            tokio::pin!(resolved);
            resolved.as_mut().enable();
            if !lock(&self.txns).blocks_any(s, &touches) {
                return;
            }
            resolved.await;
        }
    }

    /// Removes commits from the in-flight set and wakes waiting snapshots.
    pub(super) fn resolve(&self, tss: &[u64]) {
        lock(&self.txns).resolve(tss);
        self.resolved.notify_waiters();
    }

    pub(super) fn collect_garbage(&self) {
        let watermark = lock(&self.txns).watermark();
        let dropped = self
            .store
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .collect_garbage(watermark);
        if dropped > 0 {
            tracing::debug!(dropped, watermark, "collected old versions");
        }
    }
}
