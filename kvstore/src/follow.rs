//! Following the log with `TAIL`, to learn at once that a newer kvstore has taken over.
//!
//! While a kvstore lives it is the log's only writer, so its own appends tell it everything it
//! must apply; it does not need `TAIL` for data. What it cannot learn from its appends alone is
//! that it has been *replaced*: a second kvstore started against the same log appends
//! `EPOCH <newer>`, and the commit path notices that only at this kvstore's next commit (the
//! append comes back at an unexpected index and the gap holds the newer epoch). Until then the
//! old one would keep answering reads and read-only transactions from a state that no longer
//! grows. The follower closes that window: it tails the log from the entry after the one the
//! kvstore started serving at with `TAIL <from> "EPOCH "`, so the replica sends only entries
//! that hold an `EPOCH` record (commits are neither sent nor parsed), and fences the kvstore as
//! soon as a newer epoch is applied on the replica it follows. Reads then answer `ERR FENCED`
//! within about one replication delay of the takeover rather than at the next commit. It is not
//! a lease: a kvstore cut off from every log replica keeps serving reads until it tries to
//! commit (docs/operations.md).
//!
//! It tails a replica other than the committer's first guess so the leader does not stream to
//! us too, moves to the next replica when its connection fails, and starts over on the next
//! replica every 10 s anyway (a replica cut off with its connection open would otherwise keep
//! it waiting). A new stream starts after the kvstore's applied index at least: every entry up
//! to it was either appended by this kvstore or read by the commit path's gap check, which
//! fences on its own. `ERR COMPACTED <first>` with `first` beyond the applied index + 1 fences
//! too: this kvstore's own checkpoints never go past what it has applied, so such a compaction
//! is another writer's checkpoint, and the `EPOCH` it covered is gone (the epoch is then
//! reported as unknown).

use std::sync::Arc;
use std::time::Duration;

use protocol::log::Request as LogRequest;
use protocol::log_client::Replicas;
use protocol::trust::Trust;
use protocol::{Client, ClientError, ErrorCode, Response};

use crate::lifecycle::{Lifecycle, Mode, UNKNOWN_EPOCH};
use crate::record::Record;

/// Wait before reconnecting after a failed connection, so a dead replica costs no busy loop.
const RETRY: Duration = Duration::from_millis(200);
/// A quiet stream is normal (only `EPOCH` entries are sent), but so is a replica that is cut
/// off with its connection open: start over on the next replica this often.
const RESUBSCRIBE: Duration = Duration::from_secs(10);

/// A newer `EPOCH` the follower saw (and fenced this kvstore by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Takeover {
    /// The log index of the entry holding it.
    pub index: u64,
    /// The epoch.
    pub epoch: u64,
}

/// Follows the log (replicas `addrs`, dialled with `trust`) from index `from` until this
/// kvstore is fenced. Returns the newer `EPOCH` it fenced by, if that is what ended it, for the
/// caller to vet (an epoch the sequencer never handed out is a forged or corrupt record, not a
/// takeover).
pub async fn follow(
    e: Arc<Lifecycle>,
    addrs: Vec<String>,
    trust: Trust,
    from: u64,
) -> Option<Takeover> {
    let epoch = e.epoch();
    let mut replicas = Replicas::new(addrs);
    // The committer starts with the first address; start elsewhere when there is an elsewhere.
    replicas.rotate();
    let mut cursor = from;
    loop {
        if matches!(e.mode(), Mode::Fenced(_)) {
            return None;
        }
        let addr = replicas.current().to_string();
        cursor = cursor.max(e.applied_index().saturating_add(1));
        let tailed =
            tokio::time::timeout(RESUBSCRIBE, tail_once(&addr, &trust, epoch, &mut cursor)).await;
        match tailed {
            Ok(Ok(Ended::Newer(t))) => {
                tracing::error!(
                    "fenced: kvstore epoch {} took over the log at index {} (seen by TAIL)",
                    t.epoch,
                    t.index
                );
                e.fence(t.epoch);
                return Some(t);
            }
            Ok(Ok(Ended::Compacted(first))) => {
                // This kvstore's own checkpoints never go past what it has applied, so a
                // compaction beyond that is another writer's.
                if first > e.applied_index().saturating_add(1) {
                    tracing::error!(
                        "fenced: another writer checkpointed the log up to {} (seen by TAIL)",
                        first - 1
                    );
                    e.fence(UNKNOWN_EPOCH);
                    return None;
                }
                cursor = cursor.max(first);
            }
            Ok(Err(err)) => tracing::debug!("following the log on {addr}: {err}"),
            Err(_) => {}
        }
        replicas.rotate();
        tokio::time::sleep(RETRY).await;
    }
}

/// How a `TAIL` stream ended.
enum Ended {
    /// A newer epoch showed up.
    Newer(Takeover),
    /// The stream fell behind a compaction; the log now starts at this index.
    Compacted(u64),
}

/// Why a `TAIL` stream failed; the follower moves to the next replica either way.
#[derive(Debug, thiserror::Error)]
enum TailError {
    #[error("connect timed out")]
    ConnectTimeout,
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("log index {0} has no successor")]
    NoSuccessor(u64),
    #[error("bad COMPACTED reply: {0}")]
    BadCompacted(protocol::ServerError),
    #[error("unexpected reply to TAIL: {0:?}")]
    Unexpected(Response),
}

/// One `TAIL` connection, until a newer epoch or a compaction ends it, or it fails.
async fn tail_once(
    addr: &str,
    trust: &Trust,
    epoch: u64,
    cursor: &mut u64,
) -> Result<Ended, TailError> {
    let mut c = tokio::time::timeout(Duration::from_secs(1), Client::connect_trusted(addr, trust))
        .await
        .map_err(|_| TailError::ConnectTimeout)??;
    let tail = LogRequest::Tail {
        from: *cursor,
        prefix: Some(bytes::Bytes::from_static(b"EPOCH ")),
    };
    c.send(&tail.encode());
    c.flush().await?;
    loop {
        match c.recv().await? {
            Response::Entry(index, payload) => {
                if let Some(newer) = Record::epochs(&payload).find(|&x| x > epoch) {
                    return Ok(Ended::Newer(Takeover {
                        index,
                        epoch: newer,
                    }));
                }
                *cursor = index.checked_add(1).ok_or(TailError::NoSuccessor(index))?;
            }
            Response::Err(err) if err.code == ErrorCode::Compacted => {
                let first = err
                    .compacted_first()
                    .ok_or_else(|| TailError::BadCompacted(err.clone()))?;
                return Ok(Ended::Compacted(first));
            }
            r => return Err(TailError::Unexpected(r)),
        }
    }
}
