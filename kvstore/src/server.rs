//! DKSP for clients: one session per connection, holding at most one open transaction.
//!
//! Inside a transaction, writes are buffered in the session and reads see them on top of the
//! snapshot; `COMMIT` hands them to the engine. Outside one, `GET`/`SCAN`/`PUT`/`DEL` run as a
//! transaction of their own (autocommit). A connection that closes aborts its transaction, and
//! a transaction idle for longer than the timeout is aborted so it cannot pin old versions.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use protocol::kv::Request;
use protocol::{Connection, ErrorCode, Frame, Response};

use crate::engine::{Engine, EngineError, Mode, Outcome};

/// Attempts of an autocommit write that keeps meeting a concurrent writer of its key.
const AUTOCOMMIT_RETRIES: usize = 100;

struct Txn {
    start_ts: u64,
    writes: BTreeMap<Bytes, Option<Bytes>>,
}

pub struct Session {
    engine: Arc<Engine>,
    txn: Option<Txn>,
    timed_out: bool,
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
    }
}

impl Session {
    pub fn new(engine: Arc<Engine>) -> Session {
        Session {
            engine,
            txn: None,
            timed_out: false,
        }
    }

    fn end_txn(&mut self) {
        if let Some(t) = self.txn.take() {
            self.engine.end_snapshot(t.start_ts);
        }
    }

    /// Runs one request; returns the reply lines.
    pub async fn execute(&mut self, req: Request) -> Vec<Response> {
        let one = |r: Response| vec![r];
        if self.timed_out && self.txn.is_none() {
            self.timed_out = false;
            return match req {
                Request::Commit => one(Response::Aborted(vec![Bytes::from_static(b"TIMEOUT")])),
                Request::Abort => one(Response::ok()),
                _ => one(Response::err(
                    ErrorCode::NoTxn,
                    "the transaction timed out and was aborted",
                )),
            };
        }
        match req {
            Request::Ping => one(Response::Pong),
            Request::Quit => one(Response::ok()),
            Request::Status => one(self.status()),
            Request::Begin => {
                if self.txn.is_some() {
                    return one(Response::err(
                        ErrorCode::TxnActive,
                        "a transaction is already open",
                    ));
                }
                match self.engine.begin().await {
                    Ok(s) => {
                        self.txn = Some(Txn {
                            start_ts: s,
                            writes: BTreeMap::new(),
                        });
                        one(Response::Ok(vec![Bytes::from(s.to_string())]))
                    }
                    Err(e) => one(engine_err(e)),
                }
            }
            Request::Abort => match self.txn {
                Some(_) => {
                    self.end_txn();
                    one(Response::ok())
                }
                None => one(Response::err(ErrorCode::NoTxn, "no transaction is open")),
            },
            Request::Commit => {
                let Some(txn) = self.txn.take() else {
                    return one(Response::err(ErrorCode::NoTxn, "no transaction is open"));
                };
                let start = txn.start_ts;
                let result = if txn.writes.is_empty() {
                    // Read-only: nothing to make durable.
                    Ok(Outcome::Committed(start))
                } else {
                    self.engine
                        .commit(start, txn.writes.into_iter().collect())
                        .await
                };
                self.engine.end_snapshot(start);
                one(match result {
                    Ok(Outcome::Committed(ts)) => Response::Committed(ts),
                    Ok(Outcome::Conflict(key)) => {
                        Response::Aborted(vec![Bytes::from_static(b"CONFLICT"), key])
                    }
                    Err(e) => engine_err(e),
                })
            }
            Request::Get { key } => {
                if let Some(t) = &self.txn {
                    if let Some(w) = t.writes.get(&key) {
                        return one(w.clone().map_or(Response::Nil, Response::Value));
                    }
                    return one(self
                        .engine
                        .get(&key, t.start_ts)
                        .map_or(Response::Nil, Response::Value));
                }
                match self.engine.begin().await {
                    Ok(s) => {
                        let v = self.engine.get(&key, s);
                        self.engine.end_snapshot(s);
                        one(v.map_or(Response::Nil, Response::Value))
                    }
                    Err(e) => one(engine_err(e)),
                }
            }
            Request::Scan { start, end, limit } => {
                let limit = limit.map_or(usize::MAX, |l| l.min(usize::MAX as u64) as usize);
                let rows = match &self.txn {
                    Some(t) => merge_scan(&self.engine, t, &start, &end, limit),
                    None => match self.engine.begin().await {
                        Ok(s) => {
                            let rows = self.engine.scan(&start, &end, s, limit);
                            self.engine.end_snapshot(s);
                            rows
                        }
                        Err(e) => return one(engine_err(e)),
                    },
                };
                let mut out: Vec<Response> =
                    rows.into_iter().map(|(k, v)| Response::Kv(k, v)).collect();
                out.push(Response::End);
                out
            }
            Request::Put { key, value } => one(self.write(key, Some(value)).await),
            Request::Del { key } => one(self.write(key, None).await),
        }
    }

    async fn write(&mut self, key: Bytes, value: Option<Bytes>) -> Response {
        if let Some(t) = &mut self.txn {
            t.writes.insert(key, value);
            return Response::ok();
        }
        // Autocommit: a blind write, retried if a concurrent writer of the key got there first.
        for _ in 0..AUTOCOMMIT_RETRIES {
            let s = match self.engine.begin().await {
                Ok(s) => s,
                Err(e) => return engine_err(e),
            };
            let r = self
                .engine
                .commit(s, vec![(key.clone(), value.clone())])
                .await;
            self.engine.end_snapshot(s);
            match r {
                Ok(Outcome::Committed(_)) => return Response::ok(),
                Ok(Outcome::Conflict(_)) => continue,
                Err(e) => return engine_err(e),
            }
        }
        Response::err(
            ErrorCode::Unavailable,
            "the key is under constant concurrent writes; retry",
        )
    }

    fn status(&self) -> Response {
        let (applied, epoch, open, inflight) = self.engine.positions();
        let (keys, versions, bytes) = self
            .engine
            .store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .stats();
        let state = match self.engine.mode() {
            Mode::Starting => "starting".to_string(),
            Mode::Replaying { done, total } => format!("replaying replay={done}/{total}"),
            Mode::Serving => "serving".to_string(),
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
        ]);
        Response::status(&pairs)
    }
}

/// The snapshot's rows in `[start, end)` with the transaction's own writes on top.
fn merge_scan(
    engine: &Engine,
    t: &Txn,
    start: &[u8],
    end: &[u8],
    limit: usize,
) -> Vec<(Bytes, Bytes)> {
    if start >= end {
        return Vec::new();
    }
    let own: Vec<(&Bytes, &Option<Bytes>)> = t
        .writes
        .range::<[u8], _>((
            std::ops::Bound::Included(start),
            std::ops::Bound::Excluded(end),
        ))
        .collect();
    // Own deletes can hide snapshot rows, so fetch enough to still fill `limit`.
    let base = engine.scan(start, end, t.start_ts, limit.saturating_add(own.len()));
    let mut merged: BTreeMap<Bytes, Bytes> = base.into_iter().collect();
    for (k, v) in own {
        match v {
            Some(v) => merged.insert(k.clone(), v.clone()),
            None => merged.remove(k),
        };
    }
    merged.into_iter().take(limit).collect()
}

/// Serves one connection.
pub async fn handle(
    mut conn: Connection,
    engine: Arc<Engine>,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut session = Session::new(engine);
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break,
            f = async {
                if session.txn.is_some() {
                    tokio::time::timeout(idle_timeout, conn.read_frame()).await
                } else {
                    Ok(conn.read_frame().await)
                }
            } => f,
        };
        let line = match frame {
            Err(_elapsed) => {
                tracing::debug!("aborting a transaction idle for {idle_timeout:?}");
                session.end_txn();
                session.timed_out = true;
                continue;
            }
            Ok(Ok(Some(Frame::Line(line)))) => line,
            Ok(Ok(Some(Frame::TooLong))) => {
                conn.write_response(&Response::too_large(conn.max_line()));
                continue;
            }
            Ok(Ok(None)) | Ok(Err(_)) => break,
        };
        let req = match Request::parse(&line) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                conn.write_response(&Response::Err(e));
                continue;
            }
        };
        let quit = matches!(req, Request::Quit);
        for r in session.execute(req).await {
            conn.write_response(&r);
        }
        if quit {
            break;
        }
    }
    let _ = conn.shutdown().await;
}
