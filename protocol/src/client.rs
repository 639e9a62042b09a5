//! A small async DKSP client, used by the servers to talk to each other and by tests and
//! benchmarks. It pipelines: [`Client::send`] queues a request, [`Client::recv`] reads the next
//! reply in order.

use bytes::Bytes;
use std::io;
use tokio::net::{TcpStream, ToSocketAddrs};

use crate::codec::Frame;
use crate::connection::Connection;
use crate::response::{Response, ServerError};
use crate::trust::{Challenge, ClusterSecret, Trust};
use crate::{kv, log, seq};

/// Replies can carry a value as large as a request line, quoted, so allow well beyond the
/// servers' default request limit.
const CLIENT_MAX_LINE: usize = 64 * 1024 * 1024;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed (connect, read or write).
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection before the reply.
    #[error("server closed the connection")]
    Closed,
    /// The reply line does not parse as DKSP, or lacks a field the call needs.
    #[error("unparseable reply: {0}")]
    Protocol(String),
    /// The server answered `ERR`.
    #[error("server error: {0}")]
    Server(ServerError),
    /// A well-formed reply of the wrong shape for this request.
    #[error("unexpected reply: {0:?}")]
    Unexpected(Response),
}

/// The result of a client call.
pub type Result<T> = std::result::Result<T, ClientError>;

/// How a `COMMIT` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// `COMMITTED <commit_ts>`: the transaction is durable at this timestamp.
    Committed(u64),
    /// The `ABORTED` reason words, e.g. `["CONFLICT", "user:1"]`.
    Aborted(Vec<Bytes>),
}

/// One DKSP connection to any of the three servers, with pipelining and typed helpers.
pub struct Client {
    conn: Connection,
}

impl Client {
    /// Connects to a server at `addr`; replies may be up to 64 MiB per line.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        Ok(Client {
            conn: Connection::new(stream, CLIENT_MAX_LINE),
        })
    }

    /// Connects to a cluster member (a sequencer or logserver) as a member: under TLS when
    /// `trust` has it (our certificate proves membership), else with the cluster secret's
    /// handshake when `trust` has one, else plainly (the server then trusts loopback only).
    /// Also for a kvstore under TLS, where the handshake is skipped the same way.
    pub async fn connect_trusted(addr: &str, trust: &Trust) -> Result<Client> {
        let stream = trust.dial(addr).await?;
        let tls = stream.is_tls();
        let mut c = Client {
            conn: Connection::new(stream, CLIENT_MAX_LINE),
        };
        if let Some(secret) = trust.secret.as_ref().filter(|_| !tls) {
            c.prove(secret).await?;
        }
        Ok(c)
    }

    /// Runs the client's side of the cluster handshake (`HELLO`, `CLUSTER`) on this connection,
    /// checking the server's proof too.
    pub async fn prove(&mut self, secret: &ClusterSecret) -> Result<()> {
        let nonce = match self.call_ok(b"HELLO").await? {
            Response::Ok(w) if w.len() == 1 => w[0].clone(),
            r => return Err(ClientError::Unexpected(r)),
        };
        let challenge =
            Challenge::answer(secret, &nonce).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let proof = match self.call_ok(&challenge.line).await? {
            Response::Ok(w) if w.len() == 1 => w[0].clone(),
            r => return Err(ClientError::Unexpected(r)),
        };
        challenge
            .check(secret, &proof)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Queues a request line; it is sent at the next `recv` or `flush`.
    pub fn send(&mut self, line: &[u8]) {
        self.conn.write_line(line);
    }

    /// Sends every queued request now.
    pub async fn flush(&mut self) -> Result<()> {
        Ok(self.conn.flush().await?)
    }

    /// The next reply line, parsed. `ERR` replies are returned as `Response::Err`.
    pub async fn recv(&mut self) -> Result<Response> {
        match self.conn.read_frame().await? {
            None => Err(ClientError::Closed),
            Some(Frame::TooLong) => Err(ClientError::Protocol("reply line too long".into())),
            Some(Frame::Line(line)) => {
                Response::parse(&line).map_err(|e| ClientError::Protocol(e.to_string()))
            }
        }
    }

    /// Sends one request and reads its single-line reply.
    pub async fn call(&mut self, line: &[u8]) -> Result<Response> {
        self.send(line);
        self.recv().await
    }

    /// Like [`call`](Self::call) but turns `ERR` into `ClientError::Server`.
    pub async fn call_ok(&mut self, line: &[u8]) -> Result<Response> {
        match self.call(line).await? {
            Response::Err(e) => Err(ClientError::Server(e)),
            r => Ok(r),
        }
    }

    /// Sends a request whose reply is many lines ending in `END` (`SCAN`, `READ`) and collects
    /// them, without the `END`.
    pub async fn call_multi(&mut self, line: &[u8]) -> Result<Vec<Response>> {
        self.send(line);
        let mut rows = Vec::new();
        loop {
            match self.recv().await? {
                Response::End => return Ok(rows),
                Response::Err(e) => return Err(ClientError::Server(e)),
                r => rows.push(r),
            }
        }
    }

    /// `PING`, expecting `PONG`.
    pub async fn ping(&mut self) -> Result<()> {
        match self.call_ok(b"PING").await? {
            Response::Pong => Ok(()),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    /// `STATUS` as key/value pairs.
    pub async fn status(&mut self) -> Result<Vec<(String, String)>> {
        self.pairs(b"STATUS").await
    }

    /// Any request answered `OK key=value ...` (`STATUS`, `CKPT_INFO`), as pairs.
    pub async fn pairs(&mut self, line: &[u8]) -> Result<Vec<(String, String)>> {
        match self.call_ok(line).await? {
            Response::Ok(args) => Ok(args
                .iter()
                .map(|a| {
                    let s = String::from_utf8_lossy(a);
                    match s.split_once('=') {
                        Some((k, v)) => (k.to_string(), v.to_string()),
                        None => (s.to_string(), String::new()),
                    }
                })
                .collect()),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    // --- kvstore ---

    /// Sends a kvstore request and reads its single-line reply; `ERR` becomes
    /// `ClientError::Server`.
    pub async fn kv(&mut self, req: &kv::Request) -> Result<Response> {
        self.call_ok(&req.encode()).await
    }

    /// `BEGIN`; returns the transaction id (its start timestamp).
    pub async fn begin(&mut self) -> Result<u64> {
        match self.kv(&kv::Request::Begin).await? {
            Response::Ok(args) if args.len() == 1 => crate::response::parse_u64(&args[0])
                .map_err(|e| ClientError::Protocol(e.to_string())),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    /// `GET`: the value, or `None` for `NIL`.
    pub async fn get(&mut self, key: impl Into<Bytes>) -> Result<Option<Bytes>> {
        match self.kv(&kv::Request::Get { key: key.into() }).await? {
            Response::Value(v) => Ok(Some(v)),
            Response::Nil => Ok(None),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    /// `PUT`, expecting `OK`.
    pub async fn put(&mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<()> {
        let req = kv::Request::Put {
            key: key.into(),
            value: value.into(),
        };
        expect_ok(self.kv(&req).await?)
    }

    /// `DEL`, expecting `OK`.
    pub async fn del(&mut self, key: impl Into<Bytes>) -> Result<()> {
        expect_ok(self.kv(&kv::Request::Del { key: key.into() }).await?)
    }

    /// `SCAN`: the rows in `[start, end)`, sorted, at most `limit`.
    pub async fn scan(
        &mut self,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        limit: Option<u64>,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let req = kv::Request::Scan {
            start: start.into(),
            end: end.into(),
            limit,
        };
        self.call_multi(&req.encode())
            .await?
            .into_iter()
            .map(|r| match r {
                Response::Kv(k, v) => Ok((k, v)),
                r => Err(ClientError::Unexpected(r)),
            })
            .collect()
    }

    /// `COMMIT`: committed at a timestamp, or aborted with its reason (neither is an error).
    pub async fn commit(&mut self) -> Result<CommitOutcome> {
        match self.kv(&kv::Request::Commit).await? {
            Response::Committed(ts) => Ok(CommitOutcome::Committed(ts)),
            Response::Aborted(reason) => Ok(CommitOutcome::Aborted(reason)),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    /// `ABORT`, expecting `OK`.
    pub async fn abort(&mut self) -> Result<()> {
        expect_ok(self.kv(&kv::Request::Abort).await?)
    }

    // --- sequencer ---

    /// `NEXT`: one fresh timestamp.
    pub async fn next_ts(&mut self) -> Result<u64> {
        match self
            .call_ok(&seq::Request::Next { count: None }.encode())
            .await?
        {
            Response::Ts { first, count: None } => Ok(first),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    /// `NEXT <n>`: the first of `n` consecutive fresh timestamps.
    pub async fn next_block(&mut self, n: u64) -> Result<u64> {
        match self
            .call_ok(&seq::Request::Next { count: Some(n) }.encode())
            .await?
        {
            Response::Ts {
                first,
                count: Some(c),
            } if c == n => Ok(first),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    /// `CURRENT`: the highest timestamp the sequencer has handed out.
    pub async fn current_ts(&mut self) -> Result<u64> {
        match self.call_ok(&seq::Request::Current.encode()).await? {
            Response::Ts { first, count: None } => Ok(first),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    // --- logserver (one replica; see `LogClient` for leader-following) ---

    /// `READ`: committed entries from `from`, at most `max`.
    pub async fn read_log(&mut self, from: u64, max: Option<u64>) -> Result<Vec<(u64, Bytes)>> {
        self.call_multi(&log::Request::Read { from, max }.encode())
            .await?
            .into_iter()
            .map(|r| match r {
                Response::Entry(i, p) => Ok((i, p)),
                r => Err(ClientError::Unexpected(r)),
            })
            .collect()
    }
}

fn expect_ok(r: Response) -> Result<()> {
    match r {
        Response::Ok(args) if args.is_empty() => Ok(()),
        r => Err(ClientError::Unexpected(r)),
    }
}
