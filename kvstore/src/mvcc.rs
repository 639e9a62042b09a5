//! The multi-version store: every committed value of every key, tagged with its commit
//! timestamp, so each transaction reads the snapshot of its start timestamp.
//!
//! A read at snapshot `s` sees, per key, the newest version with `commit_ts < s` (a tombstone
//! reads as absent). Versions are appended in commit-timestamp order per key, which the commit
//! path guarantees (conflicting commits on one key are serialised, and each gets a larger
//! timestamp than the one before). Old versions are garbage-collected: once no snapshot at or
//! above the *watermark* (the oldest active start timestamp) can read a version, it is dropped;
//! keys written since the last collection are the only ones looked at.

use bytes::Bytes;
use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

/// One version of a key: what it held from commit timestamp `ts` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The commit timestamp that wrote this version.
    pub ts: u64,
    /// `None` is a tombstone (the key was deleted).
    pub value: Option<Bytes>,
}

/// The multi-version store: every key's versions, newest last, and what garbage collection needs.
#[derive(Debug, Default)]
pub struct Store {
    keys: BTreeMap<Bytes, Vec<Version>>,
    /// Keys with more than one version, to look at in the next collection.
    gc_candidates: HashSet<Bytes>,
    /// Bytes of keys and values held, for STATUS and the memory report.
    bytes: usize,
    versions: usize,
}

impl Store {
    /// An empty store.
    pub fn new() -> Store {
        Store::default()
    }

    /// The value of `key` in the snapshot at `snapshot_ts`.
    pub fn get(&self, key: &[u8], snapshot_ts: u64) -> Option<Bytes> {
        visible(self.keys.get(key)?, snapshot_ts)?.value.clone()
    }

    /// Live keys in `[start, end)` in the snapshot at `snapshot_ts`, at most `limit`.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        snapshot_ts: u64,
        limit: usize,
    ) -> Vec<(Bytes, Bytes)> {
        if start >= end {
            return Vec::new();
        }
        self.keys
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .filter_map(|(k, versions)| {
                let v = visible(versions, snapshot_ts)?.value.clone()?;
                Some((k.clone(), v))
            })
            .take(limit)
            .collect()
    }

    /// One page of a scan of `(from, end)` at `snapshot_ts`: at most `max_keys` keys looked at
    /// (live or not, so a range of tombstones is paged too) and about `max_bytes` of rows (at
    /// least one row, however large). Pages taken one after another from each page's
    /// `more_after` add up to exactly what one `scan` of the whole range returns, as long as the
    /// snapshot stays registered (garbage collection keeps what it reads).
    pub fn scan_page(
        &self,
        from: Bound<&[u8]>,
        end: &[u8],
        snapshot_ts: u64,
        max_keys: usize,
        max_bytes: usize,
    ) -> Page {
        let mut page = Page {
            rows: Vec::new(),
            more_after: None,
        };
        // BTreeMap::range panics on an empty or inverted range.
        let empty = match from {
            Bound::Included(s) | Bound::Excluded(s) => s >= end,
            Bound::Unbounded => false,
        };
        if empty {
            return page;
        }
        let mut examined = 0usize;
        let mut bytes = 0usize;
        for (k, versions) in self.keys.range::<[u8], _>((from, Bound::Excluded(end))) {
            examined += 1;
            if let Some(v) = visible(versions, snapshot_ts).and_then(|v| v.value.as_ref()) {
                bytes = bytes.saturating_add(k.len() + v.len());
                page.rows.push((k.clone(), v.clone()));
            }
            if examined >= max_keys.max(1) || bytes >= max_bytes {
                page.more_after = Some(k.clone());
                break;
            }
        }
        page
    }

    /// A store holding one version per key, as a checkpoint lists them. Built in bulk (sorted
    /// input makes this linear), which is several times faster than applying keys one by one.
    pub fn from_latest(entries: Vec<(Bytes, u64, Bytes)>) -> Store {
        let keys: BTreeMap<Bytes, Vec<Version>> = entries
            .into_iter()
            .map(|(k, ts, v)| {
                let version = Version { ts, value: Some(v) };
                (k, vec![version])
            })
            .collect();
        let bytes = keys
            .iter()
            .map(|(k, vs)| {
                k.len()
                    + vs.iter()
                        .map(|v| v.value.as_ref().map_or(0, Bytes::len))
                        .sum::<usize>()
            })
            .sum();
        Store {
            versions: keys.len(),
            bytes,
            keys,
            gc_candidates: HashSet::new(),
        }
    }

    /// Commit timestamp of the newest version of `key`, if any.
    pub fn latest_ts(&self, key: &[u8]) -> Option<u64> {
        self.keys.get(key)?.last().map(|v| v.ts)
    }

    /// Installs a committed transaction's writes at `commit_ts`.
    pub fn apply(&mut self, commit_ts: u64, writes: &[(Bytes, Option<Bytes>)]) {
        for (key, value) in writes {
            // Most keys only ever hold one version: do not let the first push reserve four.
            let versions = self
                .keys
                .entry(key.clone())
                .or_insert_with(|| Vec::with_capacity(1));
            if versions.is_empty() {
                self.bytes += key.len();
            }
            self.bytes += value.as_ref().map_or(0, |v| v.len());
            self.versions += 1;
            let version = Version {
                ts: commit_ts,
                value: value.clone(),
            };
            // In order in practice; stay correct if replay ever hands one out of order.
            match versions.last() {
                Some(last) if last.ts > commit_ts => {
                    let at = versions.partition_point(|v| v.ts < commit_ts);
                    versions.insert(at, version);
                }
                _ => versions.push(version),
            }
            if versions.len() > 1 || value.is_none() {
                self.gc_candidates.insert(key.clone());
            }
        }
    }

    /// Drops versions that no snapshot at or above `watermark` can read. Returns how many.
    pub fn collect_garbage(&mut self, watermark: u64) -> usize {
        let mut dropped = 0;
        let candidates: Vec<Bytes> = self.gc_candidates.drain().collect();
        for key in candidates {
            let Some(versions) = self.keys.get_mut(&key) else {
                continue;
            };
            // Keep the newest version below the watermark (what a snapshot at the watermark
            // reads) and everything at or above it.
            let below = versions.partition_point(|v| v.ts < watermark);
            let drop_n = below.saturating_sub(1);
            for v in versions.drain(..drop_n) {
                self.bytes -= v.value.as_ref().map_or(0, |v| v.len());
                self.versions -= 1;
                dropped += 1;
            }
            let only_tombstone_left =
                versions.len() == 1 && versions[0].value.is_none() && versions[0].ts < watermark;
            if only_tombstone_left {
                self.keys.remove(&key);
                self.bytes -= key.len();
                self.versions -= 1;
                dropped += 1;
            } else if versions.len() > 1 || versions.last().is_some_and(|v| v.value.is_none()) {
                // Still has history someone may read, or a tombstone above the watermark.
                self.gc_candidates.insert(key);
            }
        }
        dropped
    }

    /// Copies the newest committed value of up to `limit` keys after `after` (from the first key
    /// with `None`) into `out`, for a checkpoint taken a piece at a time. Returns the key to
    /// continue after, or `None` once every key is done. Pieces taken with no commit applied
    /// between them add up to one consistent copy: garbage collection never changes a key's
    /// newest version (it only drops older ones, and keys whose newest is an old tombstone).
    pub fn copy_latest(
        &self,
        after: Option<&Bytes>,
        limit: usize,
        out: &mut Vec<(Bytes, u64, Bytes)>,
    ) -> Option<Bytes> {
        let from = match after {
            Some(k) => Bound::Excluded(&k[..]),
            None => Bound::Unbounded,
        };
        let mut last = None;
        for (k, versions) in self
            .keys
            .range::<[u8], _>((from, Bound::Unbounded))
            .take(limit)
        {
            if let Some(v) = versions.last() {
                if let Some(value) = &v.value {
                    out.push((k.clone(), v.ts, value.clone()));
                }
            }
            last = Some(k);
        }
        last.cloned()
    }

    /// Live keys, versions, and bytes of keys and values.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            keys: self.keys.len(),
            versions: self.versions,
            bytes: self.bytes,
        }
    }
}

/// How much a [`Store`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Live keys.
    pub keys: usize,
    /// Versions, over all keys.
    pub versions: usize,
    /// Bytes of keys and values, over all versions.
    pub bytes: usize,
}

/// A page of a scan (see [`Store::scan_page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The visible rows of the page, in key order.
    pub rows: Vec<(Bytes, Bytes)>,
    /// The last key looked at, when the range may hold more after it; `None` once it is done.
    pub more_after: Option<Bytes>,
}

fn visible(versions: &[Version], snapshot_ts: u64) -> Option<&Version> {
    let n = versions.partition_point(|v| v.ts < snapshot_ts);
    n.checked_sub(1).map(|i| &versions[i])
}

#[cfg(test)]
mod tests {
    #[test]
    fn from_latest_matches_applying_one_by_one() {
        let entries: Vec<(Bytes, u64, Bytes)> = (0..100u64)
            .map(|i| {
                let k = Bytes::from(format!("k{i:03}"));
                (k, 10 + i, Bytes::from(format!("v{i}")))
            })
            .collect();
        let mut applied = Store::new();
        for (k, ts, v) in &entries {
            applied.apply(*ts, &[(k.clone(), Some(v.clone()))]);
        }
        let bulk = Store::from_latest(entries);
        assert_eq!(bulk.stats(), applied.stats());
        assert_eq!(
            bulk.scan(b"k", b"l", 1000, 1000),
            applied.scan(b"k", b"l", 1000, 1000)
        );
        assert_eq!(
            bulk.get(b"k050", 60),
            None,
            "written at 60, invisible to a snapshot at 60"
        );
        assert_eq!(bulk.get(b"k050", 61), Some(Bytes::from("v50")));
    }

    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    #[test]
    fn snapshots_see_versions_below_them() {
        let mut s = Store::new();
        s.apply(10, &[(b("a"), Some(b("1")))]);
        s.apply(20, &[(b("a"), Some(b("2"))), (b("b"), Some(b("x")))]);
        s.apply(30, &[(b("a"), None)]);
        assert_eq!(s.get(b"a", 10), None);
        assert_eq!(s.get(b"a", 11), Some(b("1")));
        assert_eq!(s.get(b"a", 21), Some(b("2")));
        assert_eq!(s.get(b"a", 31), None);
        assert_eq!(
            s.scan(b"", b"\xff", 25, 10),
            vec![(b("a"), b("2")), (b("b"), b("x"))]
        );
        assert_eq!(s.scan(b"", b"\xff", 35, 10), vec![(b("b"), b("x"))]);
        assert_eq!(s.scan(b"", b"\xff", 35, 0), vec![]);
        assert_eq!(s.latest_ts(b"a"), Some(30));
    }

    /// A checkpoint copied a piece at a time, with garbage collected between the pieces, is
    /// the same as one copied at once: live keys with their newest value, tombstones left out.
    #[test]
    fn a_copy_in_pieces_with_gc_between_matches_a_copy_at_once() {
        let mut s = Store::new();
        for i in 0..50u64 {
            let k = b(&format!("k{i:02}"));
            for ts in 1..=3 {
                s.apply(i * 10 + ts, &[(k.clone(), Some(b(&format!("{i}.{ts}"))))]);
            }
            if i % 7 == 0 {
                s.apply(i * 10 + 4, &[(k, None)]);
            }
        }
        let mut whole = Vec::new();
        assert_eq!(s.copy_latest(None, usize::MAX, &mut whole), Some(b("k49")));
        assert_eq!(whole.len(), 50 - 8, "keys 0, 7, ..., 49 are deleted");
        assert!(whole.contains(&(b("k01"), 13, b("1.3"))));

        let mut pieces = Vec::new();
        let mut after = None;
        let mut n = 0;
        while let Some(k) = s.copy_latest(after.as_ref(), 6, &mut pieces) {
            after = Some(k);
            n += 1;
            // Everything below the last commit collectable: drops old versions and the
            // deleted keys themselves mid-copy.
            s.collect_garbage(1_000);
        }
        assert!(n >= 6, "{n} pieces: 42 live keys, 6 at a time");
        assert_eq!(pieces, whole);
    }

    #[test]
    fn gc_keeps_what_snapshots_at_the_watermark_read() {
        let mut s = Store::new();
        for ts in 1..=10 {
            s.apply(ts * 10, &[(b("k"), Some(b(&ts.to_string())))]);
        }
        s.apply(200, &[(b("gone"), Some(b("v")))]);
        s.apply(210, &[(b("gone"), None)]);
        let before = s.get(b"k", 55);
        assert_eq!(s.collect_garbage(55), 4, "versions 10-40 of k");
        assert_eq!(
            s.get(b"k", 55),
            before,
            "the watermark snapshot reads the same"
        );
        assert_eq!(s.get(b"k", 1000), Some(b("10")));
        assert_eq!(s.stats().versions, 6 + 2);
        // Everything below a high watermark goes, including a deleted key entirely.
        s.collect_garbage(1000);
        assert_eq!(s.stats().keys, 1, "tombstoned key removed");
        assert_eq!(s.stats().versions, 1);
        assert_eq!(s.get(b"k", 1000), Some(b("10")));
    }
}
