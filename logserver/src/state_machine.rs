//! The applied log, as clients see it.
//!
//! Applying a Raft entry runs its batch of operations in order, deterministically on every
//! replica:
//! - `Append` gets the next *logical* index, unless its `(client, seq)` was applied before, in
//!   which case it is a duplicate and gets the original index back (exactly-once appends). Each
//!   client's last [`DEDUPE_WINDOW`] sequence numbers are remembered; an older retry is refused.
//! - `CkptChunk` stages part of a checkpoint upload; `CkptCommit` verifies it and makes it
//!   *the* checkpoint, dropping the entries it covers (compaction). It is refused (`REJECTED`,
//!   the log untouched) unless the upload is complete (length and CRC32C match), its index
//!   covers entries that exist and is above the current checkpoint's, and the bytes decode as
//!   a kvstore checkpoint (`protocol::kvlog::check_checkpoint`) stating that same index.
//!
//! The state is held in memory (entries since the last checkpoint, the dedupe table, the
//! checkpoint) and made durable by openraft snapshots written to `<dir>/snapshot`; on restart it
//! is loaded from there and the Raft log after it is applied again. A snapshot is therefore
//! about as large as the last checkpoint plus the entries since, which the kvstore keeps bounded
//! by checkpointing regularly.

use bytes::Bytes;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::watch;

use crate::types::{
    BatchResult, Entry, LogId, Node, NodeId, Op, OpResult, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig,
};
use protocol::hops::{self, Hop};
use protocol::record::{replace_file, Format, RecordError};

mod staging;

use staging::{Chunks, Staging};

/// Sequence numbers remembered per client for deduplication.
pub const DEDUPE_WINDOW: usize = 100_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ClientSeqs {
    /// seq -> logical index, for the most recent seqs.
    seqs: BTreeMap<u64, u64>,
    /// Seqs below this were forgotten and cannot be checked any more.
    floor: u64,
}

/// The latest committed checkpoint, held whole by every replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The upload id it was committed under.
    pub id: u64,
    /// The checkpoint is the state as of this logical index.
    pub index: u64,
    /// The CRC32C of `data`.
    pub crc: u32,
    /// The checkpoint's bytes, as the kvstore uploaded them.
    pub data: Bytes,
}

/// Everything a snapshot holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SmData {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Logical index the next append gets. Indices start at 1.
    next_index: u64,
    /// First logical index still held; earlier ones are covered by the checkpoint.
    first_index: u64,
    /// Payloads of logical indices `first_index..next_index`.
    entries: VecDeque<Bytes>,
    dedupe: BTreeMap<Bytes, ClientSeqs>,
    checkpoint: Option<Checkpoint>,
    staging: Option<Staging>,
}

impl Default for SmData {
    fn default() -> Self {
        SmData {
            last_applied: None,
            membership: StoredMembership::default(),
            next_index: 1,
            first_index: 1,
            entries: VecDeque::new(),
            dedupe: BTreeMap::new(),
            checkpoint: None,
            staging: None,
        }
    }
}

/// A snapshot as stored on disk and handed to openraft. `data` is `Bytes` so that keeping and
/// handing out the current snapshot does not copy it; postcard writes `Bytes` exactly as it
/// wrote the `Vec<u8>` this used to be (a length, then the bytes), so files stay readable.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Bytes,
}

/// Why a `READ` could not be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Entries before this logical index were compacted into the checkpoint.
    Compacted(u64),
}

struct Shared {
    dir: PathBuf,
    data: RwLock<SmData>,
    current: Mutex<Option<StoredSnapshot>>,
    /// Next logical index, for `TAIL` readers to wait on.
    applied: watch::Sender<u64>,
    snapshot_seq: AtomicU64,
}

/// Where the applied log stands ([`StateMachine::positions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positions {
    /// The first logical index still retained (older ones are compacted by a checkpoint).
    pub first: u64,
    /// The last logical index applied (0 before the first).
    pub last: u64,
    /// The Raft log id of the last entry applied.
    pub last_applied: Option<LogId>,
}

/// The current checkpoint, as `CKPT_INFO` reports it ([`StateMachine::checkpoint_info`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The id its writer gave it.
    pub id: u64,
    /// The logical index it covers up to.
    pub index: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The CRC32C of its bytes.
    pub crc: u32,
}

/// The state machine. Clones share one state: openraft drives one, the DKSP server reads another.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl StateMachine {
    /// Loads the last snapshot from `dir` if there is one.
    pub fn open(dir: &Path) -> Result<StateMachine, io::Error> {
        std::fs::create_dir_all(dir)?;
        let (data, current) = match std::fs::read(dir.join("snapshot")) {
            Ok(bytes) => {
                let stored = decode_snapshot_file(&bytes).map_err(|why| {
                    io::Error::other(format!(
                        "{}: snapshot file: {why}; move it away to rebuild this replica from the \
                         others",
                        dir.join("snapshot").display()
                    ))
                })?;
                let mut data: SmData = postcard::from_bytes(&stored.data).map_err(io_err)?;
                data.last_applied = stored.meta.last_log_id;
                data.membership = stored.meta.last_membership.clone();
                (data, Some(stored))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (SmData::default(), None),
            Err(e) => return Err(e),
        };
        let (applied, _) = watch::channel(data.next_index);
        Ok(StateMachine {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                data: RwLock::new(data),
                current: Mutex::new(current),
                applied,
                snapshot_seq: AtomicU64::new(0),
            }),
        })
    }

    fn read_data(&self) -> RwLockReadGuard<'_, SmData> {
        self.shared.data.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_data(&self) -> RwLockWriteGuard<'_, SmData> {
        self.shared.data.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Committed entries from logical index `from`, at most `max`.
    /// Committed entries from `from`: at most `max`, and no more once `max_bytes` of payload
    /// are gathered (but always at least one entry if there is one), so a page of big entries
    /// stays a reasonable size and readers can pipeline pages.
    pub fn read(
        &self,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, ReadError> {
        let d = self.read_data();
        let from = from.max(1);
        if from < d.first_index {
            return Err(ReadError::Compacted(d.first_index));
        }
        let skip = (from - d.first_index) as usize;
        let mut bytes = 0;
        let mut out = Vec::new();
        for (i, p) in d.entries.iter().skip(skip).take(max).enumerate() {
            if bytes >= max_bytes {
                break;
            }
            bytes += p.len();
            out.push((from + i as u64, p.clone()));
        }
        Ok(out)
    }

    /// Watches the next logical index (it changes whenever entries are applied).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }

    /// Where the applied log stands.
    pub fn positions(&self) -> Positions {
        let d = self.read_data();
        Positions {
            first: d.first_index,
            last: d.next_index.saturating_sub(1),
            last_applied: d.last_applied,
        }
    }

    /// The index already given to `(client, seq)`, if it was applied.
    pub fn lookup(&self, client: &[u8], seq: u64) -> Option<u64> {
        let d = self.read_data();
        d.dedupe.get(client)?.seqs.get(&seq).copied()
    }

    /// The current checkpoint, if there is one.
    pub fn checkpoint_info(&self) -> Option<CheckpointInfo> {
        let d = self.read_data();
        d.checkpoint.as_ref().map(|c| CheckpointInfo {
            id: c.id,
            index: c.index,
            len: c.data.len() as u64,
            crc: c.crc,
        })
    }

    /// Up to `max` bytes of the current checkpoint from `offset`, if checkpoint `id` is current.
    pub fn checkpoint_read(&self, id: u64, offset: u64, max: usize) -> Option<Bytes> {
        let d = self.read_data();
        let c = d.checkpoint.as_ref().filter(|c| c.id == id)?;
        let start = (offset as usize).min(c.data.len());
        let end = start.saturating_add(max).min(c.data.len());
        Some(c.data.slice(start..end))
    }

    /// Bytes staged for checkpoint `id` so far (to resume or verify an upload).
    pub fn staged_len(&self, id: u64) -> Option<u64> {
        let d = self.read_data();
        d.staging
            .as_ref()
            .filter(|s| s.id == id)
            .map(|s| s.data.len() as u64)
    }

    fn store_snapshot(&self, stored: StoredSnapshot) -> Result<(), io::Error> {
        let bytes = encode_snapshot_file(&stored)?;
        replace_file(&self.shared.dir, "snapshot", &bytes)?;
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(stored);
        Ok(())
    }
}

fn apply_op(d: &mut SmData, op: Op) -> OpResult {
    match op {
        Op::Append {
            client,
            seq,
            payload,
        } => {
            let next = d.next_index;
            // Checked, and decided the same way on every replica: an index is never reused.
            let Some(after) = next.checked_add(1) else {
                return OpResult::Rejected("the logical index space is exhausted".into());
            };
            let cs = d.dedupe.entry(client).or_default();
            if seq < cs.floor {
                return OpResult::Rejected(format!(
                    "seq {seq} is older than the {DEDUPE_WINDOW} remembered for this client"
                ));
            }
            if let Some(&index) = cs.seqs.get(&seq) {
                return OpResult::Duplicate(index);
            }
            cs.seqs.insert(seq, next);
            if cs.seqs.len() > DEDUPE_WINDOW {
                if let Some((oldest, _)) = cs.seqs.pop_first() {
                    cs.floor = oldest.saturating_add(1);
                }
            }
            d.entries.push_back(payload);
            d.next_index = after;
            OpResult::Appended(next)
        }
        Op::CkptChunk { id, offset, data } => {
            if offset == 0 {
                // A new upload replaces any abandoned one.
                let mut chunks = Chunks::default();
                chunks.push(data);
                d.staging = Some(Staging { id, data: chunks });
                return OpResult::Done;
            }
            match &mut d.staging {
                Some(s) if s.id == id && s.data.len() as u64 == offset => {
                    s.data.push(data);
                    OpResult::Done
                }
                Some(s) if s.id == id => OpResult::Rejected(format!(
                    "chunk at offset {offset} but {} bytes are staged for checkpoint {id}",
                    s.data.len()
                )),
                _ => OpResult::Rejected(format!(
                    "no upload of checkpoint {id} in progress; start at offset 0"
                )),
            }
        }
        Op::CkptCommit {
            id,
            index,
            len,
            crc,
        } => {
            let Some(s) = d.staging.as_ref().filter(|s| s.id == id) else {
                return OpResult::Rejected(format!("no upload of checkpoint {id} in progress"));
            };
            if s.data.len() as u64 != len {
                return OpResult::Rejected(format!(
                    "checkpoint {id} has {} bytes staged, commit says {len}",
                    s.data.len()
                ));
            }
            if s.data.crc32c() != crc {
                return OpResult::Rejected(format!("checkpoint {id} fails its CRC"));
            }
            if let Err(why) = covers_existing(d, index) {
                return OpResult::Rejected(format!("checkpoint {id}: {why}"));
            }
            // Checked last, as it reads the whole upload; refused the same way on every
            // replica (the content is the same everywhere), and the upload is dropped: bytes
            // that are not a checkpoint can never commit.
            let staged = d.staging.take().unwrap_or_default().data.join();
            match protocol::kvlog::check_checkpoint(&staged) {
                Ok(h) if h.index == index => {}
                Ok(h) => {
                    return OpResult::Rejected(format!(
                        "checkpoint {id} says it covers index {}, the commit says {index}",
                        h.index
                    ))
                }
                Err(e) => return OpResult::Rejected(format!("checkpoint {id} {e}")),
            }
            d.checkpoint = Some(Checkpoint {
                id,
                index,
                crc,
                data: staged,
            });
            if index >= d.first_index {
                let drop_n = (index + 1 - d.first_index) as usize;
                d.entries.drain(..drop_n.min(d.entries.len()));
                d.first_index = index + 1;
            }
            OpResult::Done
        }
    }
}

/// Whether a checkpoint at logical index `index` covers entries that exist and are newer than
/// the current checkpoint's: `1 <= index <= last applied`, and above the current one (a
/// checkpoint at or below it would cover nothing new, and one beyond the log would compact
/// entries that do not exist yet, which is how junk once wiped a whole log).
fn covers_existing(d: &SmData, index: u64) -> Result<(), String> {
    let last = d.next_index.saturating_sub(1);
    if index == 0 {
        return Err("index 0 covers no entry".into());
    }
    if index > last {
        return Err(format!("index {index} is beyond the last entry {last}"));
    }
    if let Some(c) = d.checkpoint.as_ref().filter(|c| c.index >= index) {
        return Err(format!(
            "index {index} is not above the current checkpoint's ({})",
            c.index
        ));
    }
    Ok(())
}

/// The snapshot file: one record with a `u64` length (the existing layout), no cap beyond it.
const SNAPSHOT_FILE: Format = Format::u64(u64::MAX);

fn encode_snapshot_file(stored: &StoredSnapshot) -> Result<Vec<u8>, io::Error> {
    SNAPSHOT_FILE.encode(stored).map_err(io_err)
}

/// The snapshot in a snapshot file's bytes. Whether a bad record reaches the end does not
/// matter here (the file is one record, replaced atomically): any error means the file is
/// damaged, so only what was wrong is returned.
fn decode_snapshot_file(bytes: &[u8]) -> Result<StoredSnapshot, RecordError> {
    SNAPSHOT_FILE
        .decode(bytes)
        .map(|(stored, _)| stored)
        .map_err(|bad| bad.error)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let this = self.clone();
        // Only the copy happens under the lock (entries, checkpoint and payloads are `Bytes`, so
        // it is mostly reference counts). `apply` waits for the lock on the runtime's thread,
        // which with one thread is the whole replica: encoding under it would hold up
        // heartbeats and replication for as long as encoding a large state takes.
        let copy = this.read_data().clone();
        let built = tokio::task::spawn_blocking(move || -> Result<StoredSnapshot, io::Error> {
            let (data, last, membership) = (
                Bytes::from(postcard::to_stdvec(&copy).map_err(io_err)?),
                copy.last_applied,
                copy.membership.clone(),
            );
            drop(copy);
            let seq = this.shared.snapshot_seq.fetch_add(1, Ordering::Relaxed);
            let snapshot_id = match last {
                Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
                None => format!("--{seq}"),
            };
            let stored = StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: last,
                    last_membership: membership,
                    snapshot_id,
                },
                data,
            };
            this.store_snapshot(stored.clone())?;
            Ok(stored)
        })
        .await
        .unwrap_or_else(|e| Err(io_err(e)))
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        tracing::info!(
            "snapshot {} built: {} bytes",
            built.meta.snapshot_id,
            built.data.len()
        );
        Ok(Snapshot {
            meta: built.meta,
            snapshot: Box::new(Cursor::new(built.data.into())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let d = self.read_data();
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut results = Vec::new();
        let next = {
            let mut d = self.write_data();
            for entry in entries {
                d.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(BatchResult::default()),
                    EntryPayload::Membership(m) => {
                        d.membership = StoredMembership::new(Some(entry.log_id), m);
                        results.push(BatchResult::default());
                    }
                    EntryPayload::Normal(batch) => {
                        let r = batch.0.into_iter().map(|op| apply_op(&mut d, op)).collect();
                        results.push(BatchResult(r));
                        hops::mark(Hop::LogApply, entry.log_id.index, 0);
                    }
                }
            }
            d.next_index
        };
        self.shared.applied.send_replace(next);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &openraft::SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        // The cursor is positioned at the end after a chunked transfer; take the whole buffer.
        // Decoding and writing it take a while for a large state: off the runtime's thread.
        let bytes = Bytes::from(snapshot.into_inner());
        let this = self.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        // Err(true, _): the snapshot does not decode; Err(false, _): it could not be stored.
        let decoded = tokio::task::spawn_blocking(move || -> Result<SmData, (bool, io::Error)> {
            let data: SmData = postcard::from_bytes(&stored.data).map_err(|e| (true, io_err(e)))?;
            this.store_snapshot(stored).map_err(|e| (false, e))?;
            Ok(data)
        })
        .await
        .unwrap_or_else(|e| Err((false, io_err(e))));
        let signature = Some(meta.signature());
        let mut data = decoded.map_err(|(decoding, e)| {
            if decoding {
                StorageIOError::read_snapshot(signature, &e)
            } else {
                StorageIOError::write_snapshot(signature, &e)
            }
        })?;
        data.last_applied = meta.last_log_id;
        data.membership = meta.last_membership.clone();
        let next = data.next_index;
        *self.write_data() = data;
        self.shared.applied.send_replace(next);
        tracing::info!("installed snapshot {}", meta.snapshot_id);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(s) = current else { return Ok(None) };
        // openraft wants its own Vec: copy a large snapshot off the runtime's thread.
        let data = tokio::task::spawn_blocking(move || s.data.to_vec())
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(s.meta.signature()), &io_err(e)))?;
        Ok(Some(Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests;
