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
//! us too, and moves to the next replica when its connection fails. A new connection starts
//! after the kvstore's applied index at least: every entry up to it was either appended by
//! this kvstore or read by the commit path's gap check, which fences on its own. After
//! `ERR COMPACTED` it resumes at the first retained entry: an `EPOCH` inside a compacted range
//! was followed by a checkpoint written by its own kvstore, and this kvstore's next commit
//! finds it by the gap check as before.

use std::sync::Arc;
use std::time::Duration;

use protocol::log::Request as LogRequest;
use protocol::log_client::Replicas;
use protocol::{Client, ErrorCode, Response};

use crate::engine::{Engine, Mode};
use crate::record::Record;

/// Wait before reconnecting after a failed connection, so a dead replica costs no busy loop.
const RETRY: Duration = Duration::from_millis(200);

/// Follows the log from index `from` until this kvstore is fenced.
pub async fn follow(e: Arc<Engine>, from: u64) {
    let epoch = e.epoch();
    let mut replicas = Replicas::new(e.log_addrs().to_vec());
    // The committer starts with the first address; start elsewhere when there is an elsewhere.
    replicas.rotate();
    let mut cursor = from;
    loop {
        if matches!(e.mode(), Mode::Fenced(_)) {
            return;
        }
        let addr = replicas.current().to_string();
        cursor = cursor.max(e.applied_index() + 1);
        match tail_once(&addr, epoch, &mut cursor).await {
            Ok(Some(newer)) => {
                tracing::error!("fenced: kvstore epoch {newer} took over the log (seen by TAIL)");
                e.fence(newer);
                return;
            }
            Ok(None) => {}
            Err(err) => tracing::debug!("following the log on {addr}: {err}"),
        }
        replicas.rotate();
        tokio::time::sleep(RETRY).await;
    }
}

/// One `TAIL` connection: `Ok(Some(epoch))` when a newer epoch shows up, `Ok(None)` when the
/// stream ended in a way that calls for a new one (compaction), `Err` when the connection
/// failed.
async fn tail_once(addr: &str, epoch: u64, cursor: &mut u64) -> Result<Option<u64>, String> {
    let mut c = tokio::time::timeout(Duration::from_secs(1), Client::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|err| err.to_string())?;
    let tail = LogRequest::Tail {
        from: *cursor,
        prefix: Some(bytes::Bytes::from_static(b"EPOCH ")),
    };
    c.send(&tail.encode());
    c.flush().await.map_err(|err| err.to_string())?;
    loop {
        match c.recv().await.map_err(|err| err.to_string())? {
            Response::Entry(index, payload) => {
                if let Some(newer) = Record::epochs(&payload).find(|&x| x > epoch) {
                    return Ok(Some(newer));
                }
                *cursor = index + 1;
            }
            Response::Err(err) if err.code == ErrorCode::Compacted => {
                let first = protocol::response::parse_u64(err.message.trim().as_bytes())
                    .map_err(|_| format!("bad COMPACTED reply: {err}"))?;
                *cursor = (*cursor).max(first);
                return Ok(None);
            }
            r => return Err(format!("unexpected reply to TAIL: {r:?}")),
        }
    }
}
