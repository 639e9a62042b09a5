//! What the kvstore writes to the log, as DKSP text a person can read with `READ`.
//!
//! One log entry holds one or more records, one per line:
//!
//! ```text
//! EPOCH <epoch>                                  a kvstore took over the log (fencing)
//! COMMIT <commit_ts> <epoch> PUT <k> <v> DEL <k> ...   one committed transaction
//! ```
//!
//! Replay applies `COMMIT` records in log order, skipping those whose epoch is older than the
//! newest `EPOCH` before them: they were written by a kvstore that had been fenced off, and it
//! never acknowledged them.

use bytes::Bytes;
use protocol::token;

/// One record of a log entry (one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// `EPOCH <epoch>`: a kvstore with this epoch took over the log; commits of older epochs after
    /// it are void.
    Epoch(u64),
    /// `COMMIT <ts> <epoch> ...`: one committed transaction's writes.
    Commit {
        /// The commit timestamp.
        ts: u64,
        /// The epoch of the kvstore that wrote it.
        epoch: u64,
        /// The writes in order: `Some(value)` for `PUT`, `None` for `DEL`.
        writes: Vec<(Bytes, Option<Bytes>)>,
    },
}

impl Record {
    /// Appends the record's line (without `
    /// `) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Epoch(e) => out.extend_from_slice(format!("EPOCH {e}").as_bytes()),
            Record::Commit { ts, epoch, writes } => {
                out.extend_from_slice(format!("COMMIT {ts} {epoch}").as_bytes());
                for (k, v) in writes {
                    match v {
                        Some(v) => {
                            out.extend_from_slice(b" PUT ");
                            token::write_arg(out, k);
                            out.push(b' ');
                            token::write_arg(out, v);
                        }
                        None => {
                            out.extend_from_slice(b" DEL ");
                            token::write_arg(out, k);
                        }
                    }
                }
            }
        }
    }

    /// Parses every record of one log entry.
    pub fn parse_entry(payload: &[u8]) -> Result<Vec<Record>, RecordError> {
        payload
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(Record::parse_line)
            .collect()
    }

    /// The epochs of the `EPOCH` records in one log entry, without parsing its commits: a
    /// record is one line and quoting escapes newlines, so a line that starts with `EPOCH ` is
    /// one. Lines that do not parse are skipped (replay reports them).
    pub fn epochs(payload: &[u8]) -> impl Iterator<Item = u64> + '_ {
        payload
            .split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"EPOCH "))
            .filter_map(|l| match Record::parse_line(l) {
                Ok(Record::Epoch(e)) => Some(e),
                _ => None,
            })
    }

    fn parse_line(line: &[u8]) -> Result<Record, RecordError> {
        let args = token::split(line).map_err(|e| RecordError::Unquotable(e.0))?;
        let num = |i: usize| -> Result<u64, RecordError> {
            let a = args.get(i).ok_or(RecordError::TooShort)?;
            protocol::response::parse_u64(a).map_err(RecordError::BadNumber)
        };
        match args.first().map(|a| &a[..]) {
            Some(b"EPOCH") if args.len() == 2 => Ok(Record::Epoch(num(1)?)),
            Some(b"COMMIT") => {
                let (ts, epoch) = (num(1)?, num(2)?);
                let mut writes = Vec::new();
                let mut i = 3;
                while i < args.len() {
                    match &args[i][..] {
                        b"PUT" if i + 2 < args.len() => {
                            writes.push((args[i + 1].clone(), Some(args[i + 2].clone())));
                            i += 3;
                        }
                        b"DEL" if i + 1 < args.len() => {
                            writes.push((args[i + 1].clone(), None));
                            i += 2;
                        }
                        _ => return Err(RecordError::BadWrite(i)),
                    }
                }
                Ok(Record::Commit { ts, epoch, writes })
            }
            _ => Err(RecordError::Unknown(token::display(line).to_string())),
        }
    }
}

/// Why a log entry is not kvstore records. It is deterministic: the same entry never parses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The line does not split into arguments.
    #[error("{0}")]
    Unquotable(String),
    /// A record with fewer arguments than its kind needs.
    #[error("record too short")]
    TooShort,
    /// A timestamp or epoch that is not a number.
    #[error("{0}")]
    BadNumber(protocol::response::NumberError),
    /// A `COMMIT` whose writes do not parse, at this argument.
    #[error("bad write at argument {0}")]
    BadWrite(usize),
    /// Neither `EPOCH` nor `COMMIT`.
    #[error("unknown record {0}")]
    Unknown(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_read_as_text() {
        let recs = vec![
            Record::Epoch(7),
            Record::Commit {
                ts: 100,
                epoch: 7,
                writes: vec![
                    (Bytes::from("user:1"), Some(Bytes::from("John Doe"))),
                    (Bytes::from("k\n2"), None),
                    (Bytes::from("bin"), Some(Bytes::from_static(b"\x00\xff"))),
                ],
            },
        ];
        let mut payload = Vec::new();
        for r in &recs {
            r.encode(&mut payload);
            payload.push(b'\n');
        }
        assert_eq!(
            String::from_utf8(payload.clone()).unwrap(),
            "EPOCH 7\nCOMMIT 100 7 PUT user:1 \"John Doe\" DEL \"k\\n2\" PUT bin \"\\x00\\xff\"\n"
        );
        assert_eq!(Record::parse_entry(&payload).unwrap(), recs);
        assert!(Record::parse_entry(b"COMMIT 1 2 PUT k").is_err());
        assert!(Record::parse_entry(b"BOGUS").is_err());
    }

    #[test]
    fn epochs_finds_only_epoch_records() {
        let mut payload = Vec::new();
        for r in [
            Record::Commit {
                ts: 5,
                epoch: 3,
                writes: vec![(Bytes::from("k"), Some(Bytes::from("\nEPOCH 99")))],
            },
            Record::Epoch(9),
            Record::Commit {
                ts: 11,
                epoch: 9,
                writes: vec![(Bytes::from("EPOCH"), None)],
            },
        ] {
            r.encode(&mut payload);
            payload.push(b'\n');
        }
        payload.extend_from_slice(b"EPOCH x\nEPOCH 12");
        // The value's "\nEPOCH 99" is quoted onto its own line; "EPOCH x" does not parse.
        assert_eq!(Record::epochs(&payload).collect::<Vec<_>>(), vec![9, 12]);
    }
}
