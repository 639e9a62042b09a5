//! Response lines, shared by every DKSP server.
//!
//! The request languages differ per process (see [`crate::kv`], [`crate::seq`], [`crate::log`]) but
//! the reply shapes overlap (`OK`, `PONG`, `ERR`), so one enum holds them all: a client can parse any
//! line without knowing which server sent it, and a typed client narrows it down.

use bytes::Bytes;
use std::fmt;

use crate::token;

/// The error codes of `ERR <CODE> <message>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The line does not parse, or a command has the wrong arguments.
    Syntax,
    /// The verb is not one this server knows.
    UnknownCommand,
    /// `COMMIT`/`ABORT` with no transaction open.
    NoTxn,
    /// `BEGIN` inside a transaction.
    TxnActive,
    /// A line, key or value over its limit.
    TooLarge,
    /// The server cannot serve this now (replaying, no quorum, dependency down); retry later.
    Unavailable,
    /// A bug or an unexpected failure on the server's side.
    Internal,
    /// `READ` from before the first retained log index; the message is that index.
    Compacted,
    /// A checkpoint or other object that does not exist.
    NotFound,
    /// A writer that has been fenced off by a newer one.
    Fenced,
    /// A well-formed request the current state refuses (e.g. a checkpoint chunk out of order).
    Rejected,
    /// The connection has not authenticated: `AUTH` on the kvstore, the cluster handshake
    /// (`HELLO`/`CLUSTER`) on the sequencer and logserver. Not retryable as is.
    NoAuth,
    /// `AUTH` with an unknown user or a wrong password (one message for both).
    WrongPass,
    /// The authenticated user may not do this (a key outside its grants, an admin command).
    Denied,
}

impl ErrorCode {
    /// Every code, for parsing and tests.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::Syntax,
        ErrorCode::UnknownCommand,
        ErrorCode::NoTxn,
        ErrorCode::TxnActive,
        ErrorCode::TooLarge,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Compacted,
        ErrorCode::NotFound,
        ErrorCode::Fenced,
        ErrorCode::Rejected,
        ErrorCode::NoAuth,
        ErrorCode::WrongPass,
        ErrorCode::Denied,
    ];

    /// The code as written on the wire, e.g. `TOO_LARGE`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Syntax => "SYNTAX",
            ErrorCode::UnknownCommand => "UNKNOWN_COMMAND",
            ErrorCode::NoTxn => "NO_TXN",
            ErrorCode::TxnActive => "TXN_ACTIVE",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Compacted => "COMPACTED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Fenced => "FENCED",
            ErrorCode::Rejected => "REJECTED",
            ErrorCode::NoAuth => "NOAUTH",
            ErrorCode::WrongPass => "WRONGPASS",
            ErrorCode::Denied => "DENIED",
        }
    }

    /// Whether the same request may succeed if sent again later: only `UNAVAILABLE`. Every
    /// other code is a deterministic answer to this request in this state, never retried.
    pub fn retryable(self) -> bool {
        self == ErrorCode::Unavailable
    }

    /// The code written `s`, if any.
    pub fn parse(s: &[u8]) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str().as_bytes() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `ERR` reply: a code for programs and a one-line message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {message}")]
pub struct ServerError {
    /// What the caller should do.
    pub code: ErrorCode,
    /// A one-line explanation for people.
    pub message: String,
}

impl ServerError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// For `ERR COMPACTED <first>`: the first index the log still holds (`None` for any other
    /// error, or a message that is not a number).
    pub fn compacted_first(&self) -> Option<u64> {
        if self.code != ErrorCode::Compacted {
            return None;
        }
        parse_u64(self.message.trim().as_bytes()).ok()
    }
}

/// One response line (or, for `SCAN`/`READ`/`TAIL`, one line of a multi-line answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `OK [arg ...]`: success, with optional results (`OK <txid>`, `OK <index>`, `OK k=v ...`).
    Ok(Vec<Bytes>),
    /// `PONG`: the answer to `PING`.
    Pong,
    /// `VALUE <value>`
    Value(Bytes),
    /// `NIL`: no such key.
    Nil,
    /// `KV <key> <value>`: one row of a `SCAN`.
    Kv(Bytes, Bytes),
    /// `END`: the end of a `SCAN` or `READ`.
    End,
    /// `COMMITTED <commit_ts>`
    Committed(u64),
    /// `ABORTED <reason> [detail ...]`, e.g. `ABORTED CONFLICT user:1`.
    Aborted(Vec<Bytes>),
    /// `TS <t>` (count = None) or `TS <first> <n>`.
    Ts {
        /// The timestamp, or the first of the block.
        first: u64,
        /// The block's size for `NEXT <n>`.
        count: Option<u64>,
    },
    /// `ENTRY <index> <payload>`: one log entry of a `READ` or `TAIL`.
    Entry(u64, Bytes),
    /// `REDIRECT <host:port>`: ask the leader instead.
    Redirect(String),
    /// `ERR <CODE> <message>`
    Err(ServerError),
}

impl Response {
    /// `OK` with no arguments.
    pub fn ok() -> Self {
        Response::Ok(Vec::new())
    }

    /// `ERR <code> <message>`.
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Err(ServerError::new(code, message))
    }

    /// The reply to a line over the limit (the server has skipped to the next newline).
    pub fn too_large(max_line: usize) -> Self {
        Response::err(
            ErrorCode::TooLarge,
            format!("line exceeds {max_line} bytes; skipped to the next newline"),
        )
    }

    /// `OK key=value ...` as sent by `STATUS`.
    pub fn status<K: fmt::Display, V: fmt::Display>(pairs: &[(K, V)]) -> Self {
        Response::Ok(
            pairs
                .iter()
                .map(|(k, v)| Bytes::from(format!("{k}={v}")))
                .collect(),
        )
    }

    /// Writes the line without its terminator.
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn with_args(out: &mut Vec<u8>, verb: &str, args: &[&[u8]]) {
            out.extend_from_slice(verb.as_bytes());
            for a in args {
                out.push(b' ');
                token::write_arg(out, a);
            }
        }
        match self {
            Response::Ok(args) => {
                let args: Vec<&[u8]> = args.iter().map(|a| a.as_ref()).collect();
                with_args(out, "OK", &args)
            }
            Response::Pong => out.extend_from_slice(b"PONG"),
            Response::Value(v) => with_args(out, "VALUE", &[v]),
            Response::Nil => out.extend_from_slice(b"NIL"),
            Response::Kv(k, v) => with_args(out, "KV", &[k, v]),
            Response::End => out.extend_from_slice(b"END"),
            Response::Committed(ts) => out.extend_from_slice(format!("COMMITTED {ts}").as_bytes()),
            Response::Aborted(args) => {
                let args: Vec<&[u8]> = args.iter().map(|a| a.as_ref()).collect();
                with_args(out, "ABORTED", &args)
            }
            Response::Ts { first, count: None } => {
                out.extend_from_slice(format!("TS {first}").as_bytes())
            }
            Response::Ts {
                first,
                count: Some(n),
            } => out.extend_from_slice(format!("TS {first} {n}").as_bytes()),
            Response::Entry(index, payload) => {
                with_args(out, &format!("ENTRY {index}"), &[payload])
            }
            Response::Redirect(addr) => with_args(out, "REDIRECT", &[addr.as_bytes()]),
            Response::Err(e) => {
                out.extend_from_slice(b"ERR ");
                out.extend_from_slice(e.code.as_str().as_bytes());
                if !e.message.is_empty() {
                    out.push(b' ');
                    // The message runs to the end of the line, so it must not contain one.
                    for c in e.message.chars() {
                        if c.is_control() {
                            out.push(b' ');
                        } else {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
            }
        }
    }

    /// The reply as a line (without the `
    /// `).
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Parses one response line (without its terminator).
    pub fn parse(line: &[u8]) -> Result<Response, ParseError> {
        if let Some(rest) = line.strip_prefix(b"ERR ") {
            let (code, message) = match rest.iter().position(|&b| b == b' ') {
                Some(p) => (&rest[..p], &rest[p + 1..]),
                None => (rest, &b""[..]),
            };
            let code = ErrorCode::parse(code)
                .ok_or_else(|| ParseError::UnknownErrorCode(token::display(code)))?;
            return Ok(Response::err(
                code,
                String::from_utf8_lossy(message).into_owned(),
            ));
        }
        let mut args = token::split(line)?.into_iter();
        let verb = args.next().ok_or(ParseError::Empty)?;
        let rest: Vec<Bytes> = args.collect();
        let want = |n: usize| -> Result<(), ParseError> {
            if rest.len() == n {
                Ok(())
            } else {
                Err(ParseError::Arity {
                    verb: String::from_utf8_lossy(&verb).into_owned(),
                    want: n,
                    got: rest.len(),
                })
            }
        };
        Ok(match &verb[..] {
            b"OK" => Response::Ok(rest),
            b"PONG" => {
                want(0)?;
                Response::Pong
            }
            b"VALUE" => {
                want(1)?;
                Response::Value(rest[0].clone())
            }
            b"NIL" => {
                want(0)?;
                Response::Nil
            }
            b"KV" => {
                want(2)?;
                Response::Kv(rest[0].clone(), rest[1].clone())
            }
            b"END" => {
                want(0)?;
                Response::End
            }
            b"COMMITTED" => {
                want(1)?;
                Response::Committed(parse_u64(&rest[0])?)
            }
            b"ABORTED" => Response::Aborted(rest),
            b"TS" if rest.len() == 1 => Response::Ts {
                first: parse_u64(&rest[0])?,
                count: None,
            },
            b"TS" => {
                want(2)?;
                Response::Ts {
                    first: parse_u64(&rest[0])?,
                    count: Some(parse_u64(&rest[1])?),
                }
            }
            b"ENTRY" => {
                want(2)?;
                Response::Entry(parse_u64(&rest[0])?, rest[1].clone())
            }
            b"REDIRECT" => {
                want(1)?;
                Response::Redirect(String::from_utf8_lossy(&rest[0]).into_owned())
            }
            other => return Err(ParseError::UnknownVerb(token::display(other))),
        })
    }
}

/// Why a response line did not parse. A client treats every kind alike (the peer does not speak
/// DKSP as this build knows it: drop the connection); the kinds say what to look for in a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// `ERR` with a code this build does not know (shown quoted as needed).
    #[error("unknown error code {0}")]
    UnknownErrorCode(String),
    /// The line does not split into arguments (bad quoting).
    #[error(transparent)]
    Token(#[from] token::TokenError),
    /// A blank line.
    #[error("empty response line")]
    Empty,
    /// A known reply with the wrong number of arguments.
    #[error("{verb} takes {want} arguments, got {got}")]
    Arity {
        /// The reply's first word.
        verb: String,
        /// How many arguments it takes.
        want: usize,
        /// How many the line had.
        got: usize,
    },
    /// An argument that must be a number is not one.
    #[error(transparent)]
    Number(#[from] NumberError),
    /// A first word that is no reply this build knows (shown quoted as needed).
    #[error("unknown response {0}")]
    UnknownVerb(String),
}

/// Why an argument is not a strict decimal u64. The strings are the argument as
/// [`token::display`] shows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    /// Empty, or something other than ASCII digits (a sign, a space, a letter).
    #[error("{0} is not a number")]
    NotANumber(String),
    /// Digits only, but more than `u64::MAX`.
    #[error("{0} is out of range")]
    OutOfRange(String),
}

/// Strict decimal u64: digits only, no sign, no overflow.
pub fn parse_u64(arg: &[u8]) -> Result<u64, NumberError> {
    if arg.is_empty() || !arg.iter().all(u8::is_ascii_digit) {
        return Err(NumberError::NotANumber(token::display(arg)));
    }
    std::str::from_utf8(arg)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| NumberError::OutOfRange(token::display(arg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_reply_line_says_what_is_wrong_with_it() {
        assert_eq!(
            Response::parse(b"ERR NOPE x"),
            Err(ParseError::UnknownErrorCode("NOPE".into()))
        );
        assert_eq!(Response::parse(b""), Err(ParseError::Empty));
        assert_eq!(
            Response::parse(b"PONG 1"),
            Err(ParseError::Arity {
                verb: "PONG".into(),
                want: 0,
                got: 1
            })
        );
        assert_eq!(
            Response::parse(b"COMMITTED -1"),
            Err(ParseError::Number(NumberError::NotANumber("-1".into())))
        );
        assert_eq!(
            Response::parse(b"HELLO"),
            Err(ParseError::UnknownVerb("HELLO".into()))
        );
        assert!(matches!(
            Response::parse(b"OK \"unterminated"),
            Err(ParseError::Token(_))
        ));
        // The messages are the ones clients have always logged.
        assert_eq!(
            Response::parse(b"PONG 1").unwrap_err().to_string(),
            "PONG takes 0 arguments, got 1"
        );
    }

    #[test]
    fn a_number_is_digits_only_and_fits_a_u64() {
        assert_eq!(parse_u64(b"18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_u64(b"18446744073709551616"),
            Err(NumberError::OutOfRange("18446744073709551616".into()))
        );
        assert_eq!(parse_u64(b""), Err(NumberError::NotANumber("\"\"".into())));
        assert_eq!(
            parse_u64(b"+1").unwrap_err().to_string(),
            "+1 is not a number"
        );
    }
}
