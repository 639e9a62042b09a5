//! What one session, and all of them together, may hold: the limits on a transaction's
//! buffered writes and on snapshot age, and the server-wide budget for buffered writes.
//!
//! Invariants:
//! - A transaction's buffered writes never exceed `max_txn_bytes`, counted as the sum over its
//!   write set of key length + value length + [`WRITE_OVERHEAD`] (a `DEL` counts its key; a key
//!   written twice counts once, at its last value). The committer relies on it: with [`DEFAULT_MAX_TXN_BYTES`] and
//!   the line limit, any accepted transaction fits in one log entry, quoting included.
//! - The bytes reserved in the [`Budget`] are exactly the sum of the live [`Reservation`]s:
//!   a reservation gives its bytes back when dropped, however its transaction ended.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Default `--max-txn-bytes`: 1 MiB of keys and values per transaction (shared decision of
/// issue #18: the worst-case log record is about 4x this, quoted, and its `APPEND` line 5x).
pub const DEFAULT_MAX_TXN_BYTES: usize = 1 << 20;

/// What each write counts against `--max-txn-bytes` besides its key and value. In the `APPEND`
/// line a write costs at most 5 × (key + value) plus about 14 bytes of ` PUT `, quotes and
/// separators (each quoted twice); counting 16 more per write keeps the whole line within
/// 5 × the limit plus the entry's header, even for a transaction of many empty writes
/// (349,525 three-byte binary keys would otherwise make a 9.4 MiB line from 1 MiB).
pub const WRITE_OVERHEAD: usize = 16;

/// Default `--max-buffered-mib`: all sessions' open transactions together buffer at most this.
pub const DEFAULT_MAX_BUFFERED_MIB: usize = 256;

/// Default `--max-snapshot-age-secs`: a snapshot older than this is aborted (`TOO_OLD`), so the
/// garbage collection watermark cannot be held back for longer.
pub const DEFAULT_MAX_SNAPSHOT_AGE_SECS: u64 = 300;

/// The per-session policy, shared by every connection.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A transaction idle (no command) for longer is aborted (`TIMEOUT`).
    pub idle_timeout: Duration,
    /// A snapshot older than this is aborted (`TOO_OLD`), active or not.
    pub max_snapshot_age: Duration,
    /// The largest write set of one transaction, in key + value bytes.
    pub max_txn_bytes: usize,
    /// Buffered transaction writes (and autocommit writes waiting for the log) of all sessions.
    pub budget: Arc<Budget>,
}

/// Bytes that all sessions may buffer together: open transactions' writes and pipelined
/// autocommit writes not yet answered.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes (`--max-buffered-mib`), shared by all sessions.
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes reserved now (STATUS `buffered_bytes`).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The budget in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// An empty reservation, to grow as a transaction buffers writes.
    pub fn reserve(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        // Never below zero: a reservation only gives back what it took.
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
    }
}

/// One transaction's share of the [`Budget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Reservation {
    /// Resizes the reservation to `bytes`. Growing fails, and changes nothing, if the budget
    /// has no room.
    pub fn resize(&mut self, bytes: usize) -> bool {
        if bytes > self.bytes {
            if !self.budget.try_take(bytes - self.bytes) {
                return false;
            }
        } else {
            self.budget.give_back(self.bytes - bytes);
        }
        self.bytes = bytes;
        true
    }

    /// Bytes this reservation holds now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
        // 1,000 aborted transactions of 100 KB each left 340 MiB resident until this was told.
        protocol::connection::note_freed(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_budget_and_give_it_back_when_dropped() {
        let b = Budget::new(100);
        let mut one = b.reserve();
        let mut two = b.reserve();
        assert!(one.resize(60));
        assert!(!two.resize(41), "60 + 41 is over 100");
        assert_eq!(two.bytes(), 0, "a refused resize changes nothing");
        assert!(two.resize(40));
        assert_eq!(b.used(), 100);
        assert!(one.resize(10), "shrinking always succeeds");
        assert_eq!(b.used(), 50);
        drop(one);
        assert_eq!(b.used(), 40);
        drop(two);
        assert_eq!(b.used(), 0);
    }
}
