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
//!   (The paging is in `server/scan.rs`.)
//! - **Who may do what is decided before a request runs** (`server/auth.rs`): protected mode
//!   before the session exists, then `NOAUTH` until `AUTH` succeeds, then `DENIED` for a key
//!   outside the user's grants (a denied write inside a transaction aborts it, as a write over
//!   `--max-txn-bytes` does, so a pipelined `COMMIT` never commits the transaction without it;
//!   a denied read is refused alone) and for `STATUS`/`HOPS` without the admin right.
//! - One home per behaviour: [`Session::execute`] takes every request; `Session::write` alone
//!   tells a transaction's buffered write from an autocommit one, and an autocommit write is a
//!   blind submit, which has no snapshot and so no conflict to answer.

use bytes::Bytes;
use std::io;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use protocol::handler::{self, Cx, Flow, Handler};
use protocol::hops::{self, Hop};
use protocol::kv::Request;
use protocol::{token, Connection, ErrorCode, Response, ServerError};

use crate::engine::{Engine, EngineError, Mode, Outcome};
use crate::limits::Limits;
use tokio::sync::oneshot;

mod auth;
mod scan;
mod txn;

pub use auth::{admits, AuthConfig, ClientAuth, PROTECTED_MESSAGE, WRONGPASS_MESSAGE};
use auth::{AuthOutcome, Gate, Refusal};
use txn::{write_size, Txn};

/// Why a transaction was aborted under the client: the reason word `COMMIT` answers
/// (`ABORTED <reason>`) and a sentence for people.
#[derive(Debug, Clone)]
struct Aborted {
    reason: &'static str,
    why: String,
}

/// One client connection's state: the open transaction, if any, and why the last one was aborted
/// under the client.
pub struct Session {
    engine: Arc<Engine>,
    limits: Arc<Limits>,
    txn: Option<Txn>,
    /// Set when a transaction ended without the client asking; cleared by `COMMIT`/`ABORT`.
    aborted: Option<Aborted>,
    /// When the last command arrived (blank and bad lines are not commands).
    last_command: Instant,
    /// Who the connection is and what it may do.
    gate: Gate,
    /// Set when the connection must close after this request's reply (too many failed AUTHs).
    closing: bool,
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

impl Session {
    /// A session with no transaction open, for a client at `peer`, unauthenticated.
    pub fn new(
        engine: Arc<Engine>,
        limits: Arc<Limits>,
        auth: Arc<ClientAuth>,
        peer: Option<std::net::SocketAddr>,
    ) -> Session {
        Session {
            engine,
            limits,
            txn: None,
            aborted: None,
            last_command: Instant::now(),
            gate: Gate::new(auth, peer),
            closing: false,
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

    /// Runs one request, answering it through `cx`. A write is buffered in the open
    /// transaction or, outside one, pipelined as autocommit (`Session::write`); any other
    /// request first waits for the replies queued before it, so a session always reads its own
    /// writes. A `SCAN` flushes its rows page by page. An error means the connection is gone.
    pub async fn execute(&mut self, req: Request, cx: &mut Cx<'_>) -> io::Result<()> {
        self.last_command = Instant::now();
        self.check_txn();
        if !matches!(req, Request::Put { .. } | Request::Del { .. }) {
            cx.settle().await;
        }
        if self.gate.refresh() {
            // Back to unauthenticated: the session is as new. Its transaction goes (nothing of
            // it was written), or it could neither end it (NOAUTH) nor AUTH (TXN_ACTIVE).
            self.end_txn();
            self.aborted = None;
        }
        // No session with users but no AUTH can have a transaction, so NOAUTH comes first.
        if self.gate.user.is_none() {
            if let Some(Refusal::Read(r)) = self.gate.refuse(&req) {
                cx.reply(r);
                return Ok(());
            }
        }
        if let Some(a) = &self.aborted {
            // Never a write: the writes of an aborted transaction must not run as autocommit.
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
            cx.reply(r);
            return Ok(());
        }
        match self.gate.refuse(&req) {
            None => {}
            Some(Refusal::Read(r)) => {
                cx.reply(r);
                return Ok(());
            }
            Some(Refusal::Write(key)) => {
                let r = self.denied_write(&key);
                cx.reply(r);
                return Ok(());
            }
        }
        let r = match req {
            Request::Put { key, value } => {
                self.write(key, Some(value), cx).await;
                return Ok(());
            }
            Request::Del { key } => {
                self.write(key, None, cx).await;
                return Ok(());
            }
            Request::Scan { start, end, limit } => {
                // Settled above: the rows go straight to the connection.
                let r = self.scan(cx.conn, start, end, limit).await;
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
                cx.reply_lines(hops::reply());
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
            Request::Auth { user, password } => self.auth(user, password.0).await,
        };
        cx.reply(r);
        Ok(())
    }

    /// `AUTH`: refused without users and inside a transaction (its writes were checked
    /// against the user it began as); otherwise one password check (see `server/auth.rs`).
    async fn auth(&mut self, user: Bytes, password: Bytes) -> Response {
        let auth = self.gate.auth.clone();
        let Some(config) = &auth.users else {
            return Response::err(
                ErrorCode::Rejected,
                "no users are configured (--users), so there is nothing to AUTH as",
            );
        };
        if self.txn.is_some() {
            return Response::err(
                ErrorCode::TxnActive,
                "AUTH inside a transaction; end it with COMMIT or ABORT first",
            );
        }
        match self.gate.auth(config, user, password).await {
            AuthOutcome::Answer(r) => r,
            AuthOutcome::Close(r) => {
                self.closing = true;
                r
            }
        }
    }

    /// A `PUT`/`DEL` of a key the user may not write: refused, and inside a transaction the
    /// transaction is aborted (see the module header).
    fn denied_write(&mut self, key: &[u8]) -> Response {
        if self.txn.is_none() {
            return auth::denied(key, "no write permission");
        }
        let shown = token::display(key);
        self.abort_txn("DENIED", format!("no write permission on {shown}"));
        auth::denied(
            key,
            "no write permission; the transaction is aborted, end it with COMMIT or ABORT",
        )
    }

    async fn begin(&mut self) -> Response {
        if self.txn.is_some() {
            return Response::err(ErrorCode::TxnActive, "a transaction is already open");
        }
        match self.engine.begin().await {
            Ok(s) => {
                self.txn = Some(Txn::new(s, self.limits.budget.reserve()));
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
                .commit(start, writes.into_iter().collect())
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

    /// `PUT`/`DEL`: buffered in the open transaction, or else an autocommit write, pipelined.
    /// The one place that tells the two apart.
    async fn write(&mut self, key: Bytes, value: Option<Bytes>, cx: &mut Cx<'_>) {
        let Some(t) = &mut self.txn else {
            return self.autocommit_write(key, value, cx).await;
        };
        let r = match t.buffer(&self.limits, key, value) {
            Ok(()) => Response::ok(),
            Err(refused) => {
                let r = Response::err(
                    refused.code,
                    format!(
                        "{}; the transaction is aborted, end it with COMMIT or ABORT{}",
                        refused.why, refused.then
                    ),
                );
                self.abort_txn(refused.reason, refused.why);
                r
            }
        };
        cx.reply(r);
    }

    /// Queues an autocommit write to the log; its reply waits in `cx`'s queue, so the session
    /// reads on while the log makes it durable.
    async fn autocommit_write(&mut self, key: Bytes, value: Option<Bytes>, cx: &mut Cx<'_>) {
        let t_recv = hops::now_if_on();
        let size = write_size(&key, value.as_ref());
        let max = self.limits.max_txn_bytes;
        if size > max {
            cx.reply(Response::err(
                ErrorCode::TooLarge,
                format!(
                    "write of {size} bytes (key + value) is over the limit of {max} bytes (--max-txn-bytes)"
                ),
            ));
            return;
        }
        // Writes waiting for the log count against the budget too (a pipelining client
        // could otherwise queue `handler::MAX_PIPELINE` large values); when it is short, this
        // session's own writes are waited for first, which is backpressure, not an error.
        // One session holds at most --max-txn-bytes of writes in the log at once, as an
        // open transaction does, so one pipelining client cannot take the whole budget
        // from everyone's transactions; past it, it waits for its own writes first.
        if cx.replies.held().saturating_add(size) > max {
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
        // A blind write: it reads nothing, so it has no snapshot to conflict with.
        match self.engine.submit_blind(vec![(key, value)]).await {
            Ok(crate::engine::Queued { ts, durable }) => {
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
                        let r = write_reply(durable.await);
                        if traced {
                            hops::mark(Hop::KvReply, ts, 0);
                        }
                        drop(share);
                        r
                    }),
                    held,
                );
            }
            Err(e) => cx.reply(engine_err(e)),
        }
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
        let mut pairs = vec![("role".to_string(), "kvstore".to_string())];
        let state = |s: &str| ("state".to_string(), s.to_string());
        match self.engine.mode() {
            Mode::Starting => pairs.push(state("starting")),
            Mode::Replaying { done, total } => pairs.extend([
                state("replaying"),
                ("replay".into(), format!("{done}/{total}")),
            ]),
            Mode::Serving => pairs.push(state("serving")),
            Mode::Fenced(by) => pairs.extend([
                state("fenced"),
                (
                    "fenced_by".into(),
                    match by {
                        crate::engine::UNKNOWN_EPOCH => "unknown".to_string(),
                        by => by.to_string(),
                    },
                ),
            ]),
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

fn write_reply(r: Result<Result<(), EngineError>, oneshot::error::RecvError>) -> Response {
    match r {
        Ok(Ok(())) => Response::ok(),
        Ok(Err(e)) => engine_err(e),
        Err(_) => Response::err(ErrorCode::Unavailable, "committer stopped"),
    }
}

/// The kvstore's part of the shared connection loop ([`protocol::handler`]): every request
/// goes to [`Session::execute`].
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
        let quit = matches!(req, Request::Quit);
        self.execute(req, cx).await?;
        Ok(if quit || self.closing {
            Flow::Close
        } else {
            Flow::Continue
        })
    }
}

/// Serves one connection until it closes, sends `QUIT`, or the server shuts down. A client
/// protected mode refuses gets one `ERR DENIED` line and is closed.
pub async fn handle(
    mut conn: Connection,
    engine: Arc<Engine>,
    limits: Arc<Limits>,
    auth: Arc<ClientAuth>,
    shutdown: CancellationToken,
) {
    let peer = conn.peer_addr();
    // A socket that no longer knows its peer is not known to be loopback.
    if !peer.is_some_and(|p| auth.admits(p)) {
        tracing::debug!("refusing {peer:?}: protected mode");
        conn.write_response(&Response::err(ErrorCode::Denied, PROTECTED_MESSAGE));
        let _ = conn.shutdown().await;
        return;
    }
    handler::run(conn, Session::new(engine, limits, auth, peer), shutdown).await
}
