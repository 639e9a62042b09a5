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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Append `payload` exactly once per `(client, seq)`; answers `OK <index>` once committed.
    Append {
        client: Bytes,
        seq: u64,
        payload: Bytes,
    },
    /// Committed entries from `from`, at most `max`, then `END`.
    Read {
        from: u64,
        max: Option<u64>,
    },
    /// Committed entries from `from` as they commit, until the client closes; with `prefix`,
    /// only the entries that hold a line starting with it.
    Tail {
        from: u64,
        prefix: Option<Bytes>,
    },
    AddReplica {
        id: u64,
        raft_addr: String,
        dksp_addr: String,
    },
    RemoveReplica {
        id: u64,
    },
    /// Stage `data` at `offset` of checkpoint upload `id` (offset 0 starts a new upload).
    CkptPut {
        id: u64,
        offset: u64,
        data: Bytes,
    },
    /// Make upload `id` (`len` bytes, CRC32C `crc`) the checkpoint as of logical index `index`.
    CkptCommit {
        id: u64,
        index: u64,
        len: u64,
        crc: u32,
    },
    /// The current checkpoint's id, index, length and CRC.
    CkptInfo,
    /// Up to `max` bytes of checkpoint `id` from `offset`.
    CkptRead {
        id: u64,
        offset: u64,
        max: u64,
    },
    Ping,
    Status,
    /// Diagnostic: the marks `--trace-hops` recorded since the last `HOPS`, one
    /// `OK <hop> <key> <aux> <t_ns>` line each, then `END`; `ERR UNAVAILABLE` when tracing is off.
    Hops,
    Quit,
}

impl Request {
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
                c.arity(3, 3, "ADD_REPLICA <id> <raft-addr> <dksp-addr>")?;
                Request::AddReplica {
                    id: c.u64(0, "id")?,
                    raft_addr: text(1),
                    dksp_addr: text(2),
                }
            }
            "REMOVE_REPLICA" => {
                c.arity(1, 1, "REMOVE_REPLICA <id>")?;
                Request::RemoveReplica {
                    id: c.u64(0, "id")?,
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
            } => encode("ADD_REPLICA", &[&id.to_string(), raft_addr, dksp_addr]),
            Request::RemoveReplica { id } => encode("REMOVE_REPLICA", &[id.to_string()]),
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
