//! What the kvstore writes to the log: its records, one line each, as DKSP text a person can
//! read with `READ`, and the format of its checkpoints. They live here, not in the kvstore,
//! so that the logserver can refuse what the kvstore could not read (`APPEND` of a payload that
//! is not records, `CKPT_COMMIT` of a checkpoint that does not decode) without depending on it.
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
//!
//! Invariant: [`Record::parse_entry`] and [`check_checkpoint`] are the one definition of what
//! the kvstore can read; the logserver's checks call the same functions, so anything it accepts
//! the kvstore parses.

use crate::token;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

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

    /// Parses one record (one line, without its `\n`).
    pub fn parse_line(line: &[u8]) -> Result<Record, RecordError> {
        let args = token::split(line).map_err(|e| RecordError::Unquotable(e.0))?;
        let num = |i: usize| -> Result<u64, RecordError> {
            let a = args.get(i).ok_or(RecordError::TooShort)?;
            crate::response::parse_u64(a).map_err(RecordError::BadNumber)
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
    BadNumber(crate::response::NumberError),
    /// A `COMMIT` whose writes do not parse, at this argument.
    #[error("bad write at argument {0}")]
    BadWrite(usize),
    /// Neither `EPOCH` nor `COMMIT`.
    #[error("unknown record {0}")]
    Unknown(String),
}

/// The kvstore's checkpoint: the newest version of every live key as of a log index, encoded
/// with postcard (fields in this order, no header of its own: the log's `CKPT_INFO` carries its
/// length and CRC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The log index it covers (the state after applying every entry up to it).
    pub index: u64,
    /// The newest commit timestamp in it.
    pub max_ts: u64,
    /// The epoch of the kvstore that wrote it.
    pub epoch: u64,
    /// `(key, ts, value)` of every live key, keys strictly ascending.
    pub entries: Vec<(Bytes, u64, Bytes)>,
}

impl Checkpoint {
    /// The checkpoint's bytes, as uploaded to the log.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    /// The checkpoint in `bytes`, after [`check_checkpoint`] (so a checkpoint that loads is
    /// exactly one the logserver would have accepted).
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, CheckpointFormatError> {
        check_checkpoint(bytes)?;
        postcard::from_bytes(bytes).map_err(|e| CheckpointFormatError::Undecodable(e.to_string()))
    }
}

/// What [`check_checkpoint`] found in a well-formed checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// The log index it says it covers.
    pub index: u64,
    /// The newest commit timestamp it says it holds (every entry's is at most this).
    pub max_ts: u64,
    /// The epoch of the kvstore that wrote it.
    pub epoch: u64,
    /// How many keys it holds.
    pub keys: u64,
}

/// Why bytes are not a kvstore checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointFormatError {
    /// The bytes do not decode as the format (truncated, a length past the end, not postcard).
    #[error("does not decode as a kvstore checkpoint: {0}")]
    Undecodable(String),
    /// The checkpoint decodes but more bytes follow it.
    #[error("{0} bytes follow the checkpoint")]
    Trailing(usize),
    /// Entry `at` has an empty key or one longer than [`MAX_KEY`].
    #[error("entry {at} has a key of {len} bytes (1 to {MAX_KEY})")]
    BadKey {
        /// The entry's position.
        at: u64,
        /// Its key's length.
        len: usize,
    },
    /// Entry `at`'s key is not above the one before it.
    #[error("entry {at}'s key is not above the one before it (keys must be strictly ascending)")]
    Unsorted {
        /// The entry's position.
        at: u64,
    },
    /// Entry `at`'s timestamp is 0 or above the checkpoint's stated newest one.
    #[error("entry {at} has timestamp {ts}, outside 1..={max_ts}")]
    BadTimestamp {
        /// The entry's position.
        at: u64,
        /// Its timestamp.
        ts: u64,
        /// The checkpoint's stated newest timestamp.
        max_ts: u64,
    },
}

/// The longest key the kvstore accepts (and therefore writes), in bytes.
pub const MAX_KEY: usize = 1024;

/// Checks that `bytes` are a kvstore checkpoint the kvstore can load, without building it:
/// it walks the encoding with borrowed slices, so it allocates nothing per key and costs about
/// one pass over the bytes (the CRC check is another). The logserver runs it at `CKPT_COMMIT`
/// and the kvstore before loading, so both apply the same rule.
pub fn check_checkpoint(bytes: &[u8]) -> Result<CheckpointHeader, CheckpointFormatError> {
    use serde::de::DeserializeSeed;
    let mut de = postcard::Deserializer::from_bytes(bytes);
    let walked = Walk
        .deserialize(&mut de)
        .map_err(|e| CheckpointFormatError::Undecodable(e.to_string()))?;
    let header = walked?;
    let rest = de
        .finalize()
        .map_err(|e| CheckpointFormatError::Undecodable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CheckpointFormatError::Trailing(rest.len()));
    }
    Ok(header)
}

/// The serde walk behind [`check_checkpoint`]. postcard drops the message of a custom error,
/// so a semantic fault is returned as the value (`Ok(Err(..))`) and the walk stops there.
struct Walk;

type Walked = Result<CheckpointHeader, CheckpointFormatError>;

impl<'de> serde::de::DeserializeSeed<'de> for Walk {
    type Value = Walked;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Walked, D::Error> {
        d.deserialize_struct("Checkpoint", &["index", "max_ts", "epoch", "entries"], self)
    }
}

impl<'de> serde::de::Visitor<'de> for Walk {
    type Value = Walked;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a kvstore checkpoint")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Walked, A::Error> {
        use serde::de::Error;
        let missing = |n| A::Error::invalid_length(n, &"4 fields");
        let index: u64 = seq.next_element()?.ok_or_else(|| missing(0))?;
        let max_ts: u64 = seq.next_element()?.ok_or_else(|| missing(1))?;
        let epoch: u64 = seq.next_element()?.ok_or_else(|| missing(2))?;
        let keys = seq
            .next_element_seed(Entries { max_ts })?
            .ok_or_else(|| missing(3))?;
        Ok(keys.map(|keys| CheckpointHeader {
            index,
            max_ts,
            epoch,
            keys,
        }))
    }
}

/// The entries of a checkpoint, checked one by one and counted.
struct Entries {
    max_ts: u64,
}

impl<'de> serde::de::DeserializeSeed<'de> for Entries {
    type Value = Result<u64, CheckpointFormatError>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Entries {
    type Value = Result<u64, CheckpointFormatError>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("checkpoint entries")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut prev: Option<&'de [u8]> = None;
        let mut at = 0u64;
        while let Some((key, ts, _value)) = seq.next_element::<(&'de [u8], u64, &'de [u8])>()? {
            if key.is_empty() || key.len() > MAX_KEY {
                return Ok(Err(CheckpointFormatError::BadKey { at, len: key.len() }));
            }
            if prev.is_some_and(|p| p >= key) {
                return Ok(Err(CheckpointFormatError::Unsorted { at }));
            }
            if ts == 0 || ts > self.max_ts {
                return Ok(Err(CheckpointFormatError::BadTimestamp {
                    at,
                    ts,
                    max_ts: self.max_ts,
                }));
            }
            prev = Some(key);
            at += 1;
        }
        Ok(Ok(at))
    }
}

/// Checks that an `APPEND` payload is one or more kvstore records (what the logserver accepts
/// from a writer): exactly the entries [`Record::parse_entry`] parses, with at least one record.
///
/// Each line first goes through a scan that borrows its arguments instead of copying them
/// ([`scan_line`]); only a line that scan does not vouch for (a bad line, or one whose verb,
/// numbers or `PUT`/`DEL` markers are quoted with escapes) goes through the kvstore's own parse,
/// which then decides and gives the error. So the fast path can only accept what the parse
/// accepts, and a property test checks that the two agree.
pub fn check_entry(payload: &[u8]) -> Result<(), EntryError> {
    let mut records = 0usize;
    let mut args = Vec::new();
    for (n, line) in payload
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
    {
        if scan_line(line, &mut args) != Scan::Record {
            Record::parse_line(line).map_err(|e| EntryError::Bad {
                line: n + 1,
                error: e,
            })?;
        }
        records += 1;
    }
    if records == 0 {
        return Err(EntryError::Empty);
    }
    Ok(())
}

/// What [`scan_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The line is a record [`Record::parse_line`] parses.
    Record,
    /// Not vouched for: the line is bad, or needs the full parse to tell.
    Unsure,
}

/// One argument of a line as [`scan_line`] sees it: its bytes (inside the quotes, for a quoted
/// one) and whether they hold escapes (then they are not the argument's value).
#[derive(Debug, Clone, Copy)]
pub struct Arg<'a> {
    raw: &'a [u8],
    escaped: bool,
}

/// Splits `line` into borrowed arguments with `token::split`'s rules (the same malformed lines
/// are refused), copying nothing, and checks them as [`Record::parse_line`] does. `args` is
/// scratch space reused across lines. [`Scan::Record`] only for lines the parse accepts.
pub fn scan_line<'a>(line: &'a [u8], args: &mut Vec<Arg<'a>>) -> Scan {
    args.clear();
    let space = |b: u8| b == b' ' || b == b'\t';
    let mut i = 0;
    while i < line.len() {
        if space(line[i]) {
            i += 1;
            continue;
        }
        if line[i] == b'"' {
            let start = i + 1;
            let mut escaped = false;
            i = start;
            loop {
                match line.get(i) {
                    None => return Scan::Unsure,
                    Some(b'"') => break,
                    Some(b'\\') => {
                        escaped = true;
                        match line.get(i + 1) {
                            Some(b'\\' | b'"' | b'n' | b'r' | b't') => i += 2,
                            Some(b'x') => match line.get(i + 2..i + 4) {
                                Some(h) if h.iter().all(u8::is_ascii_hexdigit) => i += 4,
                                _ => return Scan::Unsure,
                            },
                            _ => return Scan::Unsure,
                        }
                    }
                    // The run up to the next quote or escape, in one go.
                    Some(_) => {
                        i += line[i..]
                            .iter()
                            .position(|&b| b == b'"' || b == b'\\')
                            .unwrap_or(line.len() - i)
                    }
                }
            }
            args.push(Arg {
                raw: &line[start..i],
                escaped,
            });
            i += 1;
            if i < line.len() && !space(line[i]) {
                return Scan::Unsure;
            }
        } else {
            let start = i;
            while i < line.len() && !space(line[i]) {
                let b = line[i];
                if b == b'"' || b < 0x20 || b == 0x7f {
                    return Scan::Unsure;
                }
                i += 1;
            }
            args.push(Arg {
                raw: &line[start..i],
                escaped: false,
            });
        }
    }
    // The arguments whose value matters must be unescaped to be read here.
    let is = |i: usize, word: &[u8]| args.get(i).is_some_and(|a| !a.escaped && a.raw == word);
    let num = |i: usize| {
        args.get(i)
            .is_some_and(|a| !a.escaped && crate::response::parse_u64(a.raw).is_ok())
    };
    if is(0, b"EPOCH") && args.len() == 2 {
        return if num(1) { Scan::Record } else { Scan::Unsure };
    }
    if !is(0, b"COMMIT") || !num(1) || !num(2) {
        return Scan::Unsure;
    }
    let mut i = 3;
    while i < args.len() {
        if is(i, b"PUT") && i + 2 < args.len() {
            i += 3;
        } else if is(i, b"DEL") && i + 1 < args.len() {
            i += 2;
        } else {
            return Scan::Unsure;
        }
    }
    Scan::Record
}

/// Why an `APPEND` payload is not kvstore records ([`check_entry`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The payload holds no record at all.
    #[error("the payload holds no kvstore record")]
    Empty,
    /// Line `line` (from 1) is not a record.
    #[error("line {line} is not a kvstore record: {error}")]
    Bad {
        /// The line's number, from 1.
        line: usize,
        /// What is wrong with it.
        error: RecordError,
    },
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

    fn sample() -> Checkpoint {
        Checkpoint {
            index: 42,
            max_ts: 900,
            epoch: 7,
            entries: vec![
                (Bytes::from("a"), 5, Bytes::from("1")),
                (Bytes::from("b"), 900, Bytes::from_static(b"\x00\xff")),
                (Bytes::from("c"), 17, Bytes::new()),
            ],
        }
    }

    #[test]
    fn a_checkpoint_the_kvstore_writes_passes_the_check_with_its_header() {
        let bytes = postcard::to_stdvec(&sample()).unwrap();
        assert_eq!(
            check_checkpoint(&bytes),
            Ok(CheckpointHeader {
                index: 42,
                max_ts: 900,
                epoch: 7,
                keys: 3
            })
        );
        let empty = Checkpoint {
            entries: vec![],
            ..sample()
        };
        let bytes = postcard::to_stdvec(&empty).unwrap();
        assert_eq!(check_checkpoint(&bytes).map(|h| h.keys), Ok(0));
    }

    #[test]
    fn junk_truncated_or_trailing_bytes_are_not_a_checkpoint() {
        assert!(matches!(
            check_checkpoint(b"x"),
            Err(CheckpointFormatError::Undecodable(_))
        ));
        assert!(matches!(
            check_checkpoint(b""),
            Err(CheckpointFormatError::Undecodable(_))
        ));
        let bytes = postcard::to_stdvec(&sample()).unwrap();
        for cut in 0..bytes.len() {
            assert!(check_checkpoint(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            check_checkpoint(&longer),
            Err(CheckpointFormatError::Trailing(1))
        );
    }

    #[test]
    fn a_checkpoint_with_unsorted_keys_or_impossible_timestamps_is_refused() {
        let mut c = sample();
        c.entries.swap(0, 1);
        let bytes = postcard::to_stdvec(&c).unwrap();
        assert_eq!(
            check_checkpoint(&bytes),
            Err(CheckpointFormatError::Unsorted { at: 1 })
        );
        let mut c = sample();
        c.entries[2].1 = 901;
        let bytes = postcard::to_stdvec(&c).unwrap();
        assert_eq!(
            check_checkpoint(&bytes),
            Err(CheckpointFormatError::BadTimestamp {
                at: 2,
                ts: 901,
                max_ts: 900
            })
        );
        let mut c = sample();
        c.entries[0].0 = Bytes::new();
        let bytes = postcard::to_stdvec(&c).unwrap();
        assert_eq!(
            check_checkpoint(&bytes),
            Err(CheckpointFormatError::BadKey { at: 0, len: 0 })
        );
    }

    #[test]
    fn an_append_payload_must_be_kvstore_records() {
        assert_eq!(check_entry(b"EPOCH 5\nCOMMIT 6 5 PUT k v DEL j\n"), Ok(()));
        assert_eq!(check_entry(b""), Err(EntryError::Empty));
        assert_eq!(check_entry(b"\n\n"), Err(EntryError::Empty));
        assert!(matches!(
            check_entry(b"EPOCH 5\nhello"),
            Err(EntryError::Bad { line: 2, .. })
        ));
        assert!(matches!(
            check_entry(b"COMMIT 6 5 PUT k"),
            Err(EntryError::Bad { line: 1, .. })
        ));
        assert!(check_entry(b"PUT a 1").is_err());
    }
}
