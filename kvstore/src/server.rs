//! DKSP for clients: one session per connection, holding at most one open transaction.
//!
//! Inside a transaction, writes are buffered in the session and reads see them on top of the
//! snapshot; `COMMIT` hands them to the engine. Outside one, `GET`/`SCAN`/`PUT`/`DEL` run as a
//! transaction of their own (autocommit). A connection that closes aborts its transaction.
//!
//! Invariants:
//! - **An aborted transaction stays in the way until the client ends it.** When a transaction
//!   ends without the client asking (idle past `--txn-timeout-secs`, its snapshot older than
//!   `--max-snapshot-age-secs`, a write over `--max-txn-bytes` or the server-wide budget, the
//!   kvstore fenced), the session is *aborted*: every command but `COMMIT` (`ABORTED <REASON>`),
//!   `ABORT` (`OK`) and `QUIT` is refused with `ERR NO_TXN`, so a pipelined transaction is never
//!   committed in part as autocommit writes.
//! - A transaction's buffered writes stay within `--max-txn-bytes` and hold a share of the
//!   server-wide budget (see [`crate::limits`]) until the transaction ends; a pipelined
//!   autocommit write holds its share until it is answered, and one session's autocommit
//!   writes waiting for the log stay within `--max-txn-bytes` together (it waits for its own
//!   earlier writes first), so no session holds more than that of the budget.
//! - Only real commands count as activity: blank lines, unparsable lines and over-long lines do
//!   not move the idle deadline.
//! - `SCAN` streams: it reads the range in pages at its snapshot and writes and flushes each page
//!   before reading the next, so the server holds at most one page per scan (plus the socket
//!   buffers), a reader that does not read blocks only its own session, and a long scan yields
//!   the (single) runtime thread between pages. Its snapshot is bounded by the same age limit.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use protocol::handler::{self, Cx, Flow, Handler};
use protocol::hops::{self, Hop};
use protocol::kv::Request;
use protocol::{Connection, ErrorCode, Response, ServerError};

use crate::engine::{Engine, EngineError, Mode, Outcome, Submitted};
use crate::limits::{Limits, Reservation};
use crate::mvcc::Page;
use tokio::sync::oneshot;

/// A scan page holds at most this many keys looked at (live or not)...
const SCAN_PAGE_KEYS: usize = 256;
/// ...and about this many bytes of rows (at least one row).
const SCAN_PAGE_BYTES: usize = 64 * 1024;

struct Txn {
    start_ts: u64,
    /// When the snapshot was taken, for `--max-snapshot-age-secs`.
    began: Instant,
    writes: BTreeMap<Bytes, Option<Bytes>>,
    /// Key + value bytes of `writes` (a delete counts its key).
    bytes: usize,
    /// This transaction's share of the server-wide budget, `bytes` large.
    reservation: Reservation,
}

impl Txn {
    /// When its snapshot becomes too old (`None`: a limit past the clock's range).
    fn old_at(&self, limits: &Limits) -> Option<Instant> {
        self.began.checked_add(limits.max_snapshot_age)
    }

    fn too_old(&self, limits: &Limits) -> bool {
        self.old_at(limits).is_some_and(|at| Instant::now() >= at)
    }
}

/// Why a transaction was aborted under the client: the reason word `COMMIT` answers
/// (`ABORTED <reason>`) and a sentence for people.
#[derive(Debug, Clone)]
struct Aborted {
    reason: &'static str,
    why: String,
}

pub struct Session {
    engine: Arc<Engine>,
    limits: Arc<Limits>,
    txn: Option<Txn>,
    /// Set when a transaction ended without the client asking; cleared by `COMMIT`/`ABORT`.
    aborted: Option<Aborted>,
    /// When the last command arrived (blank and bad lines are not commands).
    last_command: Instant,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(t) = self.txn.take() {
            self.engine.end_snapshot(t.start_ts);
        }
    }
}

fn engine_err(e: EngineError) -> Response {
    match e {
        EngineError::Unavailable(m) => Response::err(ErrorCode::Unavailable, m),
        e @ EngineError::Fenced(_) => Response::err(ErrorCode::Fenced, e.to_string()),
        EngineError::TooLarge(m) => Response::err(ErrorCode::TooLarge, m),
    }
}

/// Bytes a write counts against `--max-txn-bytes`: its key plus its value plus
/// [`crate::limits::WRITE_OVERHEAD`], so that many tiny writes cannot make a log entry that
/// quoting blows past the log's line limit.
fn write_size(key: &[u8], value: Option<&Bytes>) -> usize {
    key.len()
        .saturating_add(value.map_or(0, Bytes::len))
        .saturating_add(crate::limits::WRITE_OVERHEAD)
}

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
    pub fn new(engine: Arc<Engine>, limits: Arc<Limits>) -> Session {
        Session {
            engine,
            limits,
            txn: None,
            aborted: None,
            last_command: Instant::now(),
        }
    }

    fn end_txn(&mut self) {
        if let Some(t) = self.txn.take() {
            self.engine.end_snapshot(t.start_ts);
        }
    }

    /// Ends the open transaction on the server's initiative; the session refuses commands
    /// until the client sends `COMMIT` or `ABORT`.
    fn abort_txn(&mut self, reason: &'static str, why: impl Into<String>) {
        let why = why.into();
        tracing::debug!("aborting a transaction: {reason}: {why}");
        self.end_txn();
        self.aborted = Some(Aborted { reason, why });
    }

    /// When the open transaction must be aborted if no command comes: idle past the timeout
    /// (from the last real command) or its snapshot too old, whichever is first.
    pub fn deadline(&self) -> Option<Instant> {
        let t = self.txn.as_ref()?;
        // A limit too large to add to a clock reading is no limit.
        let idle = self.last_command.checked_add(self.limits.idle_timeout);
        match (idle, t.old_at(&self.limits)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn too_old_why(&self) -> String {
        format!(
            "its snapshot is older than {} s (--max-snapshot-age-secs)",
            self.limits.max_snapshot_age.as_secs()
        )
    }

    /// The deadline passed with no command: abort as `TOO_OLD` or `TIMEOUT`.
    pub fn expire(&mut self) {
        let Some(t) = &self.txn else { return };
        if t.too_old(&self.limits) {
            let why = self.too_old_why();
            self.abort_txn("TOO_OLD", why);
        } else {
            let why = format!(
                "idle for over {} s (--txn-timeout-secs)",
                self.limits.idle_timeout.as_secs()
            );
            self.abort_txn("TIMEOUT", why);
        }
    }

    /// Aborts the open transaction if it can no longer commit: too old, or the kvstore fenced.
    fn check_txn(&mut self) {
        let Some(t) = &self.txn else { return };
        if t.too_old(&self.limits) {
            let why = self.too_old_why();
            self.abort_txn("TOO_OLD", why);
            return;
        }
        match self.engine.check_serving() {
            Ok(()) => {}
            Err(e @ EngineError::Fenced(_)) => self.abort_txn("FENCED", e.to_string()),
            Err(EngineError::Unavailable(m)) => self.abort_txn("UNAVAILABLE", m),
            Err(EngineError::TooLarge(m)) => self.abort_txn("TOO_LARGE", m),
        }
    }

    /// Runs one request, writing its reply lines to `conn` (a `SCAN` flushes them page by
    /// page). An error means the connection is gone.
    pub async fn execute(&mut self, req: Request, conn: &mut Connection) -> io::Result<()> {
        self.last_command = Instant::now();
        self.check_txn();
        if let Some(a) = &self.aborted {
            let r = match req {
                Request::Commit => {
                    let r = Response::Aborted(vec![Bytes::from_static(a.reason.as_bytes())]);
                    self.aborted = None;
                    r
                }
                Request::Abort => {
                    self.aborted = None;
                    Response::ok()
                }
                Request::Quit => Response::ok(),
                _ => Response::err(
                    ErrorCode::NoTxn,
                    format!(
                        "current transaction is aborted ({}: {}); end it with COMMIT or ABORT",
                        a.reason, a.why
                    ),
                ),
            };
            conn.write_response(&r);
            return Ok(());
        }
        let r = match req {
            Request::Scan { start, end, limit } => {
                let r = self.scan(conn, start, end, limit).await;
                // A session streaming a long scan to a slow reader was busy, not idle: the idle
                // time counts from when the scan was sent, or a scan longer than the timeout
                // would abort its transaction the moment it ended.
                self.last_command = Instant::now();
                return r;
            }
            Request::Ping => Response::Pong,
            Request::Quit => Response::ok(),
            Request::Status => self.status(),
            Request::Hops => {
                hops::reply().iter().for_each(|l| conn.write_response(l));
                return Ok(());
            }
            Request::Begin => self.begin().await,
            Request::Abort => match self.txn {
                Some(_) => {
                    self.end_txn();
                    Response::ok()
                }
                None => Response::err(ErrorCode::NoTxn, "no transaction is open"),
            },
            Request::Commit => self.commit().await,
            Request::Get { key } => self.get(key).await,
            Request::Put { key, value } => self.write(key, Some(value)).await,
            Request::Del { key } => self.write(key, None).await,
        };
        conn.write_response(&r);
        Ok(())
    }

    async fn begin(&mut self) -> Response {
        if self.txn.is_some() {
            return Response::err(ErrorCode::TxnActive, "a transaction is already open");
        }
        match self.engine.begin().await {
            Ok(s) => {
                self.txn = Some(Txn {
                    start_ts: s,
                    began: Instant::now(),
                    writes: BTreeMap::new(),
                    bytes: 0,
                    reservation: self.limits.budget.reserve(),
                });
                Response::Ok(vec![Bytes::from(s.to_string())])
            }
            Err(e) => {
                // A pipelining client sends its PUTs right behind the BEGIN: were they run as
                // autocommit writes once the store serves again, part of the transaction would
                // commit. So a failed BEGIN opens an aborted block, ended by COMMIT or ABORT.
                let (reason, why) = match &e {
                    EngineError::Fenced(_) => ("FENCED", e.to_string()),
                    EngineError::Unavailable(m) | EngineError::TooLarge(m) => {
                        ("UNAVAILABLE", m.clone())
                    }
                };
                self.aborted = Some(Aborted {
                    reason,
                    why: format!("BEGIN failed: {why}"),
                });
                match engine_err(e) {
                    Response::Err(mut err) => {
                        err.message
                            .push_str("; the transaction block is aborted: end it with ABORT");
                        Response::Err(err)
                    }
                    r => r,
                }
            }
        }
    }

    async fn commit(&mut self) -> Response {
        let t_recv = hops::now_if_on();
        let Some(txn) = self.txn.take() else {
            return Response::err(ErrorCode::NoTxn, "no transaction is open");
        };
        let Txn {
            start_ts: start,
            writes,
            reservation,
            ..
        } = txn;
        let result = if writes.is_empty() {
            // Read-only: nothing to make durable.
            Ok(Outcome::Committed(start))
        } else {
            self.engine
                .commit(Some(start), writes.into_iter().collect())
                .await
        };
        self.engine.end_snapshot(start);
        // The writes were held (as the commit record) until now: only now is the budget free.
        drop(reservation);
        match result {
            Ok(Outcome::Committed(ts)) => {
                // A COMMIT's reply is marked when ready: the connection loop flushes it.
                if hops::sampled(ts) {
                    hops::mark_at(Hop::KvRecv, ts, 0, t_recv);
                    hops::mark(Hop::KvReply, ts, 0);
                }
                Response::Committed(ts)
            }
            Ok(Outcome::Conflict(key)) => {
                Response::Aborted(vec![Bytes::from_static(b"CONFLICT"), key])
            }
            // The log refused the entry: certainly not committed.
            Err(EngineError::TooLarge(_)) => {
                Response::Aborted(vec![Bytes::from_static(b"TOO_LARGE")])
            }
            Err(e) => engine_err(e),
        }
    }

    async fn get(&mut self, key: Bytes) -> Response {
        if let Some(t) = &self.txn {
            if let Some(w) = t.writes.get(&key) {
                return w.clone().map_or(Response::Nil, Response::Value);
            }
            let v = self.engine.get(&key, t.start_ts).await;
            return v.map_or(Response::Nil, Response::Value);
        }
        match self.engine.begin().await {
            Ok(s) => {
                let v = self.engine.get(&key, s).await;
                self.engine.end_snapshot(s);
                v.map_or(Response::Nil, Response::Value)
            }
            Err(e) => engine_err(e),
        }
    }

    /// A line refused as too large (over `--max-line`, or a key over its limit) is almost
    /// surely a `PUT`: inside a transaction it aborts the transaction, as a write over
    /// `--max-txn-bytes` does, so a pipelined `COMMIT` cannot commit the others without it.
    fn refused_line(&mut self, r: Response) -> Response {
        let (true, Response::Err(e)) = (self.txn.is_some(), &r) else {
            return r;
        };
        let why = format!("a request was refused: {}", e.message);
        let r = Response::err(
            e.code,
            format!(
                "{}; the transaction is aborted, end it with COMMIT or ABORT",
                e.message
            ),
        );
        self.abort_txn("TOO_LARGE", why);
        r
    }

    /// The reply to an autocommit write over `--max-txn-bytes`, if it is.
    fn autocommit_too_large(&self, key: &[u8], value: Option<&Bytes>) -> Option<Response> {
        let size = write_size(key, value);
        (size > self.limits.max_txn_bytes).then(|| {
            Response::err(
                ErrorCode::TooLarge,
                format!(
                    "write of {size} bytes (key + value) is over the limit of {} bytes (--max-txn-bytes)",
                    self.limits.max_txn_bytes
                ),
            )
        })
    }

    async fn write(&mut self, key: Bytes, value: Option<Bytes>) -> Response {
        let Some(t) = &mut self.txn else {
            if let Some(r) = self.autocommit_too_large(&key, value.as_ref()) {
                return r;
            }
            // Autocommit: a blind write, which never conflicts (see Engine::commit).
            return match self.engine.commit(None, vec![(key, value)]).await {
                Ok(_) => Response::ok(),
                Err(e) => engine_err(e),
            };
        };
        let old = t
            .writes
            .get(&key)
            .map_or(0, |v| write_size(&key, v.as_ref()));
        let total = t
            .bytes
            .saturating_sub(old)
            .saturating_add(write_size(&key, value.as_ref()));
        let max = self.limits.max_txn_bytes;
        if total > max {
            let why = format!(
                "its writes would total {total} bytes (keys + values), over the limit of {max} bytes (--max-txn-bytes)"
            );
            let r = Response::err(
                ErrorCode::TooLarge,
                format!("{why}; the transaction is aborted, end it with COMMIT or ABORT"),
            );
            self.abort_txn("TOO_LARGE", why);
            return r;
        }
        if !t.reservation.resize(total) {
            let why = format!(
                "the server's budget for buffered transaction writes ({} bytes, --max-buffered-mib) is used up",
                self.limits.budget.limit()
            );
            let r = Response::err(
                ErrorCode::Unavailable,
                format!("{why}; the transaction is aborted, end it with COMMIT or ABORT and retry later"),
            );
            self.abort_txn("UNAVAILABLE", why);
            return r;
        }
        t.writes.insert(key, value);
        t.bytes = total;
        Response::ok()
    }

    /// Streams `SCAN` (see the module header): pages at the snapshot, the transaction's own
    /// writes merged in, each page flushed before the next is read.
    async fn scan(
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

    fn status(&self) -> Response {
        let crate::engine::Positions {
            applied,
            epoch,
            open,
            inflight,
        } = self.engine.positions();
        let crate::mvcc::StoreStats {
            keys,
            versions,
            bytes,
        } = self
            .engine
            .store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .stats();
        let state = match self.engine.mode() {
            Mode::Starting => "starting".to_string(),
            Mode::Replaying { done, total } => format!("replaying replay={done}/{total}"),
            Mode::Serving => "serving".to_string(),
            Mode::Fenced(crate::engine::UNKNOWN_EPOCH) => "fenced fenced_by=unknown".to_string(),
            Mode::Fenced(by) => format!("fenced fenced_by={by}"),
        };
        let mut pairs = vec![("role".to_string(), "kvstore".to_string())];
        let mut parts = state.split(' ');
        pairs.push(("state".into(), parts.next().unwrap_or_default().to_string()));
        for p in parts {
            if let Some((k, v)) = p.split_once('=') {
                pairs.push((k.into(), v.into()));
            }
        }
        pairs.extend([
            ("applied".into(), applied.to_string()),
            ("epoch".into(), epoch.to_string()),
            ("keys".into(), keys.to_string()),
            ("versions".into(), versions.to_string()),
            ("bytes".into(), bytes.to_string()),
            ("open_txns".into(), open.to_string()),
            ("inflight_commits".into(), inflight.to_string()),
            (
                "commits".into(),
                self.engine
                    .commits
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .to_string(),
            ),
            (
                "checkpointing".into(),
                u8::from(self.engine.checkpointing()).to_string(),
            ),
            (
                "buffered_bytes".into(),
                self.limits.budget.used().to_string(),
            ),
        ]);
        Response::status(&pairs)
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

fn write_reply(r: Result<Result<(), EngineError>, oneshot::error::RecvError>) -> Response {
    match r {
        Ok(Ok(())) => Response::ok(),
        Ok(Err(e)) => engine_err(e),
        Err(_) => Response::err(ErrorCode::Unavailable, "committer stopped"),
    }
}

/// The kvstore's part of the shared connection loop ([`protocol::handler`]). Autocommit
/// `PUT`/`DEL`s are pipelined: they are queued to the log at once and their `OK`s go out in
/// order as the log acknowledges them. Any other request first waits for those, so a session
/// always reads its own writes.
impl Handler for Session {
    type Request = Request;

    fn refused(&mut self, e: ServerError) -> Response {
        match e.code {
            // An over-long line or a key over its limit: a refused write.
            ErrorCode::TooLarge => self.refused_line(Response::Err(e)),
            _ => Response::Err(e),
        }
    }

    /// With a transaction open, waiting for its next command ends at its deadline; without
    /// one, a session waits as long as it likes.
    fn deadline(&self) -> Option<Instant> {
        Session::deadline(self)
    }

    fn expired(&mut self) {
        self.expire();
    }

    async fn dispatch(&mut self, req: Request, cx: &mut Cx<'_>) -> io::Result<Flow> {
        // Never while aborted: the writes of an aborted transaction must not run as autocommit.
        let autocommit_write = self.txn.is_none()
            && self.aborted.is_none()
            && matches!(req, Request::Put { .. } | Request::Del { .. });
        if autocommit_write {
            let write = match req {
                Request::Put { key, value } => (key, Some(value)),
                Request::Del { key } => (key, None),
                _ => return Ok(Flow::Continue),
            };
            self.pipelined_write(write, cx).await;
            return Ok(Flow::Continue);
        }
        cx.settle().await;
        let quit = matches!(req, Request::Quit);
        self.execute(req, cx.conn).await?;
        Ok(if quit { Flow::Close } else { Flow::Continue })
    }
}

impl Session {
    /// Queues an autocommit write to the log; its reply waits in `cx`'s queue.
    async fn pipelined_write(&mut self, write: (Bytes, Option<Bytes>), cx: &mut Cx<'_>) {
        let t_recv = hops::now_if_on();
        if let Some(r) = self.autocommit_too_large(&write.0, write.1.as_ref()) {
            cx.reply(r);
            return;
        }
        // Writes waiting for the log count against the budget too (a pipelining client
        // could otherwise queue `handler::MAX_PIPELINE` large values); when it is short, this
        // session's own writes are waited for first, which is backpressure, not an error.
        let size = write_size(&write.0, write.1.as_ref());
        // One session holds at most --max-txn-bytes of writes in the log at once, as an
        // open transaction does, so one pipelining client cannot take the whole budget
        // from everyone's transactions; past it, it waits for its own writes first.
        if cx.replies.held().saturating_add(size) > self.limits.max_txn_bytes {
            cx.settle().await;
        }
        let mut share = self.limits.budget.reserve();
        if !share.resize(size) && cx.replies.waiting() > 0 {
            cx.settle().await;
        }
        if share.bytes() != size && !share.resize(size) {
            cx.reply(Response::err(
                ErrorCode::Unavailable,
                format!(
                    "the server's budget for buffered writes ({} bytes, --max-buffered-mib) is used up; retry later",
                    self.limits.budget.limit()
                ),
            ));
            return;
        }
        match self.engine.submit(None, vec![write]).await {
            Ok(Submitted::Queued(ts, rx)) => {
                let held = share.bytes();
                // `--trace-hops`: a sampled write is marked from when its request was taken up
                // to when its reply is ready (the connection loop flushes it right after).
                let traced = hops::sampled(ts);
                if traced {
                    hops::mark_at(Hop::KvRecv, ts, 0, t_recv);
                }
                // The write holds its share of the budget until it is answered.
                cx.reply_later(
                    Box::pin(async move {
                        let r = write_reply(rx.await);
                        if traced {
                            hops::mark(Hop::KvReply, ts, 0);
                        }
                        drop(share);
                        r
                    }),
                    held,
                );
            }
            // Blind writes never conflict; answer as a commit would, to be safe.
            Ok(Submitted::Conflict(_)) => cx.reply(Response::err(
                ErrorCode::Unavailable,
                "conflict on a blind write; retry",
            )),
            Err(e) => cx.reply(engine_err(e)),
        }
    }
}

/// Serves one connection until it closes, sends `QUIT`, or the server shuts down.
pub async fn handle(
    conn: Connection,
    engine: Arc<Engine>,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
) {
    handler::run(conn, Session::new(engine, limits), shutdown).await
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
