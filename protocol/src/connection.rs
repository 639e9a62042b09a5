//! One DKSP connection, for servers and clients alike.
//!
//! Replies are buffered and written only when no further complete request is already buffered
//! (or the buffer grows large), so a pipelining client gets many replies per syscall while an
//! interactive one sees each reply at once. Reads and flushes are cancel-safe, so a handler can
//! `select!` between the socket and other events (as `TAIL` does).
//!
//! A connection accepted by a server ([`Connection::accepted`]) also enforces the server's
//! [`ConnLimits`]:
//!
//! - **Read budget.** Its read buffer starts at [`BASE_READ_BUFFER`] bytes; every byte it grows
//!   beyond that (only a partial line makes it grow: complete lines are handed out before the
//!   next read) is charged to the server-wide [`ReadBudget`] first. A line that would push the
//!   total past the budget is refused: the connection answers
//!   `ERR UNAVAILABLE server read buffers full ...` after the replies to the requests before it,
//!   and closes (the refused line and anything after it are not executed). Refusing rather than
//!   pausing the read: connections paused in the middle of their lines would hold the budget
//!   until they time out, so one slow set of clients could stop every other.
//! - **Memory back.** Once an enlarged buffer's partial line has been handed out, the buffer is
//!   replaced by a base-sized one (a `BytesMut` keeps its capacity otherwise), and its charge is
//!   returned; the charge is also returned when the connection is dropped.
//! - **Timeouts.** A connection that has not sent one complete line within the handshake
//!   timeout of connecting, or (later) has neither sent nor been sent a byte for the idle
//!   timeout, is answered `ERR UNAVAILABLE ...; closing` and `read_frame` fails with
//!   `TimedOut`, so the handler ends it.
//!
//! Invariant: `charged == rbuf.capacity() - BASE_READ_BUFFER` (saturating) for as long as the
//! buffer is held, and the budget's total is the sum of the live connections' `charged`.

use bytes::{Buf, BytesMut};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use crate::codec::{Frame, LineCodec};
use crate::response::{ErrorCode, Response};
use crate::trust::{Gate, Stream};

/// Flush early once this much output is pending, so a client that pipelines without reading
/// cannot make the server buffer without bound.
const FLUSH_AT: usize = 64 * 1024;

/// A read buffer's starting size, not charged to the [`ReadBudget`] (the connection cap bounds
/// these: 1,024 connections hold 8 MiB).
pub const BASE_READ_BUFFER: usize = 8 * 1024;

/// Free space a read needs; below it the buffer grows by half (geometric, so a long line costs
/// O(n) copying, with at most a third of the buffer's memory unused).
const MIN_READ: usize = 4 * 1024;

/// How long a connection the server closes keeps draining the peer's input after its last
/// reply, so the peer reads that reply instead of a reset (closing with unread input sends RST).
const LINGER: Duration = Duration::from_millis(500);

/// Bytes of enlarged read buffers given back since the allocator was last asked to return
/// free memory to the OS (see `server::reclaim_memory`).
pub(crate) static RELEASED: AtomicUsize = AtomicUsize::new(0);

/// Tells the server's memory reclaimer that `bytes` of a spike were freed outside the read
/// buffers (a server's own buffered transaction writes, say), so it gives them back to the OS
/// as it does for read buffers.
pub fn note_freed(bytes: usize) {
    RELEASED.fetch_add(bytes, Ordering::Relaxed);
}

/// The bytes all connections of a server may hold in enlarged read buffers (partial lines).
#[derive(Debug)]
pub struct ReadBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ReadBudget {
    /// A budget of `limit` bytes, shared by all connections of a server.
    pub fn new(limit: usize) -> Arc<ReadBudget> {
        Arc::new(ReadBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// The budget in bytes (the server's `--max-read-buffer-mib`, in bytes).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes currently charged.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes if they fit under the limit.
    pub(crate) fn try_charge(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    pub(crate) fn release(&self, n: usize) {
        // Never below zero: a release is always of bytes this connection charged.
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

/// What a server enforces on each connection it accepts (`None`: no such limit).
#[derive(Debug, Clone, Default)]
pub struct ConnLimits {
    /// Close a connection that has not sent a complete line within this long of connecting.
    pub handshake_timeout: Option<Duration>,
    /// Close a connection that has neither read nor written for this long.
    pub idle_timeout: Option<Duration>,
    /// The server-wide budget for enlarged read buffers; a connection that cannot grow its buffer
    /// within it is closed.
    pub read_budget: Option<Arc<ReadBudget>>,
}

/// A buffered DKSP connection: framed reads of request lines, batched writes of replies, and the
/// per-connection limits of [`ConnLimits`].
pub struct Connection {
    stream: Stream,
    /// On a cluster port: the connection's membership (see [`crate::trust`]); `None` where
    /// every line goes to the handler (the kvstore, clients).
    gate: Option<Gate>,
    codec: LineCodec,
    rbuf: BytesMut,
    wbuf: BytesMut,
    eof: bool,
    limits: ConnLimits,
    /// Bytes of `rbuf`'s capacity charged to `limits.read_budget`.
    charged: usize,
    connected_at: Instant,
    /// When a byte was last read or written.
    last_activity: Instant,
    /// Whether a complete line has been received (ends the handshake timeout).
    seen_line: bool,
    /// A last line to send after every reply the handler still writes, then close: set when
    /// this side ends the connection (timeout, read budget).
    final_words: Option<Vec<u8>>,
    /// Set with `final_words`: what `read_frame` fails with from then on.
    closing: Option<io::ErrorKind>,
}

impl Connection {
    /// A connection with no limits but the line length (clients use this).
    pub fn new(stream: impl Into<Stream>, max_line: usize) -> Self {
        Self::accepted(stream.into(), max_line, ConnLimits::default())
    }

    /// A server's side of an accepted connection, enforcing `limits`.
    pub fn accepted(stream: Stream, max_line: usize, limits: ConnLimits) -> Self {
        // Replies are small and latency matters more than packet count; batching is done here.
        let _ = stream.tcp().set_nodelay(true);
        let now = Instant::now();
        Self {
            stream,
            gate: None,
            codec: LineCodec::new(max_line),
            rbuf: BytesMut::with_capacity(BASE_READ_BUFFER),
            wbuf: BytesMut::with_capacity(8 * 1024),
            eof: false,
            limits,
            charged: 0,
            connected_at: now,
            last_activity: now,
            seen_line: false,
            final_words: None,
            closing: None,
        }
    }

    /// The request-line limit this connection enforces.
    pub fn max_line(&self) -> usize {
        self.codec.max_line()
    }

    /// The peer's address, if the socket still knows it.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.peer_addr().ok()
    }

    /// The stream underneath (to ask whether it is TLS, or who the peer is).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Puts the connection behind a cluster [`Gate`]: the connection loop then answers the
    /// handshake itself and lets only members' requests through.
    pub fn set_gate(&mut self, gate: Gate) {
        self.gate = Some(gate);
    }

    /// The connection's gate, if it is on a cluster port.
    pub fn gate_mut(&mut self) -> Option<&mut Gate> {
        self.gate.as_mut()
    }

    /// Whether the connection may make member requests: it is on no cluster port (no gate),
    /// or it has proven membership.
    pub fn is_member(&self) -> bool {
        self.gate.as_ref().is_none_or(|g| g.member())
    }

    /// The next frame, or `None` once the peer has closed. Pending output is flushed before
    /// waiting for more input. Fails with `TimedOut` (handshake or idle timeout) or `OutOfMemory`
    /// (read budget) once this side has decided to close; the reason goes out as the last line
    /// at [`shutdown`](Self::shutdown).
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(kind) = self.closing {
                return Err(kind.into());
            }
            if self.wbuf.len() >= FLUSH_AT {
                self.flush().await?;
            }
            if let Some(frame) = self.codec.decode(&mut self.rbuf)? {
                self.seen_line = true;
                self.shrink();
                return Ok(Some(frame));
            }
            if self.eof {
                let last = self.codec.decode_eof(&mut self.rbuf);
                self.shrink();
                return last;
            }
            self.flush().await?;
            if !self.make_room() {
                let limit = self.limits.read_budget.as_ref().map_or(0, |b| b.limit());
                self.close_with(
                    io::ErrorKind::OutOfMemory,
                    format!(
                        "server read buffers full ({} MiB of partial lines); line refused, closing",
                        limit >> 20
                    ),
                );
                continue;
            }
            let deadline = self.deadline();
            let read = tokio::select! {
                r = self.stream.read_buf(&mut self.rbuf) => r?,
                _ = sleep_until_opt(deadline) => {
                    self.timed_out();
                    continue;
                }
            };
            if read == 0 {
                self.eof = true;
            } else {
                self.last_activity = Instant::now();
            }
        }
    }

    /// When the current timeout fires, if one applies.
    fn deadline(&self) -> Option<Instant> {
        if self.seen_line {
            Some(self.last_activity + self.limits.idle_timeout?)
        } else {
            Some(self.connected_at + self.limits.handshake_timeout?)
        }
    }

    fn timed_out(&mut self) {
        let msg = if self.seen_line {
            let t = self.limits.idle_timeout.unwrap_or_default();
            format!("idle for {} s; closing", t.as_secs())
        } else {
            let t = self.limits.handshake_timeout.unwrap_or_default();
            format!("no complete request line within {} s; closing", t.as_secs())
        };
        self.close_with(io::ErrorKind::TimedOut, msg);
    }

    fn close_with(&mut self, kind: io::ErrorKind, msg: String) {
        tracing::debug!("closing the connection from {:?}: {msg}", self.peer_addr());
        self.closing = Some(kind);
        let mut line = Vec::with_capacity(msg.len() + 20);
        Response::err(ErrorCode::Unavailable, msg).encode(&mut line);
        line.push(b'\n');
        self.final_words = Some(line);
        // Nothing more will be read: give the buffer (and its charge) back now.
        self.rbuf = BytesMut::new();
        self.release_all();
    }

    /// Makes sure a read has room, growing the buffer (charged to the budget) if needed.
    /// False if the budget cannot cover the growth.
    fn make_room(&mut self) -> bool {
        let cap = self.rbuf.capacity();
        let len = self.rbuf.len();
        if cap - len >= MIN_READ {
            return true;
        }
        let new_cap = len
            .saturating_add(len / 2)
            .max(len.saturating_add(MIN_READ))
            .max(BASE_READ_BUFFER);
        let need = new_cap.saturating_sub(BASE_READ_BUFFER);
        if let Some(budget) = &self.limits.read_budget {
            if need > self.charged && !budget.try_charge(need - self.charged) {
                return false;
            }
            if need < self.charged {
                budget.release(self.charged - need);
            }
            self.charged = need;
        }
        let mut grown = BytesMut::with_capacity(new_cap);
        grown.extend_from_slice(&self.rbuf);
        self.rbuf = grown;
        true
    }

    /// After a line was handed out: an enlarged buffer holding little is replaced by a
    /// base-sized one, so the memory of a spike goes back.
    fn shrink(&mut self) {
        if self.rbuf.capacity() > BASE_READ_BUFFER && self.rbuf.len() < BASE_READ_BUFFER / 2 {
            let mut small = BytesMut::with_capacity(BASE_READ_BUFFER);
            small.extend_from_slice(&self.rbuf);
            self.rbuf = small;
            self.release_all();
        }
    }

    fn release_all(&mut self) {
        if let Some(budget) = &self.limits.read_budget {
            budget.release(self.charged);
        }
        RELEASED.fetch_add(self.charged, Ordering::Relaxed);
        self.charged = 0;
    }

    /// True if a complete line is already buffered (so a reply can wait for the next flush).
    pub fn has_buffered_line(&self) -> bool {
        self.rbuf.contains(&b'\n')
    }

    /// Queues one line (a terminator is added).
    pub fn write_line(&mut self, line: &[u8]) {
        self.wbuf.extend_from_slice(line);
        self.wbuf.extend_from_slice(b"\n");
    }

    /// Queues one response line.
    pub fn write_response(&mut self, resp: &Response) {
        let mut line = Vec::with_capacity(32);
        resp.encode(&mut line);
        self.write_line(&line);
    }

    /// Writes all queued output. Cancel-safe: bytes leave the buffer only once written.
    pub async fn flush(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            let n = self.stream.write(&self.wbuf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.wbuf.advance(n);
            self.last_activity = Instant::now();
        }
        // TLS may hold written bytes in its own buffer until flushed (a no-op for TCP).
        self.stream.flush().await
    }

    /// Flushes, then closes the write side so the peer sees EOF after the last reply. If this
    /// side decided to close (see [`read_frame`](Self::read_frame)), the reason goes out last,
    /// and the peer's further input is drained for a moment so it reads the reason rather
    /// than a connection reset.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        if let Some(words) = self.final_words.take() {
            self.wbuf.extend_from_slice(&words);
            let _ = tokio::time::timeout(LINGER, self.flush()).await;
            self.stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(LINGER, async {
                while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            return Ok(());
        }
        self.flush().await?;
        self.stream.shutdown().await
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.release_all();
        // A handler that ends without `shutdown` still tells the peer why, if it can without
        // blocking.
        if let Some(words) = self.final_words.take() {
            self.wbuf.extend_from_slice(&words);
            // Only plain TCP can be written without blocking here; under TLS the words are lost.
            if let Stream::Plain(s) = &self.stream {
                let _ = s.try_write(&self.wbuf);
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
