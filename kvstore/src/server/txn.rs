//! An open transaction's state in the session: its snapshot, its buffered writes and their
//! share of the server-wide budget.
//!
//! Invariant: `bytes` is the [`write_size`] sum of `writes`, never over `--max-txn-bytes`, and
//! `reservation` holds exactly that much of the budget until the transaction ends.

use bytes::Bytes;
use std::collections::BTreeMap;
use tokio::time::Instant;

use protocol::ErrorCode;

use crate::limits::{Limits, Reservation};

pub(super) struct Txn {
    pub(super) start_ts: u64,
    /// When the snapshot was taken, for `--max-snapshot-age-secs`.
    pub(super) began: Instant,
    pub(super) writes: BTreeMap<Bytes, Option<Bytes>>,
    /// Key + value bytes of `writes` (a delete counts its key).
    pub(super) bytes: usize,
    /// This transaction's share of the server-wide budget, `bytes` large.
    pub(super) reservation: Reservation,
}

impl Txn {
    /// A transaction on snapshot `start_ts`, holding `reservation` (empty) of the budget.
    pub(super) fn new(start_ts: u64, reservation: Reservation) -> Txn {
        Txn {
            start_ts,
            began: Instant::now(),
            writes: BTreeMap::new(),
            bytes: 0,
            reservation,
        }
    }

    /// When its snapshot becomes too old (`None`: a limit past the clock's range).
    pub(super) fn old_at(&self, limits: &Limits) -> Option<Instant> {
        self.began.checked_add(limits.max_snapshot_age)
    }

    pub(super) fn too_old(&self, limits: &Limits) -> bool {
        self.old_at(limits).is_some_and(|at| Instant::now() >= at)
    }

    /// Buffers a write, within `--max-txn-bytes` and the server-wide budget; a write past
    /// either is refused and the caller aborts the transaction.
    pub(super) fn buffer(
        &mut self,
        limits: &Limits,
        key: Bytes,
        value: Option<Bytes>,
    ) -> Result<(), WriteRefused> {
        let old = self
            .writes
            .get(&key)
            .map_or(0, |v| write_size(&key, v.as_ref()));
        let total = self
            .bytes
            .saturating_sub(old)
            .saturating_add(write_size(&key, value.as_ref()));
        let max = limits.max_txn_bytes;
        if total > max {
            return Err(WriteRefused {
                code: ErrorCode::TooLarge,
                reason: "TOO_LARGE",
                why: format!(
                    "its writes would total {total} bytes (keys + values), over the limit of {max} bytes (--max-txn-bytes)"
                ),
                then: "",
            });
        }
        if !self.reservation.resize(total) {
            return Err(WriteRefused {
                code: ErrorCode::Unavailable,
                reason: "UNAVAILABLE",
                why: format!(
                    "the server's budget for buffered transaction writes ({} bytes, --max-buffered-mib) is used up",
                    limits.budget.limit()
                ),
                then: " and retry later",
            });
        }
        self.writes.insert(key, value);
        self.bytes = total;
        Ok(())
    }
}

/// A transaction's write refused: the error the client gets, and the abort it causes.
pub(super) struct WriteRefused {
    pub(super) code: ErrorCode,
    /// The reason word a later `COMMIT` answers.
    pub(super) reason: &'static str,
    pub(super) why: String,
    /// What the client should do besides ending the transaction.
    pub(super) then: &'static str,
}

/// Bytes a write counts against `--max-txn-bytes`: its key plus its value plus
/// [`crate::limits::WRITE_OVERHEAD`], so that many tiny writes cannot make a log entry that
/// quoting blows past the log's line limit.
pub(super) fn write_size(key: &[u8], value: Option<&Bytes>) -> usize {
    key.len()
        .saturating_add(value.map_or(0, Bytes::len))
        .saturating_add(crate::limits::WRITE_OVERHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Budget, WRITE_OVERHEAD};
    use std::time::Duration;

    fn limits(max_txn_bytes: usize, budget: usize) -> Limits {
        Limits {
            idle_timeout: Duration::from_secs(60),
            max_snapshot_age: Duration::from_secs(60),
            max_txn_bytes,
            budget: Budget::new(budget),
        }
    }

    fn put(t: &mut Txn, l: &Limits, k: &'static str, v: &'static str) -> Result<(), WriteRefused> {
        t.buffer(
            l,
            Bytes::from_static(k.as_bytes()),
            Some(Bytes::from_static(v.as_bytes())),
        )
    }

    #[test]
    fn a_rewritten_key_counts_once_and_the_reservation_follows_the_total() {
        let l = limits(1000, 1000);
        let mut t = Txn::new(5, l.budget.reserve());
        assert!(put(&mut t, &l, "k", "aaaa").is_ok(), "fits");
        assert!(put(&mut t, &l, "k", "bb").is_ok(), "fits");
        assert_eq!(t.bytes, 1 + 2 + WRITE_OVERHEAD);
        assert_eq!(t.reservation.bytes(), t.bytes);
        assert_eq!(l.budget.used(), t.bytes);
        assert!(t.buffer(&l, Bytes::from_static(b"d"), None).is_ok(), "fits");
        assert_eq!(t.bytes, 1 + 2 + 1 + 2 * WRITE_OVERHEAD);
    }

    #[test]
    fn a_write_past_max_txn_bytes_is_refused_as_too_large_and_not_buffered() {
        let l = limits(WRITE_OVERHEAD + 4, 1000);
        let mut t = Txn::new(5, l.budget.reserve());
        assert!(put(&mut t, &l, "k", "abc").is_ok(), "fits");
        let Err(r) = put(&mut t, &l, "j", "abc") else {
            panic!("a write past the limit was buffered");
        };
        assert_eq!((r.code, r.reason), (ErrorCode::TooLarge, "TOO_LARGE"));
        assert!(r.why.contains("--max-txn-bytes"), "{}", r.why);
        assert_eq!(t.writes.len(), 1);
        assert_eq!(l.budget.used(), t.bytes);
    }

    #[test]
    fn a_write_past_the_server_budget_is_refused_as_unavailable() {
        let l = limits(1000, WRITE_OVERHEAD + 4);
        let mut t = Txn::new(5, l.budget.reserve());
        let Err(r) = put(&mut t, &l, "k", "abcdef") else {
            panic!("a write past the budget was buffered");
        };
        assert_eq!((r.code, r.reason), (ErrorCode::Unavailable, "UNAVAILABLE"));
        assert!(r.why.contains("--max-buffered-mib"), "{}", r.why);
        assert!(t.writes.is_empty());
        assert_eq!(l.budget.used(), 0);
    }
}
