//! The commit path's decisions, as pure functions of what the committer knows, so that every
//! branch can be driven from a script (`kvstore/tests/scripts/decide.txt`) without processes.
//!
//! Log indices are dense and this kvstore is the only writer while it lives, so an append
//! should come back at `expected`, the index after the last one applied. Any other index means
//! something happened that only a crash, a failover or a second kvstore produces:
//! - *above* `expected`: someone else appended in between. Nothing of this entry is
//!   acknowledged until that gap is read: a newer `EPOCH` in it means this entry landed after a
//!   takeover, and every replay will skip it ([`Step::ReadGap`], then [`after_gap`]);
//! - *below* `expected`: a resent entry the log had already taken, and that the gap check of a
//!   later entry read back as someone else's; applying it twice would duplicate versions
//!   ([`Step::Skip`]; its commits are durable, so they are acknowledged).
//!
//! Once a newer epoch has been seen (in a gap, or by the log follower), nothing more is
//! acknowledged ([`Step::Fence`]).

use crate::lifecycle::UNKNOWN_EPOCH;

/// What the committer does with an entry the log says it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Apply it at the returned index and acknowledge its commits.
    Apply,
    /// Someone else appended `from..=to` first: read and apply those, then decide again with
    /// [`after_gap`].
    ReadGap {
        /// The first index of the gap (the expected one).
        from: u64,
        /// The last index of the gap (the one before the returned index).
        to: u64,
    },
    /// A newer kvstore (of this epoch, [`UNKNOWN_EPOCH`] if the log no longer says) took
    /// over: answer `ERR FENCED`, which leaves a commit's outcome open, and acknowledge nothing
    /// more.
    Fence(u64),
    /// Already applied as someone else's entry: apply nothing, acknowledge its commits.
    Skip,
}

/// What the committer knows when an append comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Returned {
    /// The index after the last one applied.
    pub expected: u64,
    /// The index the log gave the entry.
    pub returned: u64,
    /// This kvstore's epoch.
    pub epoch: u64,
    /// The newest epoch seen in the log so far.
    pub seen_epoch: u64,
    /// The epoch the log follower fenced this kvstore by, if it did.
    pub fenced_by: Option<u64>,
}

/// The step for an entry that came back (see the module header).
pub fn decide(r: Returned) -> Step {
    let mut seen = r.seen_epoch;
    if r.returned > r.expected {
        if let Some(by) = r.fenced_by {
            // The follower already saw the takeover. The gap may or may not hold it (this
            // entry may have landed just before the newer EPOCH), so the outcome is unknown:
            // fence without reading the gap. With no gap the entry is certainly before the
            // takeover and is acknowledged.
            seen = seen.max(by);
        }
        if seen <= r.epoch {
            return Step::ReadGap {
                from: r.expected,
                to: r.returned - 1,
            };
        }
    }
    if seen > r.epoch {
        return Step::Fence(seen);
    }
    if r.returned < r.expected {
        return Step::Skip;
    }
    Step::Apply
}

/// How reading a gap ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapEnd {
    /// Read and applied in full; the newest epoch in the log is now this.
    Read(u64),
    /// Compacted by another writer's checkpoint, or holding an entry that is not kvstore
    /// records: only another kvstore does either, and its epoch is not known.
    Unusable,
    /// While retrying a transient failure, the log follower fenced this kvstore by this epoch.
    FencedMeanwhile(u64),
}

/// The newest epoch seen after a gap read that started with `seen_epoch`; the committer then
/// decides again as if the entry had come back where expected (nothing left in between).
pub fn after_gap(seen_epoch: u64, end: GapEnd) -> u64 {
    match end {
        GapEnd::Read(seen) => seen.max(seen_epoch),
        GapEnd::Unusable => UNKNOWN_EPOCH,
        GapEnd::FencedMeanwhile(by) => seen_epoch.max(by),
    }
}
