//! Requests of the logserver, the replicated write-ahead log (ports 10002, 10012, 10022).

use bytes::Bytes;

use crate::cmd::{encode, Cmd};
use crate::response::{ErrorCode, ServerError};

/// The logserver's default `--max-line`, in bytes: 8 MiB. The kvstore accepts at most 1 MiB of
/// keys and values per transaction (`--max-txn-bytes`); quoted into a log record that is at most
/// about 4x (`\xHH` for every byte) and quoted again into the `APPEND` line about 5x, so any
/// accepted transaction fits one `APPEND` with room to spare (a kvstore test encodes the worst
/// case). The kvstore's committer also packs commits into one entry only up to a fraction of it.
pub const LOG_MAX_LINE: usize = 8 * 1024 * 1024;

/// A logserver request, one line of DKSP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Append `payload` exactly once per `(client, seq)`; answers `OK <index>` once committed.
    Append {
        /// The writer's id; with `seq` it names the append for exactly-once delivery.
        client: Bytes,
        /// The writer's sequence number for this append.
        seq: u64,
        /// The entry's bytes.
        payload: Bytes,
    },
    /// Committed entries from `from`, at most `max`, then `END`.
    Read {
        /// The first logical index to read.
        from: u64,
        /// At most this many entries.
        max: Option<u64>,
    },
    /// Committed entries from `from` as they commit, until the client closes; with `prefix`,
    /// only the entries that hold a line starting with it.
    Tail {
        /// The first logical index to send.
        from: u64,
        /// Only entries holding a line that starts with these bytes.
        prefix: Option<Bytes>,
    },
    /// Adds replica `id` to the Raft group (leader only).
    AddReplica {
        /// The new replica's id.
        id: u64,
        /// Where the new replica listens for Raft RPCs.
        raft_addr: String,
        /// Where the new replica listens for DKSP.
        dksp_addr: String,
        /// `FORCE`: make the change even if it leaves fewer than 3 voters or no reachable
        /// majority (logged).
        force: bool,
    },
    /// Removes replica `id` from the Raft group (leader only).
    RemoveReplica {
        /// The replica to remove.
        id: u64,
        /// `FORCE`: make the change even if it leaves fewer than 3 voters or no reachable
        /// majority (logged).
        force: bool,
    },
    /// Stage `data` at `offset` of checkpoint upload `id` (offset 0 starts a new upload).
    CkptPut {
        /// The upload's id.
        id: u64,
        /// Where in the upload `data` goes.
        offset: u64,
        /// The chunk's bytes.
        data: Bytes,
    },
    /// Make upload `id` (`len` bytes, CRC32C `crc`) the checkpoint as of logical index `index`.
    CkptCommit {
        /// The upload's id.
        id: u64,
        /// The logical log index the checkpoint covers (entries up to it may be compacted).
        index: u64,
        /// The upload's total length in bytes.
        len: u64,
        /// The CRC32C of the whole upload.
        crc: u32,
    },
    /// The current checkpoint's id, index, length and CRC.
    CkptInfo,
    /// Up to `max` bytes of checkpoint `id` from `offset`.
    CkptRead {
        /// The checkpoint's id.
        id: u64,
        /// The first byte to read.
        offset: u64,
        /// At most this many bytes.
        max: u64,
    },
    /// Answers `PONG`.
    Ping,
    /// Answers `OK key=value ...` with the replica's role, indices and counters.
    Status,
    /// Diagnostic: the marks `--trace-hops` recorded since the last `HOPS`, one
    /// `OK <hop> <key> <aux> <t_ns>` line each, then `END`; `ERR UNAVAILABLE` when tracing is off.
    Hops,
    /// Answers `OK`, then the server closes the connection.
    Quit,
}

impl Request {
    /// Parses a request line; `Ok(None)` for a blank line.
    pub fn parse(line: &[u8]) -> Result<Option<Request>, ServerError> {
        let Some(c) = Cmd::parse(line)? else {
            return Ok(None);
        };
        let text = |i: usize| String::from_utf8_lossy(&c.args[i]).into_owned();
        let req = match c.verb.as_str() {
            "APPEND" => {
                c.arity(3, 3, "APPEND <client> <seq> <payload>")?;
                Request::Append {
                    client: c.key(0)?,
                    seq: c.u64(1, "seq")?,
                    payload: c.args[2].clone(),
                }
            }
            "READ" => {
                c.arity(1, 2, "READ <from> [max]")?;
                Request::Read {
                    from: c.u64(0, "from")?,
                    max: if c.args.len() == 2 {
                        Some(c.u64(1, "max")?)
                    } else {
                        None
                    },
                }
            }
            "TAIL" => {
                c.arity(1, 2, "TAIL <from> [prefix]")?;
                Request::Tail {
                    from: c.u64(0, "from")?,
                    prefix: if c.args.len() == 2 {
                        Some(c.key(1)?)
                    } else {
                        None
                    },
                }
            }
            "ADD_REPLICA" => {
                const USAGE: &str = "ADD_REPLICA <id> <raft-addr> <dksp-addr> [FORCE]";
                c.arity(3, 4, USAGE)?;
                Request::AddReplica {
                    id: c.u64(0, "id")?,
                    raft_addr: text(1),
                    dksp_addr: text(2),
                    force: force_flag(&c, 3, USAGE)?,
                }
            }
            "REMOVE_REPLICA" => {
                const USAGE: &str = "REMOVE_REPLICA <id> [FORCE]";
                c.arity(1, 2, USAGE)?;
                Request::RemoveReplica {
                    id: c.u64(0, "id")?,
                    force: force_flag(&c, 1, USAGE)?,
                }
            }
            "CKPT_PUT" => {
                c.arity(3, 3, "CKPT_PUT <id> <offset> <data>")?;
                Request::CkptPut {
                    id: c.u64(0, "id")?,
                    offset: c.u64(1, "offset")?,
                    data: c.args[2].clone(),
                }
            }
            "CKPT_COMMIT" => {
                c.arity(4, 4, "CKPT_COMMIT <id> <index> <len> <crc32c>")?;
                let crc = c.u64(3, "crc32c")?;
                Request::CkptCommit {
                    id: c.u64(0, "id")?,
                    index: c.u64(1, "index")?,
                    len: c.u64(2, "len")?,
                    crc: u32::try_from(crc).map_err(|_| {
                        ServerError::new(ErrorCode::Syntax, "crc32c: must fit in 32 bits")
                    })?,
                }
            }
            "CKPT_INFO" => c.arity(0, 0, "CKPT_INFO").map(|_| Request::CkptInfo)?,
            "CKPT_READ" => {
                c.arity(3, 3, "CKPT_READ <id> <offset> <max>")?;
                Request::CkptRead {
                    id: c.u64(0, "id")?,
                    offset: c.u64(1, "offset")?,
                    max: c.u64(2, "max")?,
                }
            }
            "PING" => c.arity(0, 0, "PING").map(|_| Request::Ping)?,
            "STATUS" => c.arity(0, 0, "STATUS").map(|_| Request::Status)?,
            "HOPS" => c.arity(0, 0, "HOPS").map(|_| Request::Hops)?,
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
            Request::Append {
                client,
                seq,
                payload,
            } => encode(
                "APPEND",
                &[
                    client.as_ref(),
                    seq.to_string().as_bytes(),
                    payload.as_ref(),
                ],
            ),
            Request::Read { from, max: None } => encode("READ", &[from.to_string()]),
            Request::Read { from, max: Some(m) } => {
                encode("READ", &[from.to_string(), m.to_string()])
            }
            Request::Tail { from, prefix: None } => encode("TAIL", &[from.to_string()]),
            Request::Tail {
                from,
                prefix: Some(p),
            } => encode("TAIL", &[from.to_string().as_bytes(), p.as_ref()]),
            Request::AddReplica {
                id,
                raft_addr,
                dksp_addr,
                force,
            } => {
                let id = id.to_string();
                let mut args = vec![id.as_str(), raft_addr, dksp_addr];
                if *force {
                    args.push("FORCE");
                }
                encode("ADD_REPLICA", &args)
            }
            Request::RemoveReplica { id, force } => {
                let id = id.to_string();
                let mut args = vec![id.as_str()];
                if *force {
                    args.push("FORCE");
                }
                encode("REMOVE_REPLICA", &args)
            }
            Request::CkptPut { id, offset, data } => encode(
                "CKPT_PUT",
                &[
                    id.to_string().as_bytes(),
                    offset.to_string().as_bytes(),
                    data,
                ],
            ),
            Request::CkptCommit {
                id,
                index,
                len,
                crc,
            } => encode(
                "CKPT_COMMIT",
                &[
                    id.to_string(),
                    index.to_string(),
                    len.to_string(),
                    crc.to_string(),
                ],
            ),
            Request::CkptInfo => encode("CKPT_INFO", &none),
            Request::CkptRead { id, offset, max } => encode(
                "CKPT_READ",
                &[id.to_string(), offset.to_string(), max.to_string()],
            ),
            Request::Ping => encode("PING", &none),
            Request::Status => encode("STATUS", &none),
            Request::Hops => encode("HOPS", &none),
            Request::Quit => encode("QUIT", &none),
        }
    }
}

/// Whether argument `i` (optional, the last) is `FORCE`; anything else there is a syntax error.
fn force_flag(c: &Cmd, i: usize, usage: &str) -> Result<bool, ServerError> {
    match c.args.get(i) {
        None => Ok(false),
        Some(a) if a.eq_ignore_ascii_case(b"FORCE") => Ok(true),
        Some(a) => Err(ServerError::new(
            ErrorCode::Syntax,
            format!(
                "expected FORCE, got {}; usage: {usage}",
                crate::token::display(a)
            ),
        )),
    }
}
