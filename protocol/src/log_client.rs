//! A client for the replicated log that finds the leader and rides through failovers.
//!
//! It follows `REDIRECT`s, and on a lost connection or `ERR UNAVAILABLE` (no leader yet, no
//! quorum) it tries the next replica after a short backoff, until a deadline. Retrying an
//! `APPEND` is safe because `(client, seq)` makes it exactly-once: a retry of an append that
//! did commit returns the original index.

use bytes::Bytes;
use std::time::{Duration, Instant};

use crate::client::{Client, ClientError, Result};
use crate::log::Request;
use crate::response::{parse_u64, ErrorCode, Response};
use crate::trust::Trust;

/// Which replica to try next: the one a `REDIRECT` named, else round-robin over the rest.
#[derive(Debug, Clone)]
pub struct Replicas {
    addrs: Vec<String>,
    /// Index into `addrs` (or a redirect target appended to it) to try next.
    next: usize,
}

impl Replicas {
    /// Replicas to try, starting with the first.
    pub fn new(addrs: Vec<String>) -> Replicas {
        Replicas { addrs, next: 0 }
    }

    /// The address to try now.
    pub fn current(&self) -> &str {
        self.addrs
            .get(self.next % self.addrs.len().max(1))
            .map_or("", String::as_str)
    }

    /// The leader is `addr`: try it next (remembering it if it was not listed).
    pub fn redirect(&mut self, addr: String) {
        match self.addrs.iter().position(|r| *r == addr) {
            Some(i) => self.next = i,
            None => {
                self.addrs.push(addr);
                self.next = self.addrs.len() - 1;
            }
        }
    }

    /// The current one failed: move on to the next.
    pub fn rotate(&mut self) {
        self.next = (self.next + 1) % self.addrs.len().max(1);
    }
}

/// A log replica's `STATUS`, the fields a client acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStatus {
    /// The first index the replica still holds (entries before it are compacted).
    pub first: u64,
    /// The last committed index.
    pub last: u64,
}

/// The log's current checkpoint, as `CKPT_INFO` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The checkpoint's id, for `CKPT_READ`.
    pub id: u64,
    /// The log index it covers (entries up to it are in it).
    pub index: u64,
    /// Its size in bytes.
    pub len: u64,
    /// Its CRC32C.
    pub crc: u32,
}

/// The `key=value` arguments of an `OK` reply, as pairs.
fn pairs(args: &[Bytes]) -> Vec<(&[u8], &[u8])> {
    args.iter()
        .map(|a| match a.iter().position(|&b| b == b'=') {
            Some(i) => (&a[..i], &a[i + 1..]),
            None => (&a[..], &b""[..]),
        })
        .collect()
}

/// The number in field `name` of `pairs`, or a protocol error naming the reply.
fn field(pairs: &[(&[u8], &[u8])], reply: &str, name: &str) -> Result<u64> {
    let (_, v) = pairs
        .iter()
        .find(|(k, _)| *k == name.as_bytes())
        .ok_or_else(|| ClientError::Protocol(format!("{reply} lacks {name}")))?;
    parse_u64(v).map_err(|e| ClientError::Protocol(format!("{reply} {name}: {e}")))
}

/// A client of the whole log: it finds the leader, follows `REDIRECT`, and retries through
/// failovers until its deadline.
pub struct LogClient {
    replicas: Replicas,
    conn: Option<(String, Client)>,
    /// How it proves membership to the replicas.
    trust: Trust,
    /// How long one call keeps retrying before giving up.
    pub deadline: Duration,
    /// How long one attempt waits for its reply before trying another replica. A leader cut
    /// off from its majority keeps the request without answering (openraft 0.9 leaders do not
    /// step down on their own), so without this a call would wait out the whole partition.
    pub attempt_timeout: Duration,
}

impl LogClient {
    /// `replicas`: the DKSP addresses of the log replicas, any order.
    pub fn new(replicas: Vec<String>) -> LogClient {
        LogClient {
            replicas: Replicas::new(replicas),
            conn: None,
            trust: Trust::none(),
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(2),
        }
    }

    /// The same client, proving membership with `trust` (see [`Client::connect_trusted`]).
    pub fn with_trust(mut self, trust: Trust) -> LogClient {
        self.trust = trust;
        self
    }

    /// How it proves membership.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// The replica currently talked to, if connected.
    pub fn connected_to(&self) -> Option<&str> {
        self.conn.as_ref().map(|(a, _)| a.as_str())
    }

    async fn connection(&mut self) -> Result<&mut Client> {
        if self.conn.is_none() {
            let addr = self.replicas.current().to_string();
            let c = tokio::time::timeout(
                Duration::from_secs(1),
                Client::connect_trusted(&addr, &self.trust),
            )
            .await
            .map_err(|_| ClientError::Io(std::io::ErrorKind::TimedOut.into()))??;
            self.conn = Some((addr, c));
        }
        match self.conn.as_mut() {
            Some((_, c)) => Ok(c),
            None => Err(ClientError::Closed),
        }
    }

    fn redirect(&mut self, addr: String) {
        self.conn = None;
        self.replicas.redirect(addr);
    }

    /// Drops the connection; the next call tries the next replica.
    pub fn rotate(&mut self) {
        self.conn = None;
        self.replicas.rotate();
    }

    /// Sends a leader-only request, following redirects and retrying through failovers.
    pub async fn call_leader(&mut self, line: &[u8]) -> Result<Response> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let mut last_err: Option<ClientError> = None;
        while start.elapsed() < self.deadline {
            let limit = self.attempt_timeout;
            let attempt = match self.connection().await {
                Ok(c) => within(limit, c.call(line)).await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(Response::Redirect(addr)) => {
                    self.redirect(addr);
                    continue;
                }
                Ok(Response::Err(e)) if e.code == ErrorCode::Unavailable => {
                    last_err = Some(ClientError::Server(e));
                    self.rotate();
                }
                Ok(r) => return Ok(r),
                Err(e @ ClientError::Protocol(_)) => return Err(e),
                Err(e) => {
                    last_err = Some(e);
                    self.rotate();
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
        Err(last_err.unwrap_or(ClientError::Closed))
    }

    /// `APPEND`: the logical index the payload got (the original one on a retry).
    pub async fn append(&mut self, client: &[u8], seq: u64, payload: &[u8]) -> Result<u64> {
        let req = Request::Append {
            client: Bytes::copy_from_slice(client),
            seq,
            payload: Bytes::copy_from_slice(payload),
        };
        match self.call_leader(&req.encode()).await? {
            Response::Ok(args) if args.len() == 1 => {
                parse_u64(&args[0]).map_err(|e| ClientError::Protocol(e.to_string()))
            }
            Response::Err(e) => Err(ClientError::Server(e)),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    /// `STATUS` of the leader.
    pub async fn status(&mut self) -> Result<LogStatus> {
        match self.call_leader(b"STATUS").await? {
            Response::Ok(args) => {
                let p = pairs(&args);
                Ok(LogStatus {
                    first: field(&p, "STATUS", "first")?,
                    last: field(&p, "STATUS", "last")?,
                })
            }
            Response::Err(e) => Err(ClientError::Server(e)),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    /// `CKPT_INFO`: the log's current checkpoint, `None` if it has none yet.
    pub async fn checkpoint_info(&mut self) -> Result<Option<CheckpointInfo>> {
        match self.call_leader(b"CKPT_INFO").await? {
            Response::Ok(args) => {
                let p = pairs(&args);
                let crc = field(&p, "CKPT_INFO", "crc")?;
                Ok(Some(CheckpointInfo {
                    id: field(&p, "CKPT_INFO", "id")?,
                    index: field(&p, "CKPT_INFO", "index")?,
                    len: field(&p, "CKPT_INFO", "len")?,
                    crc: u32::try_from(crc)
                        .map_err(|_| ClientError::Protocol(format!("CKPT_INFO crc {crc}")))?,
                }))
            }
            Response::Err(e) if e.code == ErrorCode::NotFound => Ok(None),
            Response::Err(e) => Err(ClientError::Server(e)),
            r => Err(ClientError::Unexpected(r)),
        }
    }

    /// `READ` from whichever replica this client is connected to (entries are committed ones).
    pub async fn read(&mut self, from: u64, max: Option<u64>) -> Result<Vec<(u64, Bytes)>> {
        let start = Instant::now();
        loop {
            let limit = self.attempt_timeout;
            let attempt = match self.connection().await {
                Ok(c) => within(limit, c.read_log(from, max)).await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(v) => return Ok(v),
                Err(e @ (ClientError::Io(_) | ClientError::Closed)) => {
                    self.rotate();
                    if start.elapsed() > self.deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// `fut`, or a timeout error after `limit` (the caller then drops the connection, so a late
/// reply is never taken for the next request's).
async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(ClientError::Io(std::io::ErrorKind::TimedOut.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_checkpoint_fields_are_found_by_name_and_a_missing_one_is_an_error() {
        let args: Vec<Bytes> = ["role=leader", "first=3", "last=17", "flag"]
            .iter()
            .map(|a| Bytes::from(*a))
            .collect();
        let p = pairs(&args);
        assert_eq!(field(&p, "STATUS", "last").ok(), Some(17));
        assert_eq!(field(&p, "STATUS", "first").ok(), Some(3));
        assert!(matches!(
            field(&p, "STATUS", "commit"),
            Err(ClientError::Protocol(_))
        ));
        assert!(matches!(
            field(&p, "STATUS", "role"),
            Err(ClientError::Protocol(_))
        ));
    }
}
