//! Requests of the sequencer, the timestamp oracle (port 10001).

use crate::cmd::{encode, Cmd};
use crate::response::{ErrorCode, ServerError};

/// The largest block one `NEXT <n>` may reserve.
pub const MAX_BLOCK: u64 = 1_000_000;

/// A sequencer request, one line of DKSP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `NEXT` (count = None) answers `TS <t>`; `NEXT <n>` answers `TS <first> <n>`.
    Next {
        /// `None` for one timestamp, `Some(n)` for a block of `n` (1 to [`MAX_BLOCK`]).
        count: Option<u64>,
    },
    /// The highest timestamp handed out so far.
    Current,
    /// Answers `PONG`.
    Ping,
    /// Answers `OK key=value ...` with the durable mark and counters.
    Status,
    /// Answers `OK`, then the server closes the connection.
    Quit,
}

impl Request {
    /// Parses a request line; `Ok(None)` for a blank line.
    pub fn parse(line: &[u8]) -> Result<Option<Request>, ServerError> {
        let Some(c) = Cmd::parse(line)? else {
            return Ok(None);
        };
        let req = match c.verb.as_str() {
            "NEXT" => {
                c.arity(0, 1, "NEXT [n]")?;
                let count = match c.args.len() {
                    0 => None,
                    _ => {
                        let n = c.u64(0, "block size")?;
                        if n == 0 || n > MAX_BLOCK {
                            return Err(ServerError::new(
                                ErrorCode::Syntax,
                                format!("block size must be 1 to {MAX_BLOCK}, got {n}"),
                            ));
                        }
                        Some(n)
                    }
                };
                Request::Next { count }
            }
            "CURRENT" => c.arity(0, 0, "CURRENT").map(|_| Request::Current)?,
            "PING" => c.arity(0, 0, "PING").map(|_| Request::Ping)?,
            "STATUS" => c.arity(0, 0, "STATUS").map(|_| Request::Status)?,
            "QUIT" => c.arity(0, 0, "QUIT").map(|_| Request::Quit)?,
            _ => return Err(c.unknown()),
        };
        Ok(Some(req))
    }

    /// The request as a line (without the `
    /// `); `parse` gives it back.
    pub fn encode(&self) -> Vec<u8> {
        let none: [&[u8]; 0] = [];
        match self {
            Request::Next { count: None } => encode("NEXT", &none),
            Request::Next { count: Some(n) } => encode("NEXT", &[n.to_string()]),
            Request::Current => encode("CURRENT", &none),
            Request::Ping => encode("PING", &none),
            Request::Status => encode("STATUS", &none),
            Request::Quit => encode("QUIT", &none),
        }
    }
}
