//! DKSP for clients: one session per connection, holding at most one open transaction.
//!
//! Inside a transaction, writes are buffered in the session and reads see them on top of the
//! snapshot; `COMMIT` hands them to the engine. Outside one, `GET`/`SCAN`/`PUT`/`DEL` run as a
//! transaction of their own (autocommit). A connection that closes aborts its transaction, and
//! a transaction idle for longer than the timeout is aborted so it cannot pin old versions.

use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use protocol::kv::Request;
use protocol::{Connection, ErrorCode, Frame, Response};

use crate::engine::{Engine, EngineError, Mode, Outcome, Submitted};
use tokio::sync::oneshot;

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
        EngineError::TooLarge(m) => Response::err(ErrorCode::TooLarge, m),
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
                        .commit(Some(start), txn.writes.into_iter().collect())
                        .await
                };
                self.engine.end_snapshot(start);
                one(match result {
                    Ok(Outcome::Committed(ts)) => Response::Committed(ts),
                    Ok(Outcome::Conflict(key)) => {
                        Response::Aborted(vec![Bytes::from_static(b"CONFLICT"), key])
                    }
                    // The log refused the entry: certainly not committed.
                    Err(EngineError::TooLarge(_)) => {
                        Response::Aborted(vec![Bytes::from_static(b"TOO_LARGE")])
                    }
                    Err(e) => engine_err(e),
                })
            }
            Request::Get { key } => {
                if let Some(t) = &self.txn {
                    if let Some(w) = t.writes.get(&key) {
                        return one(w.clone().map_or(Response::Nil, Response::Value));
                    }
                    let start = t.start_ts;
                    let v = self.engine.get(&key, start).await;
                    return one(v.map_or(Response::Nil, Response::Value));
                }
                match self.engine.begin().await {
                    Ok(s) => {
                        let v = self.engine.get(&key, s).await;
                        self.engine.end_snapshot(s);
                        one(v.map_or(Response::Nil, Response::Value))
                    }
                    Err(e) => one(engine_err(e)),
                }
            }
            Request::Scan { start, end, limit } => {
                let limit = limit.map_or(usize::MAX, |l| l.min(usize::MAX as u64) as usize);
                let rows = match &self.txn {
                    Some(t) => merge_scan(&self.engine, t, &start, &end, limit).await,
                    None => match self.engine.begin().await {
                        Ok(s) => {
                            let rows = self.engine.scan(&start, &end, s, limit).await;
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
        // Autocommit: a blind write, which never conflicts (see Engine::commit).
        match self.engine.commit(None, vec![(key, value)]).await {
            Ok(_) => Response::ok(),
            Err(e) => engine_err(e),
        }
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
        ]);
        Response::status(&pairs)
    }
}

/// The snapshot's rows in `[start, end)` with the transaction's own writes on top.
async fn merge_scan(
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
    let base = engine
        .scan(start, end, t.start_ts, limit.saturating_add(own.len()))
        .await;
    let mut merged: BTreeMap<Bytes, Bytes> = base.into_iter().collect();
    for (k, v) in own {
        match v {
            Some(v) => merged.insert(k.clone(), v.clone()),
            None => merged.remove(k),
        };
    }
    merged.into_iter().take(limit).collect()
}

/// A reply that may still be waiting for the log.
enum Pending {
    Ready(Response),
    Waiting(oneshot::Receiver<Result<(), EngineError>>),
}

fn write_reply(r: Result<Result<(), EngineError>, oneshot::error::RecvError>) -> Response {
    match r {
        Ok(Ok(())) => Response::ok(),
        Ok(Err(e)) => engine_err(e),
        Err(_) => Response::err(ErrorCode::Unavailable, "committer stopped"),
    }
}

/// Requests one connection may have waiting for the log.
const MAX_PIPELINE: usize = 4096;

/// Writes every pending reply, waiting for those still in the log.
async fn drain(conn: &mut Connection, pending: &mut VecDeque<Pending>) {
    while let Some(p) = pending.pop_front() {
        let r = match p {
            Pending::Ready(r) => r,
            Pending::Waiting(rx) => write_reply(rx.await),
        };
        conn.write_response(&r);
    }
}

/// Serves one connection. Autocommit `PUT`/`DEL`s are pipelined: they are queued to the log
/// at once and their `OK`s go out in order as the log acknowledges them. Any other request
/// first waits for those, so a session always reads its own writes.
pub async fn handle(
    mut conn: Connection,
    engine: Arc<Engine>,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut session = Session::new(engine);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    loop {
        while let Some(front) = pending.front_mut() {
            let r = match front {
                Pending::Ready(r) => r.clone(),
                Pending::Waiting(rx) => match rx.try_recv() {
                    Ok(r) => write_reply(Ok(r)),
                    Err(oneshot::error::TryRecvError::Empty) => break,
                    Err(oneshot::error::TryRecvError::Closed) => {
                        Response::err(ErrorCode::Unavailable, "committer stopped")
                    }
                },
            };
            conn.write_response(&r);
            pending.pop_front();
        }
        let can_read = pending.len() < MAX_PIPELINE;
        let idle = !pending.is_empty() && !conn.has_buffered_line();
        if (idle || !can_read) && conn.flush().await.is_err() {
            return;
        }
        let head_waiting = matches!(pending.front(), Some(Pending::Waiting(_)));
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = async {
                match pending.front_mut() {
                    Some(Pending::Waiting(rx)) => rx.await,
                    _ => std::future::pending().await,
                }
            }, if head_waiting => {
                pending[0] = Pending::Ready(write_reply(r));
                continue;
            }
            f = async {
                if session.txn.is_some() {
                    tokio::time::timeout(idle_timeout, conn.read_frame()).await
                } else {
                    Ok(conn.read_frame().await)
                }
            }, if can_read => f,
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
                pending.push_back(Pending::Ready(Response::too_large(conn.max_line())));
                continue;
            }
            Ok(Ok(None)) | Ok(Err(_)) => break,
        };
        let req = match Request::parse(&line) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                pending.push_back(Pending::Ready(Response::Err(e)));
                continue;
            }
        };
        let autocommit_write = session.txn.is_none()
            && !session.timed_out
            && matches!(req, Request::Put { .. } | Request::Del { .. });
        if autocommit_write {
            let write = match req {
                Request::Put { key, value } => (key, Some(value)),
                Request::Del { key } => (key, None),
                _ => continue,
            };
            match session.engine.submit(None, vec![write]).await {
                Ok(Submitted::Queued(_, rx)) => pending.push_back(Pending::Waiting(rx)),
                // Blind writes never conflict; answer as a commit would, to be safe.
                Ok(Submitted::Conflict(_)) => pending.push_back(Pending::Ready(Response::err(
                    ErrorCode::Unavailable,
                    "conflict on a blind write; retry",
                ))),
                Err(e) => pending.push_back(Pending::Ready(engine_err(e))),
            }
            continue;
        }
        drain(&mut conn, &mut pending).await;
        let quit = matches!(req, Request::Quit);
        for r in session.execute(req).await {
            conn.write_response(&r);
        }
        if quit {
            break;
        }
    }
    drain(&mut conn, &mut pending).await;
    let _ = conn.shutdown().await;
}
