//! Connections: one client's requests over DKSP or etcd's HTTP/JSON gateway, and how each ended.

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use protocol::{Client, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::Target;

/// How one request or transaction ended, short of a broken connection.
#[derive(Debug, PartialEq)]
pub(super) enum Outcome {
    Done,
    Aborted,
    /// The server answered with an error (`ERR`, HTTP status): counted, the connection is kept.
    Failed,
}

pub(super) enum Conn {
    Dtkv(Client),
    Etcd(Http),
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

impl Conn {
    pub(super) async fn connect(target: Target, addr: &str) -> anyhow::Result<Conn> {
        Ok(match target {
            Target::Dtkv => Conn::Dtkv(crate::Credentials::from_env().connect_any(addr).await?),
            Target::Etcd => Conn::Etcd(Http::connect(addr).await?),
        })
    }

    /// Queues an autocommit write; its reply is read by [`Conn::recv`].
    pub(super) fn send_put(&mut self, key: &str, value: &[u8]) {
        match self {
            Conn::Dtkv(c) => {
                let mut line = Vec::with_capacity(key.len() + value.len() + 5);
                line.extend_from_slice(b"PUT ");
                line.extend_from_slice(key.as_bytes());
                line.push(b' ');
                line.extend_from_slice(value);
                c.send(&line);
            }
            Conn::Etcd(h) => {
                let body = format!(
                    r#"{{"key":"{}","value":"{}"}}"#,
                    b64(key.as_bytes()),
                    b64(value)
                );
                h.send("/v3/kv/put", &body);
            }
        }
    }

    pub(super) fn send_get(&mut self, key: &str) {
        match self {
            Conn::Dtkv(c) => c.send(format!("GET {key}").as_bytes()),
            Conn::Etcd(h) => h.send(
                "/v3/kv/range",
                &format!(r#"{{"key":"{}"}}"#, b64(key.as_bytes())),
            ),
        }
    }

    pub(super) async fn recv(&mut self) -> anyhow::Result<Outcome> {
        match self {
            Conn::Dtkv(c) => Ok(match c.recv().await? {
                Response::Err(_) => Outcome::Failed,
                _ => Outcome::Done,
            }),
            Conn::Etcd(h) => Ok(match h.recv().await?.0 {
                200 => Outcome::Done,
                _ => Outcome::Failed,
            }),
        }
    }

    /// One read-modify-write transaction: read every key, write the first `writes` back.
    pub(super) async fn rmw(
        &mut self,
        keys: &[String],
        writes: usize,
        value: &[u8],
    ) -> anyhow::Result<Outcome> {
        match self {
            Conn::Dtkv(c) => {
                let mut failed = !matches!(c.call(b"BEGIN").await?, Response::Ok(_));
                for k in keys {
                    if failed {
                        break;
                    }
                    failed = matches!(
                        c.call(format!("GET {k}").as_bytes()).await?,
                        Response::Err(_)
                    );
                }
                for k in &keys[..writes] {
                    if failed {
                        break;
                    }
                    let mut line = format!("PUT {k} ").into_bytes();
                    line.extend_from_slice(value);
                    failed = matches!(c.call(&line).await?, Response::Err(_));
                }
                if failed {
                    // Leaves the connection outside any transaction; the reply does not matter.
                    c.call(b"ABORT").await?;
                    return Ok(Outcome::Failed);
                }
                Ok(match c.call(b"COMMIT").await? {
                    Response::Committed(_) => Outcome::Done,
                    Response::Aborted(_) => Outcome::Aborted,
                    _ => Outcome::Failed,
                })
            }
            Conn::Etcd(h) => {
                // etcd rejects a txn that puts one key twice, so a key drawn twice is read and
                // written once.
                let mut distinct: Vec<&String> = Vec::with_capacity(keys.len());
                for k in keys {
                    if !distinct.contains(&k) {
                        distinct.push(k);
                    }
                }
                let written: Vec<&String> = distinct
                    .iter()
                    .copied()
                    .filter(|k| keys[..writes].contains(k))
                    .collect();
                let mut revs = Vec::with_capacity(distinct.len());
                for k in &distinct {
                    h.send(
                        "/v3/kv/range",
                        &format!(r#"{{"key":"{}"}}"#, b64(k.as_bytes())),
                    );
                    let (status, body) = h.recv().await?;
                    if status != 200 {
                        return Ok(Outcome::Failed);
                    }
                    match etcd_mod_revision(&body) {
                        Some(r) => revs.push(r),
                        None => return Ok(Outcome::Failed),
                    }
                }
                let compare: Vec<String> = distinct
                    .iter()
                    .zip(&revs)
                    .map(|(k, r)| {
                        format!(
                            r#"{{"key":"{}","target":"MOD","result":"EQUAL","mod_revision":"{r}"}}"#,
                            b64(k.as_bytes())
                        )
                    })
                    .collect();
                let success: Vec<String> = written
                    .iter()
                    .map(|k| {
                        format!(
                            r#"{{"request_put":{{"key":"{}","value":"{}"}}}}"#,
                            b64(k.as_bytes()),
                            b64(value)
                        )
                    })
                    .collect();
                let body = format!(
                    r#"{{"compare":[{}],"success":[{}]}}"#,
                    compare.join(","),
                    success.join(",")
                );
                h.send("/v3/kv/txn", &body);
                let (status, body) = h.recv().await?;
                if status != 200 {
                    return Ok(Outcome::Failed);
                }
                Ok(match etcd_succeeded(&body) {
                    Some(true) => Outcome::Done,
                    Some(false) => Outcome::Aborted,
                    None => Outcome::Failed,
                })
            }
        }
    }
}

/// The `mod_revision` of the first key of a range reply; 0 if the key does not exist (which is
/// what etcd compares a missing key's revision against). The gateway writes int64 as strings.
fn etcd_mod_revision(body: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    match v.get("kvs").and_then(|kvs| kvs.get(0)) {
        None => Some(0),
        Some(kv) => match kv.get("mod_revision")? {
            serde_json::Value::String(s) => s.parse().ok(),
            n => n.as_u64(),
        },
    }
}

/// Whether a txn reply says its compares held. proto3 JSON may leave out a false field.
fn etcd_succeeded(body: &[u8]) -> Option<bool> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("header")?;
    Some(
        v.get("succeeded")
            .and_then(|s| s.as_bool())
            .unwrap_or(false),
    )
}

/// A keep-alive HTTP/1.1 client for small JSON POSTs, pipelining like [`Client`]: `send`
/// queues, `recv` flushes and reads the next response in order.
pub(super) struct Http {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    out: Vec<u8>,
    host: String,
}

impl Http {
    async fn connect(addr: &str) -> anyhow::Result<Http> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        Ok(Http {
            rd: BufReader::new(rd),
            wr,
            out: Vec::new(),
            host: addr.to_string(),
        })
    }

    fn send(&mut self, path: &str, body: &str) {
        self.out.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.host,
                body.len()
            )
            .as_bytes(),
        );
        self.out.extend_from_slice(body.as_bytes());
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.rd.read_line(&mut line).await? == 0 {
            bail!("server closed the connection");
        }
        Ok(line.trim_end().to_string())
    }

    /// The next response's status and body (Content-Length or chunked).
    async fn recv(&mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        if !self.out.is_empty() {
            self.wr.write_all(&self.out).await?;
            self.out.clear();
        }
        let status_line = self.line().await?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad HTTP status line {status_line:?}"))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            let h = self.line().await?;
            if h.is_empty() {
                break;
            }
            let Some((name, v)) = h.split_once(':') else {
                continue;
            };
            let v = v.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse::<usize>().context("Content-Length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let size_line = self.line().await?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .with_context(|| format!("chunk size {size_line:?}"))?;
                let start = body.len();
                body.resize(start + size, 0);
                self.rd.read_exact(&mut body[start..]).await?;
                self.line().await?;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            self.rd.read_exact(&mut body).await?;
        }
        Ok((status, body))
    }
}
