//! The Raft log on disk: append-only segment files of checksummed records.
//!
//! A record is `[len u32 LE][crc32c u32 LE][postcard bytes of one Raft entry]` (the codec is
//! [`protocol::record`], shared with the small files and the snapshot file). Segments are named
//! `seg-<first index>.log` and rotated at [`SEGMENT_BYTES`], so purging drops whole files and a
//! truncation rewrites at most one. Every entry that has not been purged is also kept in memory
//! (with its location on disk), so reads never touch the disk; the log is bounded by the snapshot
//! policy, which purges what a snapshot covers.
//!
//! Durability, as openraft's storage contract asks:
//! - `append` writes the records under the lock, publishes the entries on the [`Feed`] (the
//!   leader's replication pipelines send them on at once: Raft lets followers persist an entry
//!   before the leader has) and hands the files to the flusher thread, which fdatasyncs them and
//!   only then reports the entries flushed. Callbacks fire in append order. openraft 0.9's core
//!   awaits each callback before its next command, so appends are flushed one after another;
//!   the [`FlushGate`] counts let the DKSP batcher make each one as large as that allows;
//! - the vote and the last purged log id are small files replaced atomically (temp, fsync,
//!   rename, fsync directory) before the call returns;
//! - the purged id is persisted before any segment is deleted, since after a full purge it is
//!   the only record of the last log id.
//!
//! On open, each segment is scanned. A torn or corrupt *final* record (a crash mid-write) is
//! truncated away and logged; the other replicas still have it if it was ever acknowledged. A
//! bad record anywhere else is a hard error: skipping it would silently lose committed entries.

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, RaftLogReader, StorageIOError};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use protocol::record::{replace_file, sync_dir, FileError, Format, IoAt};

use crate::pipeline::Feed;
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use protocol::hops::{self, Hop};

/// A segment is closed and a new one started once it is this large.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path}: corrupt record at byte {offset} ({why}) with valid data after it; refusing to \
         start rather than lose committed entries. Move this replica's data directory away and \
         restart it empty to rebuild it from the other replicas"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LogStoreError + '_ {
    move |source| LogStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    /// First index of the segment holding the record.
    segment: u64,
    /// Byte offset of the record in that segment.
    offset: u64,
}

struct Segment {
    path: PathBuf,
    len: u64,
}

struct Inner {
    dir: PathBuf,
    entries: BTreeMap<u64, (Entry, Loc)>,
    /// By first index. The last one is the one appended to.
    segments: BTreeMap<u64, Segment>,
    /// The last segment, open for appending.
    active: Option<(u64, Arc<File>)>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    committed_file: Option<File>,
    /// Testing hook (`--fail-writes-after-bytes`): once this many bytes of records have been
    /// written by this process, every further log write fails with ENOSPC, as on a full disk.
    fail_writes_after: Option<u64>,
    /// Bytes of records written to segments by this process.
    written: u64,
}

/// The log store. Clones share one log (openraft's log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    flusher: mpsc::Sender<FlushReq>,
    /// Every append, as written, for the leader's replication pipelines.
    feed: Feed,
    gate: Arc<FlushGate>,
    /// This replica's id when a follower's appends are to be fdatasynced in `append` itself
    /// (see [`LogStore::sync_inline_when_following`]).
    inline_sync: Arc<std::sync::OnceLock<u64>>,
}

/// Counts of `append` calls and of those flushed, for the DKSP batcher: openraft 0.9's core
/// waits for each append's fdatasync before it takes the next, so an entry proposed while one
/// is being flushed gains nothing by going early; waiting lets it gather more (see
/// `server::run_batcher`). A performance hint only: nothing depends on it for correctness.
#[derive(Default)]
pub struct FlushGate {
    appends: std::sync::atomic::AtomicU64,
    flushed: std::sync::atomic::AtomicU64,
    notify: tokio::sync::Notify,
}

impl FlushGate {
    /// `append` calls so far.
    pub fn appends(&self) -> u64 {
        self.appends.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn flushed(&self) -> u64 {
        self.flushed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until an append after the `appends()` value `seen` was made and everything
    /// appended is flushed, or `limit` passes (the proposal may never be appended: refused,
    /// or this replica stopped leading).
    pub async fn settled_after(&self, seen: u64, limit: std::time::Duration) {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            let a = self.appends();
            if a > seen && self.flushed.load(std::sync::atomic::Ordering::SeqCst) >= a {
                return;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return;
            }
        }
    }
}

/// Files written by one `append`, and openraft's callback to fire once they are on disk.
struct FlushReq {
    files: Vec<Arc<File>>,
    callback: LogFlushed<TypeConfig>,
    /// The Raft indices written, for `--trace-hops` (`None` if the append was empty).
    indices: Option<(u64, u64)>,
}

/// The flusher thread: fdatasyncs, for everything queued at once, each distinct file once, then
/// reports each append flushed, in order. It ends when the last `LogStore` clone is dropped.
fn run_flusher(rx: mpsc::Receiver<FlushReq>, gate: Arc<FlushGate>) {
    while let Ok(first) = rx.recv() {
        let mut reqs = vec![first];
        reqs.extend(rx.try_iter());
        let mut files: Vec<&Arc<File>> = Vec::new();
        for f in reqs.iter().flat_map(|r| &r.files) {
            if !files.iter().any(|g| Arc::ptr_eq(f, g)) {
                files.push(f);
            }
        }
        let result = files.iter().try_for_each(|f| f.sync_data());
        if let Err(e) = &result {
            tracing::error!("fdatasync of the Raft log failed: {e}");
        }
        let n = reqs.len() as u64;
        for r in reqs {
            if let (Some((first, last)), Ok(())) = (r.indices, &result) {
                hops::mark_range(Hop::LogFlushed, first, last, 0);
            }
            let r_result = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            r.callback.log_io_completed(r_result);
        }
        gate.flushed
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        gate.notify.notify_waiters();
    }
}

impl LogStore {
    /// Opens (creating if needed) the log in `dir`, recovering from a torn tail.
    pub fn open(dir: &Path) -> Result<LogStore, LogStoreError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let vote = read_small(&dir.join("vote"))?;
        let last_purged: Option<LogId> = read_small(&dir.join("purged"))?;
        // The committed id is only a hint (see save_committed): unreadable means unknown.
        let mut committed: Option<LogId> = read_small::<Option<LogId>>(&dir.join("committed"))
            .unwrap_or(None)
            .flatten();

        let mut firsts = Vec::new();
        for item in fs::read_dir(dir).map_err(io_at(dir))? {
            let item = item.map_err(io_at(dir))?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name
                .strip_prefix("seg-")
                .and_then(|s| s.strip_suffix(".log"))
                .and_then(|s| s.parse::<u64>().ok())
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();

        let mut entries = BTreeMap::new();
        let mut segments = BTreeMap::new();
        let mut truncated_tail = false;
        for (i, &first) in firsts.iter().enumerate() {
            let path = dir.join(segment_name(first));
            let is_last = i + 1 == firsts.len();
            let Scanned { records, len, torn } = scan_segment(&path, is_last)?;
            truncated_tail |= torn;
            for (offset, entry) in records {
                let index = entry.log_id.index;
                if last_purged.is_some_and(|p| index <= p.index) {
                    continue;
                }
                if let Some((&prev, _)) = entries.last_key_value() {
                    if u64::checked_add(prev, 1) != Some(index) {
                        return Err(LogStoreError::Invalid {
                            path,
                            why: format!(
                                "entry {index} follows entry {prev}: a segment is missing or \
                                 out of order"
                            ),
                        });
                    }
                }
                entries.insert(
                    index,
                    (
                        entry,
                        Loc {
                            segment: first,
                            offset,
                        },
                    ),
                );
            }
            segments.insert(first, Segment { path, len });
        }

        let last_index = entries.keys().next_back().copied();
        if truncated_tail
            || committed
                .map(|c| Some(c.index) > last_index)
                .unwrap_or(false)
        {
            // The committed hint may name an entry we just cut off; the leader will tell us again.
            committed = None;
        }
        let active = match segments.iter().next_back() {
            Some((&first, seg)) => Some((
                first,
                Arc::new(
                    OpenOptions::new()
                        .append(true)
                        .open(&seg.path)
                        .map_err(io_at(&seg.path))?,
                ),
            )),
            None => None,
        };
        let committed_path = dir.join("committed");
        let committed_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&committed_path)
            .map_err(io_at(&committed_path))?;
        tracing::info!(
            "log store {}: {} entries in {} segments, last purged {:?}",
            dir.display(),
            entries.len(),
            segments.len(),
            last_purged.map(|p| p.index)
        );
        let (flusher, rx) = mpsc::channel();
        let gate = Arc::new(FlushGate::default());
        let flusher_gate = gate.clone();
        std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || run_flusher(rx, flusher_gate))
            .map_err(io_at(dir))?;
        Ok(LogStore {
            flusher,
            feed: Feed::default(),
            gate,
            inline_sync: Arc::new(std::sync::OnceLock::new()),
            inner: Arc::new(Mutex::new(Inner {
                dir: dir.to_path_buf(),
                entries,
                segments,
                active,
                last_purged,
                vote,
                committed,
                committed_file: Some(committed_file),
                fail_writes_after: None,
                written: 0,
            })),
        })
    }

    /// The appends this store takes, as it writes them: the leader's replication pipelines send
    /// them on before their fdatasync (see [`crate::pipeline`]).
    pub fn feed(&self) -> Feed {
        self.feed.clone()
    }

    /// Appends of entries another replica made (this one follows) are fdatasynced in `append`
    /// itself, on the caller's thread, when nothing else is waiting to be flushed: openraft
    /// 0.9's core waits for the flush before its next command anyway, so the hand-off to the
    /// flusher thread and back only adds two thread wake-ups to every follower's round. The
    /// leader's own appends still go to the flusher thread: its core waits, but its runtime
    /// goes on serving clients and replication meanwhile.
    pub fn sync_inline_when_following(&self, me: u64) {
        let _ = self.inline_sync.set(me);
    }

    /// Counts of appends made and flushed; see [`FlushGate`].
    pub fn flush_gate(&self) -> Arc<FlushGate> {
        self.gate.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is only mutated by whole operations; a panic mid-operation would be a bug,
        // and the on-disk log stays authoritative.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a blocking disk operation on the inner state off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, io::Error> + Send + 'static,
        what: impl FnOnce(io::Error) -> StorageError + Send + 'static,
    ) -> Result<T, StorageError> {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || {
            let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut g)
        })
        .await
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(what(e)),
            Err(e) => Err(what(io::Error::other(e.to_string()))),
        }
    }

    /// Number of entries held (for tests and STATUS).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Testing hook: makes every log write after `bytes` more bytes of records fail with
    /// ENOSPC ("No space left on device"), to test what a full disk does without filling one.
    pub fn fail_writes_after_bytes(&self, bytes: u64) {
        let mut g = self.lock();
        g.fail_writes_after = Some(g.written.saturating_add(bytes));
    }

    /// True if the vote file is present (a vote was ever saved).
    pub fn has_vote(&self) -> bool {
        self.lock().vote.is_some()
    }

    /// True if nothing was ever written: no vote, no entries, nothing purged. Used to decide
    /// whether `--init` may initialise the group.
    pub fn is_pristine(&self) -> bool {
        let g = self.lock();
        g.vote.is_none() && g.entries.is_empty() && g.last_purged.is_none()
    }
}

fn segment_name(first: u64) -> String {
    format!("seg-{first:020}.log")
}

/// A scanned segment: its records with their offsets, its valid length, and whether a torn
/// tail was cut off.
struct Scanned {
    records: Vec<(u64, Entry)>,
    len: u64,
    torn: bool,
}

/// Reads a segment's records. On a bad record in the last segment that reaches the end of the
/// file (or is followed only by zeros), truncates the file there and reports `torn = true`.
fn scan_segment(path: &Path, is_last: bool) -> Result<Scanned, LogStoreError> {
    let data = fs::read(path).map_err(io_at(path))?;
    let mut records = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        let (why, reaches_end) = match RECORD.decode::<Entry>(&data[off..]) {
            Ok((entry, size)) => {
                records.push((off as u64, entry));
                off += size;
                continue;
            }
            Err(bad) => (bad.error.to_string(), bad.reaches_end),
        };
        let rest_is_zero = data[off..].iter().all(|&b| b == 0);
        if !is_last || !(reaches_end || rest_is_zero) {
            return Err(LogStoreError::Corrupt {
                path: path.to_path_buf(),
                offset: off as u64,
                why,
            });
        }
        tracing::warn!(
            "{}: torn or corrupt final record at byte {off} ({why}); truncating {} bytes",
            path.display(),
            data.len() - off
        );
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_at(path))?;
        f.set_len(off as u64).map_err(io_at(path))?;
        f.sync_all().map_err(io_at(path))?;
        return Ok(Scanned {
            records,
            len: off as u64,
            torn: true,
        });
    }
    Ok(Scanned {
        records,
        len: data.len() as u64,
        torn: false,
    })
}

/// Raft log records in segments: the width of the existing layout, no cap beyond it.
const RECORD: Format = Format::u32(u32::MAX as u64);
/// The vote, purged and committed files each hold one small value (tens of bytes).
const SMALL: Format = Format::u32(4096);

/// Reads a small record file; missing or empty means `None`, corrupt is an error.
fn read_small<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, LogStoreError> {
    SMALL.read_file(path).map_err(|e| match e {
        FileError::Io(IoAt { path, source }) => LogStoreError::Io { path, source },
        FileError::Bad { path, error } => LogStoreError::Invalid {
            path,
            why: error.to_string(),
        },
    })
}

fn small_bytes<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, io::Error> {
    SMALL.encode(value).map_err(io::Error::other)
}

impl Inner {
    fn last_index(&self) -> Option<u64> {
        self.entries.keys().next_back().copied()
    }

    fn start_segment(&mut self, first: u64) -> Result<Arc<File>, io::Error> {
        let path = self.dir.join(segment_name(first));
        let file = Arc::new(OpenOptions::new().create(true).append(true).open(&path)?);
        // The new file's name must be durable before anything in it is acknowledged.
        sync_dir(&self.dir)?;
        self.segments.insert(first, Segment { path, len: 0 });
        self.active = Some((first, file.clone()));
        Ok(file)
    }

    /// Removes entries from `index` on, in memory and on disk.
    fn truncate_from(&mut self, index: u64) -> Result<(), io::Error> {
        let Some((_, loc)) = self.entries.get(&index).map(|(e, l)| (e.log_id, *l)) else {
            return Ok(());
        };
        self.entries.split_off(&index);
        let doomed: Vec<u64> = self
            .segments
            .range(loc.segment..)
            .map(|(&f, _)| f)
            .filter(|&f| f > loc.segment || loc.offset == 0)
            .collect();
        for first in &doomed {
            if let Some(seg) = self.segments.remove(first) {
                fs::remove_file(&seg.path)?;
            }
        }
        if loc.offset > 0 {
            if let Some(seg) = self.segments.get_mut(&loc.segment) {
                let f = OpenOptions::new().write(true).open(&seg.path)?;
                f.set_len(loc.offset)?;
                f.sync_all()?;
                seg.len = loc.offset;
            }
        }
        sync_dir(&self.dir)?;
        self.reopen_active()
    }

    fn reopen_active(&mut self) -> Result<(), io::Error> {
        self.active = match self.segments.iter().next_back() {
            Some((&first, seg)) => Some((
                first,
                Arc::new(OpenOptions::new().append(true).open(&seg.path)?),
            )),
            None => None,
        };
        Ok(())
    }

    fn purge_upto(&mut self, log_id: LogId) -> Result<(), io::Error> {
        if self.last_purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        replace_file(&self.dir, "purged", &small_bytes(&log_id)?)?;
        self.last_purged = Some(log_id);
        self.entries = self.entries.split_off(&(log_id.index + 1));
        // A segment can go once every entry in it is purged: when the next segment starts at
        // or below upto + 1, or (for the last one) when no entry is left at all.
        let firsts: Vec<u64> = self.segments.keys().copied().collect();
        let mut removed = false;
        for (i, &first) in firsts.iter().enumerate() {
            let fully_purged = match firsts.get(i + 1) {
                Some(&next) => next <= log_id.index + 1,
                None => self.entries.is_empty(),
            };
            if fully_purged {
                if let Some(seg) = self.segments.remove(&first) {
                    fs::remove_file(&seg.path)?;
                    removed = true;
                }
            }
        }
        if removed {
            sync_dir(&self.dir)?;
            self.reopen_active()?;
        }
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let g = self.lock();
        Ok(g.entries
            .range(range)
            .map(|(_, (e, _))| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let g = self.lock();
        let last = g
            .entries
            .values()
            .next_back()
            .map(|(e, _)| e.log_id)
            .or(g.last_purged);
        Ok(LogState {
            last_purged_log_id: g.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.blocking(
            move |g| {
                replace_file(&g.dir, "vote", &small_bytes(&vote)?)?;
                g.vote = Some(vote);
                Ok(())
            },
            |e| StorageIOError::write_vote(&e).into(),
        )
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint for faster restarts, not a durability promise: written in place without fsync.
        // A torn write fails its checksum on open and reads as "unknown".
        let mut g = self.lock();
        g.committed = committed;
        let bytes = small_bytes(&committed)
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        if let Some(f) = &g.committed_file {
            f.write_at(&bytes, 0).map_err(|e| {
                StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e)
            })?;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut published = Vec::new();
        let publish = self.feed.wanted();
        let mut indices: Option<(u64, u64)> = None;
        // Who made the last entry: this replica when it leads, its leader otherwise.
        let mut made_by: Option<u64> = None;
        let to_sync = {
            let mut g = self.lock();
            let mut to_sync: Vec<Arc<File>> = Vec::new();
            let mut buf = Vec::new();
            let write_err =
                |e: io::Error| -> StorageError { StorageIOError::write_logs(&e).into() };
            for entry in entries {
                let index = entry.get_log_id().index;
                made_by = Some(entry.get_log_id().leader_id.node_id);
                hops::mark(Hop::LogAppend, index, 0);
                indices = Some((indices.map_or(index, |(f, _)| f), index));
                let contiguous = match g.last_index() {
                    Some(last) if index <= last => {
                        // Overwriting: openraft truncates first, but be safe about it.
                        flush_buf(&mut g, &mut buf, &mut to_sync).map_err(write_err)?;
                        g.truncate_from(index).map_err(write_err)?;
                        g.last_index()
                            .is_some_and(|l| l.checked_add(1) == Some(index))
                    }
                    Some(last) => last.checked_add(1) == Some(index),
                    None => false,
                };
                let active_full = g
                    .active
                    .as_ref()
                    .and_then(|(first, _)| g.segments.get(first))
                    .is_none_or(|s| s.len + buf.len() as u64 >= SEGMENT_BYTES);
                if !contiguous || active_full {
                    flush_buf(&mut g, &mut buf, &mut to_sync).map_err(write_err)?;
                    g.start_segment(index).map_err(write_err)?;
                }
                let (seg_first, seg_len) = match g
                    .active
                    .as_ref()
                    .and_then(|(f, _)| Some((*f, g.segments.get(f)?.len)))
                {
                    Some(x) => x,
                    None => return Err(write_err(io::Error::other("no active segment"))),
                };
                let offset = seg_len + buf.len() as u64;
                RECORD
                    .encode_into(&mut buf, &entry)
                    .map_err(|e| write_err(io::Error::other(e)))?;
                if publish {
                    published.push(entry.clone());
                }
                g.entries.insert(
                    index,
                    (
                        entry,
                        Loc {
                            segment: seg_first,
                            offset,
                        },
                    ),
                );
            }
            flush_buf(&mut g, &mut buf, &mut to_sync).map_err(write_err)?;
            to_sync
        };
        // Written, not yet durable: followers may take them now, as Raft allows (the leader
        // counts itself only once its own flush is done).
        self.feed.publish(published);
        let following = self
            .inline_sync
            .get()
            .is_some_and(|me| made_by.is_some_and(|n| n != *me));
        // Nothing queued for the flusher: the callback fired now is in append order.
        let idle = self.gate.appends() == self.gate.flushed();
        self.gate
            .appends
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if following && idle {
            let result = to_sync.iter().try_for_each(|f| f.sync_data());
            if let Err(e) = &result {
                tracing::error!("fdatasync of the Raft log failed: {e}");
            }
            if let (Some((first, last)), Ok(())) = (indices, &result) {
                hops::mark_range(Hop::LogFlushed, first, last, 0);
            }
            callback.log_io_completed(result);
            self.gate
                .flushed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.gate.notify.notify_waiters();
            return Ok(());
        }
        // The disk wait happens on the flusher thread; openraft 0.9's core awaits the callback.
        if let Err(mpsc::SendError(req)) = self.flusher.send(FlushReq {
            files: to_sync,
            callback,
            indices,
        }) {
            req.callback
                .log_io_completed(Err(io::Error::other("the log flusher thread is gone")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(
            move |g| g.truncate_from(log_id.index),
            |e| StorageIOError::write_logs(&e).into(),
        )
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(
            move |g| g.purge_upto(log_id),
            |e| StorageIOError::write_logs(&e).into(),
        )
        .await
    }
}

/// Writes buffered records to the active segment; remembers the file for the fsync.
fn flush_buf(
    g: &mut Inner,
    buf: &mut Vec<u8>,
    to_sync: &mut Vec<Arc<File>>,
) -> Result<(), io::Error> {
    if buf.is_empty() {
        return Ok(());
    }
    let Some((first, file)) = g.active.clone() else {
        return Err(io::Error::other("no active segment"));
    };
    let written = g.written.saturating_add(buf.len() as u64);
    if g.fail_writes_after.is_some_and(|limit| written > limit) {
        const ENOSPC: i32 = 28;
        return Err(io::Error::from_raw_os_error(ENOSPC));
    }
    (&*file).write_all(buf)?;
    g.written = written;
    if let Some(seg) = g.segments.get_mut(&first) {
        seg.len += buf.len() as u64;
    }
    if !to_sync.iter().any(|f| Arc::ptr_eq(f, &file)) {
        to_sync.push(file);
    }
    buf.clear();
    Ok(())
}
