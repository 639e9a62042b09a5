//! Handing out timestamps from a durably reserved window.
//!
//! `issued` is the highest timestamp handed out and `durable` the persisted mark: every timestamp
//! handed out is `<= durable`. Handing out is a few instructions under a mutex; persisting is
//! done by a background task that raises the mark by a whole window at a time, started when half
//! the window is used, so in steady state no request waits for an fsync. A request that would
//! cross the mark (a burst, or a large `NEXT n`) waits for the persist in flight. After a crash
//! the oracle restarts at `durable + 1`, skipping at most one window of never-issued timestamps.
//!
//! The timestamp space ends at `u64::MAX`: all arithmetic on timestamps is checked, and once
//! `u64::MAX` has been handed out (or the mark is `u64::MAX`, so it may have been) every request
//! fails with [`OracleError::Exhausted`]. It never wraps to 0, which would reissue timestamps.

use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

use crate::state::{StateError, StateFile};

/// Why no timestamp could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    /// The mark could not be raised on disk (`ERR UNAVAILABLE`; a later request may succeed).
    #[error("cannot reserve timestamps: {0}")]
    Persist(String),
    /// Every timestamp up to `u64::MAX` is used up; nothing can be handed out again.
    #[error("timestamps exhausted (the last possible timestamp, 2^64-1, is reserved or issued)")]
    Exhausted,
}

struct Inner {
    /// Highest timestamp handed out (or, after a restart, possibly handed out by the previous
    /// run). Timestamps start at 1; 0 means "none". The next one is `issued + 1`, checked.
    issued: u64,
    /// Highest timestamp that may be handed out: the persisted mark.
    durable: u64,
    /// Mark the persist task should reach; above `durable` while a persist is wanted.
    target: u64,
    /// Completed persist attempts, so a waiter can tell whether the attempt it waited for failed.
    attempts: u64,
    last_error: Option<String>,
}

/// The timestamp oracle: hands out strictly increasing timestamps below the durable mark, raising
/// the mark in the background a window at a time.
pub struct Oracle {
    inner: Mutex<Inner>,
    /// Wakes requests waiting for the mark to rise.
    raised: Notify,
    /// Wakes the persist task.
    wanted: Notify,
    state: StateFile,
    window: u64,
}

impl Oracle {
    /// Loads the mark and starts the persist task (needs a tokio runtime).
    pub fn start(state: StateFile, window: u64) -> Result<Arc<Oracle>, StateError> {
        let durable = state.load()?;
        let oracle = Arc::new(Oracle {
            inner: Mutex::new(Inner {
                issued: durable,
                durable,
                target: durable,
                attempts: 0,
                last_error: None,
            }),
            raised: Notify::new(),
            wanted: Notify::new(),
            state,
            window: window.max(1),
        });
        tokio::spawn(persist_loop(oracle.clone()));
        Ok(oracle)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in a few lines of arithmetic; the
        // state stays consistent (each field is written once), so carry on.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands out `n` (>= 1) consecutive timestamps and returns the first.
    pub async fn next(&self, n: u64) -> Result<u64, OracleError> {
        let mut waited_since: Option<u64> = None;
        loop {
            let waiter = self.raised.notified();
            tokio::pin!(waiter);
            {
                let mut s = self.lock();
                // Both checked: past u64::MAX there is nothing left to hand out, ever.
                let first = s.issued.checked_add(1).ok_or(OracleError::Exhausted)?;
                let last = s
                    .issued
                    .checked_add(n.max(1))
                    .ok_or(OracleError::Exhausted)?;
                if last <= s.durable {
                    s.issued = last;
                    // Start raising the mark once half the window is used.
                    if s.durable - last < self.window / 2 {
                        self.want(&mut s, 0);
                    }
                    return Ok(first);
                }
                if let (Some(since), Some(e)) = (waited_since, &s.last_error) {
                    if s.attempts > since {
                        return Err(OracleError::Persist(e.clone()));
                    }
                }
                if waited_since.is_none() {
                    waited_since = Some(s.attempts);
                }
                self.want(&mut s, n);
                waiter.as_mut().enable();
            }
            waiter.await;
        }
    }

    /// Asks the persist task for a mark covering `extra` more timestamps plus a window.
    fn want(&self, s: &mut Inner, extra: u64) {
        // Saturating: near the end of the space the mark stops at u64::MAX, which is still a
        // valid (and the last) timestamp.
        let goal = s.issued.saturating_add(extra).saturating_add(self.window);
        if goal > s.target {
            s.target = goal;
            self.wanted.notify_one();
        }
    }

    /// The highest timestamp handed out so far (after a restart: the inherited mark, an upper
    /// bound of what the previous run may have handed out).
    pub fn current(&self) -> u64 {
        self.lock().issued
    }

    /// (current, durable mark, window) for STATUS.
    pub fn stats(&self) -> (u64, u64, u64) {
        let s = self.lock();
        (s.issued, s.durable, self.window)
    }
}

async fn persist_loop(o: Arc<Oracle>) {
    loop {
        let wanted = o.wanted.notified();
        tokio::pin!(wanted);
        wanted.as_mut().enable();
        let goal = {
            let s = o.lock();
            (s.target > s.durable).then_some(s.target)
        };
        let Some(goal) = goal else {
            wanted.await;
            continue;
        };
        let state = o.state.clone();
        let result = tokio::task::spawn_blocking(move || state.store(goal)).await;
        let mut s = o.lock();
        s.attempts = s.attempts.saturating_add(1);
        match result {
            Ok(Ok(())) => {
                s.durable = s.durable.max(goal);
                s.last_error = None;
                tracing::debug!(mark = goal, "reserved timestamps");
            }
            Ok(Err(e)) => {
                tracing::error!("persisting the timestamp mark failed: {e}");
                s.last_error = Some(e.to_string());
                // Retry when a request next asks, rather than spinning on a broken disk.
                s.target = s.durable;
            }
            Err(e) => {
                s.last_error = Some(format!("persist task failed: {e}"));
                s.target = s.durable;
            }
        }
        drop(s);
        o.raised.notify_waiters();
    }
}
