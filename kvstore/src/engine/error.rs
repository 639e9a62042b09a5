//! The engine's errors, one enum per boundary, each variant saying what the caller does next.
//!
//! - [`EngineError`]: what a client's command gets (the session maps it to a DKSP reply).
//! - [`RecoveryError`]: why a start attempt failed; [`RecoveryError::is_fatal`] says whether to
//!   try again (the log or the sequencer is away for a while) or to stop the process with the
//!   message (trying again would do harm or cannot help).
//! - [`GapError`]: why entries appended by someone else could not be read.
//! - [`CheckpointError`]: why a checkpoint could not be loaded or written.

use std::time::Duration;

use protocol::ClientError;

use super::vet::BadRecord;
use crate::lifecycle::UNKNOWN_EPOCH;

/// Why a data command failed; the session answers it as the DKSP error of the same name.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Not now (starting, the sequencer or the log away, a commit's outcome unknown): the
    /// message says whether to retry or read back.
    #[error("{0}")]
    Unavailable(String),
    /// Replaced by a newer kvstore: connect to that one.
    #[error("this kvstore was replaced by a newer one{}; connect to that one", epoch_note(*.0))]
    Fenced(u64),
    /// The log refused the commit's entry as over its line limit: it was not appended, so the
    /// commit did not happen (`ABORTED TOO_LARGE` at `COMMIT`, `ERR TOO_LARGE` for a `PUT`).
    #[error("{0}")]
    TooLarge(String),
}

fn epoch_note(epoch: u64) -> String {
    if epoch == UNKNOWN_EPOCH {
        String::new()
    } else {
        format!(" (epoch {epoch})")
    }
}

/// The answer to a commit whose entry was sent but is not known to be in the log by its
/// deadline: it may still land (and then it is applied, unacknowledged).
pub(crate) fn outcome_unknown(timeout: Duration) -> EngineError {
    EngineError::Unavailable(format!(
        "commit outcome unknown: the log did not make it durable within {} s (--commit-timeout-secs); it may still be applied, read it back to find out",
        timeout.as_secs()
    ))
}

/// The answer to a commit that never reached the log (it waited in the queue past its
/// deadline and was dropped): it did not happen.
pub(crate) fn not_made(timeout: Duration) -> EngineError {
    EngineError::Unavailable(format!(
        "commit not made: the log took no commit for {} s (--commit-timeout-secs); retry",
        timeout.as_secs()
    ))
}

/// Why entries appended by someone else could not be read and applied.
#[derive(Debug, thiserror::Error)]
pub enum GapError {
    /// The range was compacted by a checkpoint past our applied index: only another writer
    /// checkpoints there, so another kvstore has taken over.
    #[error("compacted by another writer's checkpoint; the log now starts at {0}")]
    Compacted(u64),
    /// An entry that is not kvstore records, or carries a timestamp the sequencer never handed
    /// out: nothing can be vouched for after it, and the process stops ([`super::vet`]).
    #[error(transparent)]
    Bad(BadRecord),
    /// The sequencer could not be asked for `CURRENT` to vet a record: try again.
    #[error("asking the sequencer for CURRENT: {0}")]
    Sequencer(String),
    /// The log's indices ran out after this one.
    #[error("log index {0} has no successor")]
    NoSuccessor(u64),
    /// The log did not answer in time, or the connection failed: try again.
    #[error(transparent)]
    Log(ClientError),
    /// The replica read from has not caught up to entry `next`, which the log has: try again
    /// (on another replica).
    #[error("replica {replica} has not caught up to {next}")]
    Lagging {
        /// The replica's address.
        replica: String,
        /// The first entry it lacks.
        next: u64,
    },
    /// A `READ` of entry `.0` was answered from another index (a reply left over from a failed
    /// call): try again on a new connection.
    #[error("READ {0} answered from another index")]
    OutOfStep(u64),
    /// An `ERR COMPACTED` without the index the log now starts at: try again.
    #[error("bad COMPACTED reply: {0}")]
    BadCompacted(protocol::ServerError),
}

impl GapError {
    /// Whether reading again may succeed; otherwise only another kvstore explains the gap.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            GapError::Compacted(_) | GapError::Bad(_) | GapError::NoSuccessor(_)
        )
    }
}

/// Why a checkpoint could not be loaded or written. Loading tries again from scratch; a failed
/// write is abandoned and the next one starts over.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The log could not be reached or did not answer.
    #[error(transparent)]
    Log(#[from] ClientError),
    /// The log client has no replica to open a second connection to.
    #[error("no logserver connection")]
    NotConnected,
    /// A connection to replica `.0` failed.
    #[error("{0}: {1}")]
    Replica(String, ClientError),
    /// The log answered a checkpoint request with something else.
    #[error("{0}: unexpected reply {1}")]
    Refused(&'static str, String),
    /// The checkpoint read back is not the one described.
    #[error("{0}")]
    Corrupt(String),
    /// The checkpoint the log holds, read back whole with its CRC right, is not one this
    /// kvstore can load (it does not decode, states another index, or holds timestamps the
    /// sequencer never handed out). Fatal: every replica holds the same bytes.
    #[error(
        "the log's checkpoint {id} (at log index {index}) cannot be loaded: {why}; recovery stopped \
         (docs/operations.md, \"A bad record in the log\")"
    )]
    Bad {
        /// The checkpoint's id.
        id: u64,
        /// The log index `CKPT_INFO` says it covers.
        index: u64,
        /// What is wrong with it.
        why: String,
    },
    /// Encoding the checkpoint failed.
    #[error("encoding: {0}")]
    Encode(String),
}

/// Why a start attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The log holds an epoch newer than the one the sequencer just gave: the sequencer has
    /// lost state (or was reset) and would hand out timestamps the log already used. Fatal:
    /// the operator moves the sequencer past the log (`sequencer --reset-to`).
    #[error(
        "the sequencer is behind the log: the log has epoch {log}, newer than ours ({ours}); move the sequencer past it (sequencer --reset-to) and restart"
    )]
    SequencerBehind {
        /// The newest epoch in the log.
        log: u64,
        /// The epoch the sequencer gave this kvstore.
        ours: u64,
    },
    /// A newer kvstore took over while this one was starting. Fatal: starting again would
    /// take the log back from it.
    #[error("fenced by kvstore epoch {0} while starting; that kvstore now owns the log")]
    FencedWhileStarting(u64),
    /// The log's indices ran out. Fatal.
    #[error("log index {0} has no successor")]
    NoSuccessor(u64),
    /// The sequencer is unreachable or misbehaved: try again.
    #[error("sequencer: {0}")]
    Sequencer(EngineError),
    /// The log is unreachable or did not answer: try again.
    #[error("log: {0}")]
    Log(#[from] ClientError),
    /// The checkpoint could not be loaded: try again, unless it is [`CheckpointError::Bad`].
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The log could not be read: try again.
    #[error("reading the log: {0}")]
    Gap(GapError),
    /// An entry in the log that the kvstore will not apply (and will not skip, which could
    /// lose data). Fatal, naming the index: see [`super::vet`].
    #[error(
        "recovery stopped at {0}; the log must be repaired or restored before a kvstore can start \
         (docs/operations.md, \"A bad record in the log\")"
    )]
    BadRecord(BadRecord),
}

impl From<GapError> for RecoveryError {
    fn from(e: GapError) -> Self {
        match e {
            GapError::Bad(bad) => RecoveryError::BadRecord(bad),
            e => RecoveryError::Gap(e),
        }
    }
}

impl RecoveryError {
    /// Whether trying again cannot help (or would harm): the process stops with the message.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            RecoveryError::SequencerBehind { .. }
                | RecoveryError::FencedWhileStarting(_)
                | RecoveryError::NoSuccessor(_)
                | RecoveryError::Gap(GapError::NoSuccessor(_) | GapError::Bad(_))
                | RecoveryError::BadRecord(_)
                | RecoveryError::Checkpoint(CheckpointError::Bad { .. })
        )
    }
}
