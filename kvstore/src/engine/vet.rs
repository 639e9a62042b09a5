//! Defence in depth against log records no kvstore of this cluster wrote.
//!
//! The logserver refuses what it can (payloads that are not records, checkpoints that do not
//! decode), but a well-formed record can still carry a timestamp no kvstore was given: a forged
//! `COMMIT` with a far-future timestamp would make its key unwritable (every later commit
//! conflicts with it), and an `EPOCH` near 2^64 would fence every kvstore for good. Every
//! timestamp and epoch a kvstore writes came from the sequencer, so each is at most the
//! sequencer's `CURRENT` (the highest it has handed out, or its reserved mark after a
//! restart). A record beyond it is forged, corrupt, or the sequencer lost its state; none of
//! these is mended by trying again, and skipping the record could lose an acknowledged commit,
//! so the kvstore stops with a message naming the log index ([`BadRecord`]).
//!
//! [`vet`] is the pure check. Its callers pass the highest timestamp they know was handed out
//! (the end of this kvstore's own block, cheap to know); only when a record fails that do they
//! ask the sequencer for `CURRENT` and check again, so a healthy replay asks at most rarely.

use crate::record::{Record, RecordError};

/// A log entry the kvstore will not apply, and where it is. Fatal: the process stops with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log index {index}: {fault}")]
pub struct BadRecord {
    /// The entry's log index.
    pub index: u64,
    /// What is wrong with it.
    pub fault: Fault,
}

/// What is wrong with a [`BadRecord`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The entry is not kvstore records.
    #[error("the entry is not kvstore records ({0}); it was not written by a kvstore")]
    Unparseable(RecordError),
    /// A timestamp or epoch of 0, which the sequencer never hands out (it starts at 1).
    #[error("{0} is 0, which the sequencer never hands out; the record is forged or corrupt")]
    Zero(&'static str),
    /// A checkpoint that states another index than the one the log committed it at.
    #[error("the checkpoint states index {stated} but the log committed it at {committed_at}")]
    IndexMismatch {
        /// The index the checkpoint's own header states.
        stated: u64,
        /// The index `CKPT_INFO` gives.
        committed_at: u64,
    },
    /// A timestamp or epoch above everything the sequencer has handed out.
    #[error(
        "{what} {value} is beyond every timestamp the sequencer has handed out (CURRENT {handed_out}): \
         either the sequencer is behind the log (it lost its state: move it past the log with \
         sequencer --reset-to, then restart), or the record is forged or corrupt (then restore the log \
         from a backup)"
    )]
    Beyond {
        /// Which field: `COMMIT timestamp`, `COMMIT epoch` or `EPOCH`.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The sequencer's `CURRENT` it was checked against.
        handed_out: u64,
    },
}

/// Checks the records of log entry `index` against `handed_out`, the highest timestamp the
/// sequencer is known to have handed out: every `COMMIT` timestamp and epoch and every `EPOCH`
/// must be in `1..=handed_out`. The first offending field is reported.
pub fn vet(index: u64, records: &[Record], handed_out: u64) -> Result<(), BadRecord> {
    let check = |what: &'static str, value: u64| -> Result<(), BadRecord> {
        let fault = if value == 0 {
            Fault::Zero(what)
        } else if value > handed_out {
            Fault::Beyond {
                what,
                value,
                handed_out,
            }
        } else {
            return Ok(());
        };
        Err(BadRecord { index, fault })
    };
    for r in records {
        match r {
            Record::Epoch(e) => check("EPOCH", *e)?,
            Record::Commit { ts, epoch, .. } => {
                check("COMMIT timestamp", *ts)?;
                check("COMMIT epoch", *epoch)?;
            }
        }
    }
    Ok(())
}

/// Checks a checkpoint loaded from the log (its header as [`protocol::kvlog::check_checkpoint`]
/// read it) against what `CKPT_INFO` said and what the sequencer handed out: it must state the
/// index it was committed at, and its newest timestamp and its epoch must be at most
/// `handed_out` (a checkpoint holds only what commits wrote).
pub fn vet_checkpoint(
    committed_at: u64,
    header: &protocol::kvlog::CheckpointHeader,
    handed_out: u64,
) -> Result<(), Fault> {
    if header.index != committed_at {
        return Err(Fault::IndexMismatch {
            stated: header.index,
            committed_at,
        });
    }
    for (what, value) in [
        ("checkpoint's newest timestamp", header.max_ts),
        ("checkpoint's epoch", header.epoch),
    ] {
        if value > handed_out {
            return Err(Fault::Beyond {
                what,
                value,
                handed_out,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn commit(ts: u64, epoch: u64) -> Record {
        Record::Commit {
            ts,
            epoch,
            writes: vec![(Bytes::from("k"), Some(Bytes::from("v")))],
        }
    }

    #[test]
    fn records_within_what_the_sequencer_handed_out_pass() {
        let records = [Record::Epoch(10), commit(11, 10), commit(100, 10)];
        assert_eq!(vet(7, &records, 100), Ok(()));
        assert_eq!(vet(7, &[], 0), Ok(()));
    }

    #[test]
    fn a_commit_timestamp_beyond_current_is_reported_with_its_index() {
        let err = vet(42, &[Record::Epoch(10), commit(101, 10)], 100).unwrap_err();
        assert_eq!(
            err,
            BadRecord {
                index: 42,
                fault: Fault::Beyond {
                    what: "COMMIT timestamp",
                    value: 101,
                    handed_out: 100
                }
            }
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("log index 42: COMMIT timestamp 101 is beyond"),
            "{msg}"
        );
        assert!(
            msg.contains("--reset-to") && msg.contains("forged"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn an_epoch_beyond_current_is_reported_as_the_issue_forged_it() {
        let err = vet(3, &[Record::Epoch(u64::MAX)], 5_000_000).unwrap_err();
        assert!(matches!(err.fault, Fault::Beyond { what: "EPOCH", .. }));
        let err = vet(3, &[commit(50, 60)], 55).unwrap_err();
        assert!(matches!(
            err.fault,
            Fault::Beyond {
                what: "COMMIT epoch",
                value: 60,
                ..
            }
        ));
    }

    #[test]
    fn a_zero_timestamp_or_epoch_is_never_handed_out() {
        let err = vet(9, &[commit(0, 1)], 100).unwrap_err();
        assert_eq!(err.fault, Fault::Zero("COMMIT timestamp"));
        let err = vet(9, &[Record::Epoch(0)], 100).unwrap_err();
        assert_eq!(err.fault, Fault::Zero("EPOCH"));
    }

    #[test]
    fn a_checkpoint_must_state_its_index_and_hold_only_handed_out_timestamps() {
        let h = protocol::kvlog::CheckpointHeader {
            index: 10,
            max_ts: 500,
            epoch: 400,
            keys: 3,
        };
        assert_eq!(vet_checkpoint(10, &h, 500), Ok(()));
        assert_eq!(
            vet_checkpoint(11, &h, 500),
            Err(Fault::IndexMismatch {
                stated: 10,
                committed_at: 11
            })
        );
        assert!(matches!(
            vet_checkpoint(10, &h, 499),
            Err(Fault::Beyond { value: 500, .. })
        ));
        let h = protocol::kvlog::CheckpointHeader { epoch: 600, ..h };
        assert!(matches!(
            vet_checkpoint(10, &h, 550),
            Err(Fault::Beyond { value: 600, .. })
        ));
    }
}
