//! Who may talk to whom: cluster membership for process-to-process links, and TLS.
//!
//! A connection to a sequencer, a logserver's DKSP port or a logserver's Raft port is a
//! **member** connection once it has proven it belongs to the cluster, in one of two ways:
//!
//! - **mutual TLS** (`--tls-cert`, `--tls-key`, `--tls-ca`): the dialler presented a certificate
//!   the cluster CA signed;
//! - **the cluster secret** (`--cluster-secret-file`): a challenge–response over fresh nonces
//!   ([`secret`]), on DKSP `HELLO` → `OK <server nonce>`, `CLUSTER <client nonce> <proof>` →
//!   `OK <server proof>`, on the Raft port as fixed-size binary frames before anything else.
//!
//! A process given neither runs **open on loopback**: connections from 127.0.0.0/8 and ::1 are
//! members, any other is not (it logs so at start). Before it is a member a DKSP connection is
//! answered only `PING`, `QUIT`, the handshake and (on the logserver) a minimal `STATUS`;
//! anything else is `ERR NOAUTH`. A Raft connection that is not a member is dropped after at
//! most [`RAFT_PREAUTH_BYTES`] bytes read.
//!
//! Invariants: a secret is never sent, only proofs over the other side's fresh nonce; a
//! server nonce is used for one proof at most; a [`Gate`] that refused
//! [`MAX_HANDSHAKE_FAILURES`] proofs closes its connection.

pub mod devcerts;
pub mod secret;
pub mod stream;
pub mod tls;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use secret::{ClusterSecret, SecretError, Side};
pub use stream::Stream;
pub use tls::{TlsConfig, TlsError};

use crate::response::{ErrorCode, Response};

/// Failed cluster proofs one connection may send before it is closed.
pub const MAX_HANDSHAKE_FAILURES: u32 = 3;

/// The most a Raft connection's peer may send before it has proven membership: the client's
/// half of the binary handshake (nonce and proof).
pub const RAFT_PREAUTH_BYTES: usize = 2 * secret::NONCE_BYTES;

/// The Raft handshake's opening: magic and version, then the server's nonce.
const RAFT_MAGIC: &[u8; 8] = b"DTKVRFT1";

/// How long a TLS or Raft handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a process's trust flags cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The secret file.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The TLS files.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Some but not all of the TLS flags.
    #[error("--tls-cert, --tls-key and --tls-ca go together: give all three or none")]
    PartialTls,
}

/// The trust flags every server (and the admin tools) take.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrustArgs {
    /// A file holding the cluster's shared secret (at least 32 bytes, e.g. 64 hex digits), the
    /// same on every process. Members prove they hold it without sending it. Without it and
    /// without TLS, only loopback connections are trusted.
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// This process's TLS certificate chain (PEM); with --tls-key and --tls-ca turns TLS on for
    /// every listener and dialer.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): the only issuer trusted for servers and for member clients.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

impl TrustArgs {
    /// Loads the files the flags name.
    pub fn load(&self) -> Result<Trust, TrustError> {
        let secret = match &self.cluster_secret_file {
            Some(p) => Some(Arc::new(ClusterSecret::load(p)?)),
            None => None,
        };
        let tls = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(c), Some(k), Some(a)) => Some(TlsConfig::member(c, k, a)?),
            (None, None, None) => None,
            _ => return Err(TrustError::PartialTls),
        };
        Ok(Trust { secret, tls })
    }
}

/// What one process trusts and proves: its secret and TLS configuration, either or both or
/// neither. Cheap to clone.
#[derive(Clone, Default)]
pub struct Trust {
    /// The cluster secret, if configured.
    pub secret: Option<Arc<ClusterSecret>>,
    /// TLS, if configured.
    pub tls: Option<TlsConfig>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trust({})", self.describe())
    }
}

/// Whether `ip` is a loopback address (127.0.0.0/8, ::1, or IPv4 loopback mapped into IPv6).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl Trust {
    /// No secret, no TLS: plain connections, members only on loopback.
    pub fn none() -> Trust {
        Trust::default()
    }

    /// Whether a secret or TLS is configured.
    pub fn has_credentials(&self) -> bool {
        self.secret.is_some() || self.tls.is_some()
    }

    /// For the start-up log line: what this process trusts.
    pub fn describe(&self) -> &'static str {
        match (&self.secret, &self.tls) {
            (Some(_), Some(_)) => "mutual TLS or the cluster secret",
            (None, Some(_)) => "mutual TLS",
            (Some(_), None) => "the cluster secret (challenge-response, no TLS)",
            (None, None) => "loopback only (no --cluster-secret-file, no TLS)",
        }
    }

    /// The server side of a fresh TCP connection: the TLS handshake if TLS is on (bounded by
    /// [`HANDSHAKE_TIMEOUT`]).
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Stream> {
        let Some(cfg) = self.tls.as_ref().and_then(|t| t.server.clone()) else {
            return Ok(Stream::Plain(tcp));
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => Ok(Stream::Server(Box::new(s))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }

    /// Whether a connection accepted on `stream` is a member before any handshake: a verified
    /// client certificate, or no credentials configured and a loopback peer.
    pub fn member_at_accept(&self, stream: &Stream) -> bool {
        if stream.peer_verified() {
            return true;
        }
        !self.has_credentials() && stream.peer_addr().is_ok_and(|a| is_loopback(a.ip()))
    }

    /// Dials `addr` (`host:port`), under TLS if configured (the server's certificate must name
    /// `host`).
    pub async fn dial(&self, addr: &str) -> io::Result<Stream> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let name = server_name(addr)?;
        let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(s)) => Ok(Stream::Client(Box::new(s))),
            Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("TLS to {addr}: {e}"))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TLS handshake with {addr} timed out"),
            )),
        }
    }

    /// The dialling side of the Raft port's handshake, right after [`dial`](Self::dial): with
    /// a secret, answers the server's challenge and checks its proof.
    pub async fn raft_prove(&self, stream: &mut Stream) -> io::Result<()> {
        // Under TLS our certificate was presented in the TLS handshake; the secret is for plain
        // links only (both sides know whether the link is TLS, so they agree on this).
        let Some(secret) = self.secret.as_ref().filter(|_| !stream.is_tls()) else {
            return Ok(());
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let mut hello = [0u8; RAFT_MAGIC.len() + secret::NONCE_BYTES];
            stream.read_exact(&mut hello).await?;
            if &hello[..RAFT_MAGIC.len()] != RAFT_MAGIC {
                return Err(denied(
                    "the peer is not a dtkv Raft port, or runs without a secret",
                ));
            }
            let sn = &hello[RAFT_MAGIC.len()..];
            let cn = secret::nonce();
            let mut out = Vec::with_capacity(RAFT_PREAUTH_BYTES);
            out.extend_from_slice(&cn);
            out.extend_from_slice(&secret.proof(Side::Client, sn, &cn));
            stream.write_all(&out).await?;
            stream.flush().await?;
            let mut proof = [0u8; 32];
            stream.read_exact(&mut proof).await?;
            if !secret.verify(Side::Server, sn, &cn, &proof) {
                return Err(denied(
                    "the peer's cluster proof is wrong (another cluster's secret?)",
                ));
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(raft_timed_out()))
    }

    /// The accepting side of the Raft port's handshake: Ok once the peer is a member (by TLS, by
    /// the secret, or on loopback without credentials); an error means drop the connection.
    /// Reads at most [`RAFT_PREAUTH_BYTES`] before the peer has proven itself.
    pub async fn raft_admit(&self, stream: &mut Stream) -> io::Result<()> {
        if stream.is_tls() {
            return if stream.peer_verified() {
                Ok(())
            } else {
                Err(denied(
                    "not a member: no client certificate from the cluster CA",
                ))
            };
        }
        let Some(secret) = &self.secret else {
            return if self.member_at_accept(stream) {
                Ok(())
            } else {
                Err(denied(
                    "not a member: no client certificate from the cluster CA",
                ))
            };
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let sn = secret::nonce();
            let mut hello = Vec::with_capacity(RAFT_MAGIC.len() + sn.len());
            hello.extend_from_slice(RAFT_MAGIC);
            hello.extend_from_slice(&sn);
            stream.write_all(&hello).await?;
            stream.flush().await?;
            let mut answer = [0u8; RAFT_PREAUTH_BYTES];
            stream.read_exact(&mut answer).await?;
            let (cn, proof) = answer.split_at(secret::NONCE_BYTES);
            if !secret.verify(Side::Client, &sn, cn, proof) {
                return Err(denied("wrong cluster proof"));
            }
            stream
                .write_all(&secret.proof(Side::Server, &sn, cn))
                .await?;
            stream.flush().await?;
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(raft_timed_out()))
    }

    /// The server-side gate for one accepted DKSP connection on a cluster port.
    pub fn gate(&self, stream: &Stream, allow_status: bool) -> Gate {
        Gate {
            secret: self.secret.clone(),
            member: self.member_at_accept(stream),
            nonce: None,
            failures: 0,
            allow_status,
            peer: stream.peer_addr().ok(),
        }
    }
}

fn raft_timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "Raft handshake timed out")
}

fn denied(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why.to_string())
}

/// The TLS server name for `host:port` (an IP address or a DNS name).
fn server_name(addr: &str) -> io::Result<rustls::pki_types::ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr}: not a TLS server name: {e}"),
        )
    })
}

/// What a [`Gate`] makes of one request line.
#[derive(Debug)]
pub enum Verdict {
    /// Pass it to the server's handler.
    Pass,
    /// Answer this instead; the handler never sees the line.
    Answer(Response),
    /// Answer this, then close the connection (too many failed proofs).
    Close(Response),
}

/// The DKSP side of cluster membership for one connection (see the module comment).
#[derive(Debug)]
pub struct Gate {
    secret: Option<Arc<ClusterSecret>>,
    member: bool,
    /// The nonce of the last `HELLO`, until a `CLUSTER` uses it.
    nonce: Option<[u8; secret::NONCE_BYTES]>,
    failures: u32,
    allow_status: bool,
    /// For the log line of a failed proof.
    peer: Option<SocketAddr>,
}

/// Verbs a connection may send before it is a member (besides `STATUS` where allowed).
const OPEN_VERBS: [&[u8]; 4] = [b"PING", b"QUIT", b"HELLO", b"CLUSTER"];

impl Gate {
    /// Whether the connection has proven membership.
    pub fn member(&self) -> bool {
        self.member
    }

    /// Decides on one raw request line, and runs the handshake verbs itself.
    pub fn check(&mut self, line: &[u8]) -> Verdict {
        let mut words = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty());
        let Some(verb) = words.next() else {
            return Verdict::Pass;
        };
        let verb = verb.to_ascii_uppercase();
        match verb.as_slice() {
            b"HELLO" => return Verdict::Answer(self.hello()),
            b"CLUSTER" => {
                let cn = words.next();
                let proof = words.next();
                return self.cluster(cn, proof);
            }
            _ => {}
        }
        if self.member
            || OPEN_VERBS.contains(&verb.as_slice())
            || (self.allow_status && verb == b"STATUS")
        {
            return Verdict::Pass;
        }
        Verdict::Answer(Response::err(
            ErrorCode::NoAuth,
            "cluster members only: prove membership with HELLO and CLUSTER (the cluster secret) \
             or a client certificate from the cluster CA",
        ))
    }

    fn hello(&mut self) -> Response {
        if self.secret.is_none() {
            return Response::err(
                ErrorCode::Rejected,
                "this server has no cluster secret (--cluster-secret-file); members use TLS \
                 client certificates or loopback",
            );
        }
        let n = secret::nonce();
        self.nonce = Some(n);
        Response::Ok(vec![secret::hex(&n).into()])
    }

    fn cluster(&mut self, cn: Option<&[u8]>, proof: Option<&[u8]>) -> Verdict {
        let (Some(secret), Some(sn)) = (self.secret.clone(), self.nonce.take()) else {
            return Verdict::Answer(Response::err(
                ErrorCode::Rejected,
                "CLUSTER needs a HELLO first (each HELLO's nonce serves one CLUSTER)",
            ));
        };
        let parsed = cn
            .and_then(secret::unhex::<{ secret::NONCE_BYTES }>)
            .zip(proof.and_then(secret::unhex::<32>));
        let ok = parsed.is_some_and(|(cn, p)| secret.verify(Side::Client, &sn, &cn, &p));
        let Some((cn, _)) = parsed.filter(|_| ok) else {
            self.failures = self.failures.saturating_add(1);
            let who = self.peer.map_or_else(|| "?".to_string(), |p| p.to_string());
            tracing::warn!(
                "failed cluster handshake from {who} ({} of {MAX_HANDSHAKE_FAILURES})",
                self.failures
            );
            let e = Response::err(ErrorCode::NoAuth, "wrong cluster proof");
            return if self.failures >= MAX_HANDSHAKE_FAILURES {
                Verdict::Close(e)
            } else {
                Verdict::Answer(e)
            };
        };
        self.member = true;
        Verdict::Answer(Response::Ok(vec![secret::hex(&secret.proof(
            Side::Server,
            &sn,
            &cn,
        ))
        .into()]))
    }
}

/// Why a client's side of the DKSP handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The server's reply is not what the handshake expects.
    #[error("cluster handshake: {0}")]
    Protocol(String),
    /// The server's proof is wrong: it does not hold our secret.
    #[error("cluster handshake: the server's proof is wrong (another cluster's secret?)")]
    BadServerProof,
}

/// The client's half of the DKSP handshake: the `CLUSTER` line answering a `HELLO`'s nonce, and
/// what is needed to check the server's proof that comes back.
pub struct Challenge {
    /// The `CLUSTER <client nonce> <proof>` line to send.
    pub line: Vec<u8>,
    server_nonce: [u8; secret::NONCE_BYTES],
    client_nonce: [u8; secret::NONCE_BYTES],
}

impl Challenge {
    /// Answers the hex nonce of a `HELLO`'s `OK <nonce>`.
    pub fn answer(
        secret: &ClusterSecret,
        server_nonce_hex: &[u8],
    ) -> Result<Challenge, HandshakeError> {
        let server_nonce =
            secret::unhex::<{ secret::NONCE_BYTES }>(server_nonce_hex).ok_or_else(|| {
                HandshakeError::Protocol("HELLO's nonce is not 32 bytes of hex".into())
            })?;
        let client_nonce = secret::nonce();
        let proof = secret.proof(Side::Client, &server_nonce, &client_nonce);
        let line = format!(
            "CLUSTER {} {}",
            secret::hex(&client_nonce),
            secret::hex(&proof)
        )
        .into_bytes();
        Ok(Challenge {
            line,
            server_nonce,
            client_nonce,
        })
    }

    /// Checks the hex proof of the server's `OK <proof>` answer to `CLUSTER`.
    pub fn check(&self, secret: &ClusterSecret, proof_hex: &[u8]) -> Result<(), HandshakeError> {
        let proof = secret::unhex::<32>(proof_hex).ok_or_else(|| {
            HandshakeError::Protocol("CLUSTER's answer is not 32 bytes of hex".into())
        })?;
        if secret.verify(Side::Server, &self.server_nonce, &self.client_nonce, &proof) {
            Ok(())
        } else {
            Err(HandshakeError::BadServerProof)
        }
    }
}

#[cfg(test)]
mod tests;
