//! The segment files: where each entry lies on disk, the scan that reads a segment back (and
//! cuts a torn tail), and the in-memory state the store's operations change under its lock:
//! starting, truncating and purging segments, and writing buffered records.
//!
//! Invariants: every entry held in memory has a [`Loc`] in a segment still on disk; segments
//! are contiguous by first index; a purge removes a file only after the purged id that covers
//! it is durable; each create or remove of a file is followed by an fsync of the directory.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::record::{replace_file, sync_dir, FileError, Format, IoAt};

use super::{io_at, LogStoreError};
use crate::types::{Entry, LogId, Vote};

#[derive(Debug, Clone, Copy)]
pub(super) struct Loc {
    /// First index of the segment holding the record.
    pub(super) segment: u64,
    /// Byte offset of the record in that segment.
    pub(super) offset: u64,
}

pub(super) struct Segment {
    pub(super) path: PathBuf,
    pub(super) len: u64,
}

pub(super) struct Inner {
    pub(super) dir: PathBuf,
    pub(super) entries: BTreeMap<u64, (Entry, Loc)>,
    /// By first index. The last one is the one appended to.
    pub(super) segments: BTreeMap<u64, Segment>,
    /// The last segment, open for appending.
    pub(super) active: Option<(u64, Arc<File>)>,
    pub(super) last_purged: Option<LogId>,
    pub(super) vote: Option<Vote>,
    pub(super) committed: Option<LogId>,
    pub(super) committed_file: Option<File>,
    /// Testing hook (`--fail-writes-after-bytes`): once this many bytes of records have been
    /// written by this process, every further log write fails with ENOSPC, as on a full disk.
    pub(super) fail_writes_after: Option<u64>,
    /// Bytes of records written to segments by this process.
    pub(super) written: u64,
}

pub(super) fn segment_name(first: u64) -> String {
    format!("seg-{first:020}.log")
}

/// A scanned segment: its records with their offsets, its valid length, and whether a torn
/// tail was cut off.
pub(super) struct Scanned {
    pub(super) records: Vec<(u64, Entry)>,
    pub(super) len: u64,
    pub(super) torn: bool,
}

/// Reads a segment's records. On a bad record in the last segment that reaches the end of the
/// file (or is followed only by zeros), truncates the file there and reports `torn = true`.
pub(super) fn scan_segment(path: &Path, is_last: bool) -> Result<Scanned, LogStoreError> {
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
pub(super) const RECORD: Format = Format::u32(u32::MAX as u64);
/// The vote, purged and committed files each hold one small value (tens of bytes).
pub(super) const SMALL: Format = Format::u32(4096);

/// Reads a small record file; missing or empty means `None`, corrupt is an error.
pub(super) fn read_small<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, LogStoreError> {
    SMALL.read_file(path).map_err(|e| match e {
        FileError::Io(IoAt { path, source }) => LogStoreError::Io { path, source },
        FileError::Bad { path, error } => LogStoreError::Invalid {
            path,
            why: error.to_string(),
        },
    })
}

pub(super) fn small_bytes<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, io::Error> {
    SMALL.encode(value).map_err(io::Error::other)
}

impl Inner {
    pub(super) fn last_index(&self) -> Option<u64> {
        self.entries.keys().next_back().copied()
    }

    pub(super) fn start_segment(&mut self, first: u64) -> Result<Arc<File>, io::Error> {
        let path = self.dir.join(segment_name(first));
        let file = Arc::new(OpenOptions::new().create(true).append(true).open(&path)?);
        // The new file's name must be durable before anything in it is acknowledged.
        sync_dir(&self.dir)?;
        self.segments.insert(first, Segment { path, len: 0 });
        self.active = Some((first, file.clone()));
        Ok(file)
    }

    /// Removes entries from `index` on, in memory and on disk.
    pub(super) fn truncate_from(&mut self, index: u64) -> Result<(), io::Error> {
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

    pub(super) fn reopen_active(&mut self) -> Result<(), io::Error> {
        self.active = match self.segments.iter().next_back() {
            Some((&first, seg)) => Some((
                first,
                Arc::new(OpenOptions::new().append(true).open(&seg.path)?),
            )),
            None => None,
        };
        Ok(())
    }

    pub(super) fn purge_upto(&mut self, log_id: LogId) -> Result<(), io::Error> {
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

/// Writes buffered records to the active segment; remembers the file for the fsync.
pub(super) fn flush_buf(
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
