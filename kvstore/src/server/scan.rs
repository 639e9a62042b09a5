//! `SCAN`, streamed: the range is read in pages at the snapshot and each page is written and
//! flushed before the next is read (see the session's module header for why).
//!
//! Invariant: the pages of one scan together are exactly the snapshot's rows of the range with
//! the transaction's own writes on top, in key order and cut at `LIMIT` ([`ScanCursor`]); the
//! snapshot of an autocommit scan is registered for as long as the scan runs
//! ([`SnapshotGuard`]) and is bounded by `--max-snapshot-age-secs` as a transaction's is.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use tokio::time::Instant;

use protocol::{Connection, ErrorCode, Response};

use super::{engine_err, Session};
use crate::engine::{Engine, EngineError};
use crate::mvcc::Page;

/// A scan page holds at most this many keys looked at (live or not)...
const SCAN_PAGE_KEYS: usize = 256;
/// ...and about this many bytes of rows (at least one row).
const SCAN_PAGE_BYTES: usize = 64 * 1024;

/// Ends an autocommit read's snapshot however the read ends (an error, a dropped connection).
struct SnapshotGuard<'a> {
    engine: &'a Engine,
    ts: u64,
}

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        self.engine.end_snapshot(self.ts);
    }
}

impl Session {
    /// Streams `SCAN` (see the module header): pages at the snapshot, the transaction's own
    /// writes merged in, each page flushed before the next is read.
    pub(super) async fn scan(
        &mut self,
        conn: &mut Connection,
        start: Bytes,
        end: Bytes,
        limit: Option<u64>,
    ) -> io::Result<()> {
        let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        let engine = self.engine.clone();
        let max_age = self.limits.max_snapshot_age;
        let ended = match &self.txn {
            Some(t) => {
                let deadline = t.old_at(&self.limits);
                stream_scan(
                    &engine,
                    conn,
                    t.start_ts,
                    deadline,
                    Some(&t.writes),
                    start,
                    end,
                    limit,
                )
                .await?
            }
            None => {
                let s = match engine.begin().await {
                    Ok(s) => s,
                    Err(e) => {
                        conn.write_response(&engine_err(e));
                        return Ok(());
                    }
                };
                let _snapshot = SnapshotGuard {
                    engine: &engine,
                    ts: s,
                };
                let deadline = Instant::now().checked_add(max_age);
                stream_scan(&engine, conn, s, deadline, None, start, end, limit).await?
            }
        };
        let msg = match ended {
            ScanEnd::Done => return Ok(()),
            ScanEnd::TooOld(rows) => {
                let why = self.too_old_why();
                if self.txn.is_some() {
                    self.abort_txn("TOO_OLD", why.clone());
                }
                (ErrorCode::Unavailable, format!("SCAN stopped after {rows} rows: {why}; read faster or scan a smaller range"))
            }
            ScanEnd::NotServing(rows, e) => {
                let r = engine_err(e);
                let Response::Err(e) = r else { return Ok(()) };
                if self.txn.is_some() {
                    let reason = if e.code == ErrorCode::Fenced {
                        "FENCED"
                    } else {
                        "UNAVAILABLE"
                    };
                    self.abort_txn(reason, e.message.clone());
                }
                (
                    e.code,
                    format!("SCAN stopped after {rows} rows: {}", e.message),
                )
            }
        };
        conn.write_response(&Response::err(msg.0, msg.1));
        Ok(())
    }
}

/// How a streamed scan ended, with the rows sent before it stopped.
enum ScanEnd {
    /// Every row and `END` sent.
    Done,
    /// The snapshot passed `--max-snapshot-age-secs` before the scan was done.
    TooOld(usize),
    /// The kvstore stopped serving (fenced) mid-scan.
    NotServing(usize, EngineError),
}

/// Where a paged scan of `[start, end)` is and how many rows it may still send. Each page
/// covers the keys from `from` up to the page's last key looked at (or to `end`), and the
/// transaction's own writes over exactly those keys are merged into it, so the pages together
/// are exactly the snapshot with the own writes on top, in order.
struct ScanCursor {
    from: Bound<Bytes>,
    end: Bytes,
    remaining: usize,
    done: bool,
}

impl ScanCursor {
    fn new(start: Bytes, end: Bytes, limit: usize) -> ScanCursor {
        ScanCursor {
            done: start >= end || limit == 0,
            from: Bound::Included(start),
            end,
            remaining: limit,
        }
    }

    /// Where the next page starts, as the store takes it.
    fn from(&self) -> Bound<&[u8]> {
        match &self.from {
            Bound::Included(k) => Bound::Included(&k[..]),
            Bound::Excluded(k) => Bound::Excluded(&k[..]),
            Bound::Unbounded => Bound::Unbounded,
        }
    }

    /// Takes a page read from `from()`, merges `own` writes over the same keys, and moves on:
    /// returns the rows to send.
    fn advance(
        &mut self,
        page: Page,
        own: Option<&BTreeMap<Bytes, Option<Bytes>>>,
    ) -> Vec<(Bytes, Bytes)> {
        let upper = match &page.more_after {
            Some(k) => Bound::Included(k.clone()),
            None => Bound::Excluded(self.end.clone()),
        };
        let mut rows = page.rows;
        if let Some(own) = own {
            let mut mine = own.range::<Bytes, _>((self.from.clone(), upper)).peekable();
            if mine.peek().is_some() {
                let mut merged: BTreeMap<Bytes, Bytes> = rows.into_iter().collect();
                for (k, v) in mine {
                    match v {
                        Some(v) => merged.insert(k.clone(), v.clone()),
                        None => merged.remove(k),
                    };
                }
                rows = merged.into_iter().collect();
            }
        }
        rows.truncate(self.remaining);
        self.remaining -= rows.len();
        match page.more_after {
            Some(k) => self.from = Bound::Excluded(k),
            None => self.done = true,
        }
        if self.remaining == 0 {
            self.done = true;
        }
        rows
    }
}

/// Sends the rows of `[start, end)` at snapshot `s` (registered by the caller), page by page,
/// then `END`, unless the snapshot passes `deadline` (its age limit) first.
#[allow(clippy::too_many_arguments)]
async fn stream_scan(
    engine: &Engine,
    conn: &mut Connection,
    s: u64,
    deadline: Option<Instant>,
    own: Option<&BTreeMap<Bytes, Option<Bytes>>>,
    start: Bytes,
    end: Bytes,
    limit: usize,
) -> io::Result<ScanEnd> {
    if start < end {
        engine.wait_range(&start, &end, s).await;
    }
    let mut cursor = ScanCursor::new(start, end, limit);
    let mut sent = 0usize;
    loop {
        if cursor.done {
            conn.write_response(&Response::End);
            return Ok(ScanEnd::Done);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(ScanEnd::TooOld(sent));
        }
        if let Err(e) = engine.check_serving() {
            return Ok(ScanEnd::NotServing(sent, e));
        }
        let page = engine.scan_page(
            cursor.from(),
            &cursor.end,
            s,
            SCAN_PAGE_KEYS,
            SCAN_PAGE_BYTES,
        );
        let rows = cursor.advance(page, own);
        sent += rows.len();
        for (k, v) in rows {
            conn.write_response(&Response::Kv(k, v));
        }
        if cursor.done {
            // The last page goes out with END, in the ordinary flush.
            continue;
        }
        // Flush each page before reading the next: a reader that does not read holds up only
        // this session, and only until its snapshot is too old (the flush is cancel-safe).
        let flushed = match deadline {
            Some(d) => tokio::time::timeout_at(d, conn.flush()).await,
            None => Ok(conn.flush().await),
        };
        match flushed {
            Ok(r) => r?,
            Err(_too_old) => continue,
        }
        // One runtime thread serves every client: let the others in between pages.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::Store;

    /// What a scan returned before it streamed: the whole snapshot range, own writes on top.
    fn reference(
        store: &Store,
        own: &BTreeMap<Bytes, Option<Bytes>>,
        start: &[u8],
        end: &[u8],
        s: u64,
        limit: usize,
    ) -> Vec<(Bytes, Bytes)> {
        if start >= end {
            return Vec::new();
        }
        let mut merged: BTreeMap<Bytes, Bytes> =
            store.scan(start, end, s, usize::MAX).into_iter().collect();
        for (k, v) in own.range::<[u8], _>((Bound::Included(start), Bound::Excluded(end))) {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        merged.into_iter().take(limit).collect()
    }

    fn paged(
        store: &Store,
        own: Option<&BTreeMap<Bytes, Option<Bytes>>>,
        start: &[u8],
        end: &[u8],
        s: u64,
        limit: usize,
        (page_keys, page_bytes): (usize, usize),
    ) -> Vec<(Bytes, Bytes)> {
        let mut cursor = ScanCursor::new(
            Bytes::copy_from_slice(start),
            Bytes::copy_from_slice(end),
            limit,
        );
        let mut out = Vec::new();
        let mut pages = 0;
        while !cursor.done {
            let page = store.scan_page(cursor.from(), &cursor.end, s, page_keys, page_bytes);
            out.extend(cursor.advance(page, own));
            pages += 1;
            assert!(pages < 10_000, "the scan does not end");
        }
        out
    }

    /// A small deterministic generator, so a failure names its case.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    fn key(i: u64) -> Bytes {
        Bytes::from(format!("k{i:02}"))
    }

    /// Pages of every size, over stores with several versions and tombstones per key, with
    /// own puts and deletes inside and outside the range and any LIMIT, return exactly what
    /// one whole scan with the own writes merged returned.
    #[test]
    fn a_paged_scan_returns_exactly_what_a_whole_scan_did() {
        for case in 0..600u64 {
            let mut rng = Lcg(case);
            let mut store = Store::new();
            for ts in 1..=rng.next(80) + 1 {
                let k = key(rng.next(40));
                let v = (rng.next(4) > 0)
                    .then(|| Bytes::from(format!("v{ts}").repeat(1 + rng.next(3) as usize)));
                store.apply(ts * 10, &[(k, v)]);
            }
            let mut own = BTreeMap::new();
            for _ in 0..rng.next(12) {
                let v = (rng.next(3) > 0).then(|| Bytes::from(format!("own{}", rng.next(100))));
                own.insert(key(rng.next(40)), v);
            }
            let (a, b) = (rng.next(42), rng.next(42));
            let (start, end) = (key(a.min(b)), key(a.max(b)));
            let start = if rng.next(5) == 0 {
                Bytes::new()
            } else {
                start
            };
            let s = rng.next(900) + 1;
            let limit = match rng.next(3) {
                0 => usize::MAX,
                _ => rng.next(20) as usize,
            };
            let page_keys = 1 + rng.next(6) as usize;
            let page_bytes = 1 + rng.next(40) as usize;
            let want = reference(&store, &own, &start, &end, s, limit);
            let got = paged(
                &store,
                Some(&own),
                &start,
                &end,
                s,
                limit,
                (page_keys, page_bytes),
            );
            assert_eq!(got, want, "case {case}: [{start:?}, {end:?}) at {s}, limit {limit}, pages of {page_keys} keys / {page_bytes} bytes");
            let no_own = reference(&store, &BTreeMap::new(), &start, &end, s, limit);
            let got = paged(
                &store,
                None,
                &start,
                &end,
                s,
                limit,
                (page_keys, page_bytes),
            );
            assert_eq!(got, no_own, "case {case} without own writes");
        }
    }

    #[test]
    fn a_scan_page_stops_at_its_key_and_byte_bounds() {
        let mut store = Store::new();
        for i in 0..10 {
            store.apply(10 + i, &[(key(i), Some(Bytes::from("0123456789")))]);
        }
        store.apply(100, &[(key(3), None)]);
        let page = store.scan_page(Bound::Included(&b"k"[..]), b"l", 1000, 4, usize::MAX);
        assert_eq!(page.rows.len(), 3, "4 keys looked at, one deleted");
        assert_eq!(page.more_after, Some(key(3)));
        let page = store.scan_page(Bound::Excluded(&b"k03"[..]), b"l", 1000, 100, 25);
        assert_eq!(page.rows.len(), 2, "two rows of 13 bytes reach 25");
        assert_eq!(page.more_after, Some(key(5)));
        let page = store.scan_page(Bound::Excluded(&b"k09"[..]), b"l", 1000, 100, 25);
        assert_eq!(
            page,
            Page {
                rows: vec![],
                more_after: None
            }
        );
        let page = store.scan_page(Bound::Excluded(&b"l"[..]), b"l", 1000, 100, 25);
        assert_eq!(page.more_after, None, "an empty range is one empty page");
    }
}
