//! Where this kvstore is in its life as the log's writer: starting, replaying, serving, or
//! fenced by a newer kvstore; its epoch; and the log index it has applied.
//!
//! Both the engine and the log follower (`follow`) read and move it, so it lives here, apart
//! from both: neither needs the other to fence. Invariants: the mode only leaves `Fenced` by a
//! new process (a fenced kvstore never serves again), a fence only ever raises the epoch it
//! names, and the applied index only grows while serving (every entry up to it was appended by
//! this kvstore or read back by it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The epoch of the kvstore that took over, when the log no longer shows it: another writer's
/// checkpoint compacted the part of the log that held its `EPOCH`.
pub const UNKNOWN_EPOCH: u64 = u64::MAX;

/// What the kvstore is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Waiting for the sequencer and the log.
    Starting,
    /// Applying the log; `done` of `total` entries.
    Replaying {
        /// The last index applied.
        done: u64,
        /// The log's last index when replay started (or `done`, if larger).
        total: u64,
    },
    /// Answering data commands.
    Serving,
    /// Replaced by the kvstore of this epoch ([`UNKNOWN_EPOCH`] if the log no longer says).
    Fenced(u64),
}

/// The shared state; see the module header.
pub struct Lifecycle {
    mode: Mutex<Mode>,
    epoch: AtomicU64,
    applied_index: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            mode: Mutex::new(Mode::Starting),
            epoch: AtomicU64::new(0),
            applied_index: AtomicU64::new(0),
        }
    }
}

impl Lifecycle {
    /// The current mode.
    pub fn mode(&self) -> Mode {
        lock(&self.mode).clone()
    }

    pub(crate) fn set_mode(&self, m: Mode) {
        *lock(&self.mode) = m;
    }

    /// A newer kvstore (epoch `by`) has taken over the log: stop serving.
    pub fn fence(&self, by: u64) {
        let mut m = lock(&self.mode);
        match *m {
            Mode::Fenced(old) if old >= by => {}
            _ => *m = Mode::Fenced(by),
        }
    }

    /// The epoch fenced by, if fenced.
    pub fn fenced_by(&self) -> Option<u64> {
        match *lock(&self.mode) {
            Mode::Fenced(by) => Some(by),
            _ => None,
        }
    }

    /// This kvstore's epoch (0 until recovery has chosen it).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub(crate) fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// The log index applied last: every entry up to it has been read or appended by us.
    pub fn applied_index(&self) -> u64 {
        self.applied_index.load(Ordering::SeqCst)
    }

    pub(crate) fn set_applied_index(&self, index: u64) {
        self.applied_index.store(index, Ordering::SeqCst);
    }
}
