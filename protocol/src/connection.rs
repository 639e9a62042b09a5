//! One DKSP connection, for servers and clients alike.
//!
//! Replies are buffered and written only when no further complete request is already buffered
//! (or the buffer grows large), so a pipelining client gets many replies per syscall while an
//! interactive one sees each reply at once. Reads and flushes are cancel-safe, so a handler can
//! `select!` between the socket and other events (as `TAIL` does).

use bytes::{Buf, BytesMut};
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;

use crate::codec::{Frame, LineCodec};
use crate::response::Response;

/// Flush early once this much output is pending, so a client that pipelines without reading
/// cannot make the server buffer without bound.
const FLUSH_AT: usize = 64 * 1024;

pub struct Connection {
    stream: TcpStream,
    codec: LineCodec,
    rbuf: BytesMut,
    wbuf: BytesMut,
    eof: bool,
}

impl Connection {
    pub fn new(stream: TcpStream, max_line: usize) -> Self {
        // Replies are small and latency matters more than packet count; batching is done here.
        let _ = stream.set_nodelay(true);
        Self {
            stream,
            codec: LineCodec::new(max_line),
            rbuf: BytesMut::with_capacity(8 * 1024),
            wbuf: BytesMut::with_capacity(8 * 1024),
            eof: false,
        }
    }

    /// The request-line limit this connection enforces.
    pub fn max_line(&self) -> usize {
        self.codec.max_line()
    }

    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.peer_addr().ok()
    }

    /// The next frame, or `None` once the peer has closed. Pending output is flushed before
    /// waiting for more input.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if self.wbuf.len() >= FLUSH_AT {
                self.flush().await?;
            }
            if let Some(frame) = self.codec.decode(&mut self.rbuf)? {
                return Ok(Some(frame));
            }
            if self.eof {
                return self.codec.decode_eof(&mut self.rbuf);
            }
            self.flush().await?;
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                self.eof = true;
            }
        }
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
        }
        Ok(())
    }

    /// Flushes, then closes the write side so the peer sees EOF after the last reply.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.stream.shutdown().await
    }
}
