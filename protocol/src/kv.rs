//! Requests of the kvstore, the client-facing MVCC store (port 10000).

use bytes::Bytes;

use crate::cmd::{encode, Cmd};
use crate::response::{ErrorCode, ServerError};
use crate::token;

/// A kvstore request, one line of DKSP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Opens a transaction; answers `OK <txid>`.
    Begin,
    /// The key's value: the transaction's own write, else its snapshot's; outside a transaction
    /// the latest committed one.
    Get {
        /// The key to read.
        key: Bytes,
    },
    /// Writes `value` under `key` (buffered in a transaction, committed at once outside one).
    Put {
        /// The key to write.
        key: Bytes,
        /// The value to store.
        value: Bytes,
    },
    /// Deletes `key` (buffered in a transaction, committed at once outside one).
    Del {
        /// The key to delete.
        key: Bytes,
    },
    /// Keys in `[start, end)`, sorted, at most `limit`.
    Scan {
        /// The first key of the range (inclusive).
        start: Bytes,
        /// The end of the range (exclusive).
        end: Bytes,
        /// At most this many rows.
        limit: Option<u64>,
    },
    /// Commits the open transaction: `COMMITTED <ts>` or `ABORTED <reason>`.
    Commit,
    /// Discards the open transaction.
    Abort,
    /// Answers `PONG`.
    Ping,
    /// Answers `OK key=value ...` with the server's counters.
    Status,
    /// Diagnostic: the marks `--trace-hops` recorded since the last `HOPS`, one
    /// `OK <hop> <key> <aux> <t_ns>` line each, then `END`; `ERR UNAVAILABLE` when tracing is off.
    Hops,
    /// Answers `OK`, then the server closes the connection.
    Quit,
    /// Authenticates the connection as `user`: `OK`, or `ERR WRONGPASS` (one message for an
    /// unknown user and a wrong password).
    Auth {
        /// The user name.
        user: Bytes,
        /// The password, as sent (never shown by `Debug`).
        password: Password,
    },
}

/// A password as it arrived in `AUTH`. Its `Debug` does not show it, so no log line or test
/// failure that prints a request prints a password.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub Bytes);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

impl Request {
    /// Parses a request line; `Ok(None)` for a blank line.
    pub fn parse(line: &[u8]) -> Result<Option<Request>, ServerError> {
        let Some(c) = Cmd::parse(line)? else {
            return Ok(None);
        };
        let req = match c.verb.as_str() {
            "BEGIN" => c.arity(0, 0, "BEGIN").map(|_| Request::Begin)?,
            "GET" => {
                c.arity(1, 1, "GET <key>")?;
                Request::Get { key: c.key(0)? }
            }
            "PUT" => {
                c.arity(2, 2, "PUT <key> <value>")?;
                Request::Put {
                    key: c.key(0)?,
                    value: c.args[1].clone(),
                }
            }
            "DEL" => {
                c.arity(1, 1, "DEL <key>")?;
                Request::Del { key: c.key(0)? }
            }
            "SCAN" => {
                const USAGE: &str = "SCAN <start> <end> [LIMIT n]";
                c.arity(2, 4, USAGE)?;
                // Past the bounds come options; name the one that is wrong rather than count.
                let limit = match c.args.get(2) {
                    None => None,
                    Some(opt) if !opt.eq_ignore_ascii_case(b"LIMIT") => {
                        return Err(ServerError::new(
                            ErrorCode::Syntax,
                            format!(
                                "unknown SCAN option {}; usage: {USAGE}",
                                token::display(opt)
                            ),
                        ));
                    }
                    Some(_) if c.args.len() == 3 => {
                        return Err(ServerError::new(
                            ErrorCode::Syntax,
                            format!("LIMIT needs a count; usage: {USAGE}"),
                        ));
                    }
                    Some(_) => Some(c.u64(3, "LIMIT")?),
                };
                // The bounds are not keys: "" is a valid start (from the beginning).
                Request::Scan {
                    start: c.args[0].clone(),
                    end: c.args[1].clone(),
                    limit,
                }
            }
            "COMMIT" => c.arity(0, 0, "COMMIT").map(|_| Request::Commit)?,
            "ABORT" => c.arity(0, 0, "ABORT").map(|_| Request::Abort)?,
            "PING" => c.arity(0, 0, "PING").map(|_| Request::Ping)?,
            "STATUS" => c.arity(0, 0, "STATUS").map(|_| Request::Status)?,
            "HOPS" => c.arity(0, 0, "HOPS").map(|_| Request::Hops)?,
            "QUIT" => c.arity(0, 0, "QUIT").map(|_| Request::Quit)?,
            "AUTH" => {
                c.arity(2, 2, "AUTH <user> <password>")?;
                Request::Auth {
                    user: c.args[0].clone(),
                    password: Password(c.args[1].clone()),
                }
            }
            _ => return Err(c.unknown()),
        };
        Ok(Some(req))
    }

    /// Writes the request line, without its terminator.
    pub fn encode(&self) -> Vec<u8> {
        let none: [&[u8]; 0] = [];
        match self {
            Request::Begin => encode("BEGIN", &none),
            Request::Get { key } => encode("GET", &[key]),
            Request::Put { key, value } => encode("PUT", &[key, value]),
            Request::Del { key } => encode("DEL", &[key]),
            Request::Scan { start, end, limit } => match limit {
                None => encode("SCAN", &[start, end]),
                Some(n) => encode(
                    "SCAN",
                    &[
                        start.as_ref(),
                        end.as_ref(),
                        b"LIMIT",
                        n.to_string().as_bytes(),
                    ],
                ),
            },
            Request::Commit => encode("COMMIT", &none),
            Request::Abort => encode("ABORT", &none),
            Request::Ping => encode("PING", &none),
            Request::Status => encode("STATUS", &none),
            Request::Hops => encode("HOPS", &none),
            Request::Quit => encode("QUIT", &none),
            Request::Auth { user, password } => encode("AUTH", &[user, &password.0]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_takes_a_user_and_a_password_and_never_shows_the_password() {
        let r = Request::parse(br#"auth alice "s3cret pass""#).unwrap();
        let Some(r @ Request::Auth { .. }) = r else {
            panic!("{r:?}");
        };
        assert_eq!(
            r,
            Request::Auth {
                user: "alice".into(),
                password: Password("s3cret pass".into()),
            }
        );
        assert!(!format!("{r:?}").contains("s3cret"), "{r:?}");
        assert_eq!(r.encode(), br#"AUTH alice "s3cret pass""#.to_vec());
        assert_eq!(Request::parse(&r.encode()).unwrap(), Some(r));
        for bad in ["AUTH", "AUTH alice", "AUTH a b c"] {
            let e = err(bad);
            assert_eq!(e.code, ErrorCode::Syntax, "{bad}");
            assert!(e.message.contains("usage: AUTH <user> <password>"), "{e}");
        }
    }

    fn err(line: &str) -> ServerError {
        match Request::parse(line.as_bytes()) {
            Err(e) => e,
            Ok(r) => panic!("{line:?} parsed as {r:?}"),
        }
    }

    #[test]
    fn scan_names_an_unknown_option_instead_of_counting_arguments() {
        let e = err("SCAN a b FOO 3");
        assert_eq!(e.code, ErrorCode::Syntax);
        assert!(e.message.contains("unknown SCAN option FOO"), "{e}");
        assert!(err("SCAN a b FOO")
            .message
            .contains("unknown SCAN option FOO"));
        assert!(err("SCAN a b LIMIT")
            .message
            .contains("LIMIT needs a count"));
        assert!(err("SCAN a b LIMIT x").message.contains("LIMIT"));
        // A client's token is named, not echoed in full: a pipelined burst of these must not
        // make the server hold (or send) megabytes of error text.
        let long = format!("SCAN a b {} 3", "F".repeat(1 << 20));
        assert!(
            err(&long).message.len() < 300,
            "the option is echoed in full"
        );
        assert!(err("SCAN a b LIMIT 1 2")
            .message
            .contains("wrong number of arguments (5)"));
        assert!(err("SCAN a")
            .message
            .contains("wrong number of arguments (1)"));
        assert_eq!(
            Request::parse(b"scan a b limit 3").unwrap(),
            Some(Request::Scan {
                start: "a".into(),
                end: "b".into(),
                limit: Some(3)
            })
        );
        assert_eq!(
            Request::parse(b"SCAN a b").unwrap(),
            Some(Request::Scan {
                start: "a".into(),
                end: "b".into(),
                limit: None
            })
        );
    }
}
