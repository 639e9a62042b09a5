//! Framing: `\n`-terminated lines with a length limit.
//!
//! A line longer than the limit must not kill the connection (a person pasting too much into `nc`
//! should get an error and carry on), so the decoder turns it into [`Frame::TooLong`] and discards
//! bytes up to the next newline without buffering them. The `TooLong` frame is produced when the
//! oversized line *ends*, so every line still gets exactly one response, in order.
//!
//! A line ends at `\n`; any `\r`s just before it are part of the terminator (`\r\n`, and the
//! `\r\r\n` of tools that convert line ends twice).
//!
//! A final line without a terminating newline (the peer closed mid-line) is dropped, never
//! executed: a truncated `PUT k value` must not store a truncated value.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Default maximum line length, in bytes, excluding the terminator.
pub const DEFAULT_MAX_LINE: usize = 1024 * 1024;

/// One decoded unit of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its `\n` and the `\r`s before it.
    Line(Bytes),
    /// A line that exceeded the limit; its bytes were discarded.
    TooLong,
}

/// Splits a byte stream into [`Frame`]s and writes lines.
#[derive(Debug, Clone)]
pub struct LineCodec {
    max_line: usize,
    /// Bytes already searched for `\n`, so a slowly arriving long line is not rescanned.
    scanned: usize,
    /// Inside an oversized line, discarding until the next `\n`.
    discarding: bool,
}

impl LineCodec {
    /// A codec that refuses lines longer than `max_line` bytes (without the `
    /// `).
    pub fn new(max_line: usize) -> Self {
        Self {
            max_line,
            scanned: 0,
            discarding: false,
        }
    }

    /// The longest line this codec accepts, in bytes.
    pub fn max_line(&self) -> usize {
        self.max_line
    }
}

impl Default for LineCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE)
    }
}

impl Decoder for LineCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        loop {
            let newline = buf[self.scanned..].iter().position(|&b| b == b'\n');
            match newline {
                Some(pos) => {
                    let end = self.scanned + pos;
                    self.scanned = 0;
                    if self.discarding {
                        self.discarding = false;
                        buf.advance(end + 1);
                        return Ok(Some(Frame::TooLong));
                    }
                    let mut line = buf.split_to(end + 1);
                    // Every trailing `\r` belongs to the terminator, not just one: tools that
                    // convert line ends twice send `\r\r\n`, and a bare `\r` means nothing in
                    // DKSP (a value ending in CR is written quoted, `"v\r"`).
                    let content = line[..end]
                        .iter()
                        .rposition(|&b| b != b'\r')
                        .map_or(0, |i| i + 1);
                    line.truncate(content);
                    if line.len() > self.max_line {
                        return Ok(Some(Frame::TooLong));
                    }
                    return Ok(Some(Frame::Line(line.freeze())));
                }
                None if self.discarding => {
                    buf.clear();
                    self.scanned = 0;
                    return Ok(None);
                }
                None if buf.len() > self.max_line + 1 => {
                    // +1 leaves room for a '\r' that belongs to the terminator.
                    self.discarding = true;
                    self.scanned = 0;
                    buf.clear();
                    continue;
                }
                None => {
                    self.scanned = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None => {
                // An unterminated final line is dropped on purpose; see the module comment.
                buf.clear();
                self.scanned = 0;
                self.discarding = false;
                Ok(None)
            }
        }
    }
}

/// Encodes a complete line; the codec appends the `\n`.
impl<T: AsRef<[u8]>> Encoder<T> for LineCodec {
    type Error = std::io::Error;

    fn encode(&mut self, line: T, dst: &mut BytesMut) -> Result<(), Self::Error> {
        let line = line.as_ref();
        dst.reserve(line.len() + 1);
        dst.put_slice(line);
        dst.put_u8(b'\n');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut LineCodec, input: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        // Feed one byte at a time to exercise partial reads.
        for &b in input {
            buf.put_u8(b);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        while let Some(f) = codec.decode_eof(&mut buf).unwrap() {
            out.push(f);
        }
        out
    }

    fn line(s: &str) -> Frame {
        Frame::Line(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn splits_lines_and_accepts_crlf() {
        let mut c = LineCodec::new(16);
        assert_eq!(
            decode_all(&mut c, b"PING\r\nGET a\n\n"),
            vec![line("PING"), line("GET a"), line("")]
        );
    }

    #[test]
    fn every_carriage_return_before_the_newline_is_part_of_the_terminator() {
        let mut c = LineCodec::new(16);
        assert_eq!(
            decode_all(&mut c, b"PING\r\r\nGET a\r\r\r\n\r\nGET\rb\n"),
            vec![line("PING"), line("GET a"), line(""), line("GET\rb")]
        );
    }

    #[test]
    fn oversized_line_is_skipped_and_stream_continues() {
        let mut c = LineCodec::new(8);
        let input = b"PING\nthis line is far too long for the limit\nPING\n";
        assert_eq!(
            decode_all(&mut c, input),
            vec![line("PING"), Frame::TooLong, line("PING")]
        );
    }

    #[test]
    fn line_exactly_at_limit_is_accepted() {
        let mut c = LineCodec::new(4);
        assert_eq!(
            decode_all(&mut c, b"abcd\r\nabcde\n"),
            vec![line("abcd"), Frame::TooLong]
        );
    }

    #[test]
    fn truncated_final_line_is_dropped() {
        let mut c = LineCodec::new(64);
        assert_eq!(decode_all(&mut c, b"PING\nPUT k val"), vec![line("PING")]);
    }
}
