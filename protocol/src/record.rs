//! Checksummed records on disk, and atomic file replacement: the one codec the logserver's
//! segments, its small state files and its snapshot file share, and the one
//! write-temp/fsync/rename/fsync-dir the logserver and the sequencer share.
//!
//! A record is `[len][crc32c u32 LE][postcard body]`, `len` the body's length as a
//! little-endian integer of the [`LenWidth`] the file kind uses (`u32` for Raft log records and
//! small files, `u64` for the snapshot file: these are the layouts of existing data
//! directories, kept byte for byte).
//!
//! Invariants:
//! - **Nothing a header claims is trusted before it is checked.** A length is compared with
//!   the format's cap and with the bytes actually there before any slice is taken or any buffer
//!   is allocated, so a corrupt header can neither panic nor allocate past the cap.
//! - **A record decodes only whole.** The checksum covers the body, and the body must decode to
//!   exactly one value with no bytes left over; anything else is an error that says what was
//!   wrong and whether the record reached the end of the buffer (a torn write looks like that,
//!   which is what lets a log scanner tell a torn tail from corruption in the middle).
//! - **A replaced file is either the old one or the new one** after a crash: the new content is
//!   written to `<name>.tmp` and fsynced, renamed over `<name>`, and the directory is fsynced
//!   before [`replace_file`] returns.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// How wide a record's length field is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LenWidth {
    /// `u32` LE: Raft log records and small state files.
    U32,
    /// `u64` LE: the snapshot file.
    U64,
}

impl LenWidth {
    /// Bytes of the length field.
    pub const fn bytes(self) -> usize {
        match self {
            LenWidth::U32 => 4,
            LenWidth::U64 => 8,
        }
    }

    /// The largest body the field can describe.
    pub const fn max(self) -> u64 {
        match self {
            LenWidth::U32 => u32::MAX as u64,
            LenWidth::U64 => u64::MAX,
        }
    }
}

/// One kind of record: the width of its length field and the largest body it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// Width of the length field.
    pub width: LenWidth,
    /// Largest body accepted, on encode and decode; a header claiming more is refused before
    /// anything is read or allocated for it.
    pub max_body: u64,
}

/// Why a record did not decode (or encode).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than a header.
    #[error("truncated header")]
    TruncatedHeader,
    /// The header is whole but the body it announces is not all there.
    #[error("record of {len} bytes runs past the end")]
    Truncated {
        /// The body length the header claims.
        len: u64,
    },
    /// The header claims (or a value needs) a body over the format's cap.
    #[error("record of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The body length claimed or needed.
        len: u64,
        /// The format's cap.
        max: u64,
    },
    /// The body does not match its checksum.
    #[error("checksum mismatch")]
    Checksum,
    /// The body passed its checksum but is not one value of the expected type.
    #[error("undecodable: {0}")]
    Undecodable(String),
    /// The body holds a value and then more bytes.
    #[error("trailing bytes after the value")]
    Trailing,
    /// The value could not be serialized.
    #[error("unencodable: {0}")]
    Unencodable(String),
}

/// A failed decode: what was wrong, and whether the record as its header describes it reaches
/// the end of the buffer (a torn final write does; corruption followed by more data does not).
#[derive(Debug, PartialEq, Eq)]
pub struct Bad {
    /// What was wrong.
    pub error: RecordError,
    /// Whether the bad record reaches the end of the buffer.
    pub reaches_end: bool,
}

/// An I/O error with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct IoAt {
    /// The file or directory.
    pub path: PathBuf,
    /// What the OS said.
    pub source: io::Error,
}

impl From<IoAt> for io::Error {
    fn from(e: IoAt) -> io::Error {
        io::Error::new(e.source.kind(), e.to_string())
    }
}

/// Why a record file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error(transparent)]
    Io(#[from] IoAt),
    /// The file's record is bad.
    #[error("{}: {error}", path.display())]
    Bad {
        /// The file.
        path: PathBuf,
        /// What was wrong with its record.
        error: RecordError,
    },
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> IoAt + '_ {
    move |source| IoAt {
        path: path.to_path_buf(),
        source,
    }
}

impl Format {
    /// Records with a `u32` length (Raft log records, small files), up to `max_body` bytes.
    pub const fn u32(max_body: u64) -> Format {
        Format {
            width: LenWidth::U32,
            max_body,
        }
    }

    /// Records with a `u64` length (the snapshot file), up to `max_body` bytes.
    pub const fn u64(max_body: u64) -> Format {
        Format {
            width: LenWidth::U64,
            max_body,
        }
    }

    /// Bytes before the body: the length field and the checksum.
    pub const fn header_len(&self) -> usize {
        self.width.bytes() + 4
    }

    fn cap(&self) -> u64 {
        self.max_body.min(self.width.max())
    }

    /// Appends `value` as one record to `out`.
    pub fn encode_into<T: Serialize + ?Sized>(
        &self,
        out: &mut Vec<u8>,
        value: &T,
    ) -> Result<(), RecordError> {
        let body =
            postcard::to_stdvec(value).map_err(|e| RecordError::Unencodable(e.to_string()))?;
        let len = body.len() as u64;
        if len > self.cap() {
            return Err(RecordError::TooLarge {
                len,
                max: self.cap(),
            });
        }
        out.reserve(self.header_len() + body.len());
        match self.width {
            // In range: checked against the cap, which is at most the width's maximum.
            LenWidth::U32 => out.extend_from_slice(&(len as u32).to_le_bytes()),
            LenWidth::U64 => out.extend_from_slice(&len.to_le_bytes()),
        }
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(())
    }

    /// `value` as one record.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, RecordError> {
        let mut out = Vec::new();
        self.encode_into(&mut out, value)?;
        Ok(out)
    }

    /// Reads the header at the start of `buf`: (body length, checksum).
    fn header(&self, buf: &[u8]) -> Option<(u64, u32)> {
        let h = buf.get(..self.header_len())?;
        let (len, crc) = h.split_at(self.width.bytes());
        let len = match self.width {
            LenWidth::U32 => u64::from(u32::from_le_bytes(len.try_into().ok()?)),
            LenWidth::U64 => u64::from_le_bytes(len.try_into().ok()?),
        };
        Some((len, u32::from_le_bytes(crc.try_into().ok()?)))
    }

    /// Decodes the record at the start of `buf`; on success the value and the record's size
    /// (bytes after it are left alone: the next record, or stale bytes of a file rewritten in
    /// place).
    pub fn decode<T: DeserializeOwned>(&self, buf: &[u8]) -> Result<(T, usize), Bad> {
        let bad = |error, reaches_end| Bad { error, reaches_end };
        let Some((len, crc)) = self.header(buf) else {
            return Err(bad(RecordError::TruncatedHeader, true));
        };
        let rest = (buf.len() - self.header_len()) as u64;
        if len > self.cap() {
            // The header is garbage or from another format: the record's extent is unknown,
            // so it counts as reaching the end only if it claims more than there is.
            return Err(bad(
                RecordError::TooLarge {
                    len,
                    max: self.cap(),
                },
                len > rest,
            ));
        }
        if len > rest {
            return Err(bad(RecordError::Truncated { len }, true));
        }
        // Both fit in `buf`, so in usize.
        let end = self.header_len() + len as usize;
        let body = &buf[self.header_len()..end];
        let at_end = end == buf.len();
        if crc32c::crc32c(body) != crc {
            return Err(bad(RecordError::Checksum, at_end));
        }
        decode_body(body)
            .map(|v| (v, end))
            .map_err(|e| bad(e, at_end))
    }

    /// Reads one record from `r`: the header, then (only if its length is within the cap) the
    /// body. `Ok(None)` if `r` is empty; a short read is [`RecordError::TruncatedHeader`] or
    /// [`RecordError::Truncated`]. Bytes after the record are not read.
    pub fn read_from<T: DeserializeOwned, R: Read>(
        &self,
        r: &mut R,
    ) -> Result<Option<T>, ReadError> {
        let mut header = [0u8; 12];
        let header = &mut header[..self.header_len()];
        let got = read_full(r, header)?;
        if got == 0 {
            return Ok(None);
        }
        if got < header.len() {
            return Err(ReadError::Bad(RecordError::TruncatedHeader));
        }
        let (len, crc) = self.header(header).ok_or(RecordError::TruncatedHeader)?;
        if len > self.cap() {
            return Err(ReadError::Bad(RecordError::TooLarge {
                len,
                max: self.cap(),
            }));
        }
        let n = usize::try_from(len).map_err(|_| RecordError::TooLarge {
            len,
            max: usize::MAX as u64,
        })?;
        // Grown as bytes arrive, not allocated from the header: a short file costs what it holds.
        let mut body = Vec::new();
        Read::by_ref(r).take(len).read_to_end(&mut body)?;
        if body.len() < n {
            return Err(ReadError::Bad(RecordError::Truncated { len }));
        }
        if crc32c::crc32c(&body) != crc {
            return Err(ReadError::Bad(RecordError::Checksum));
        }
        Ok(Some(decode_body(&body)?))
    }

    /// Reads the record at the start of the file at `path`. A missing or empty file is
    /// `Ok(None)`; bytes after the record are ignored.
    pub fn read_file<T: DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, FileError> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(at(path)(e).into()),
        };
        match self.read_from(&mut f) {
            Ok(v) => Ok(v),
            Err(ReadError::Io(e)) => Err(at(path)(e).into()),
            Err(ReadError::Bad(error)) => Err(FileError::Bad {
                path: path.to_path_buf(),
                error,
            }),
        }
    }
}

/// Why [`Format::read_from`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The reader failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The record is bad.
    #[error(transparent)]
    Bad(#[from] RecordError),
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, RecordError> {
    match postcard::take_from_bytes(body) {
        Ok((value, [])) => Ok(value),
        Ok(_) => Err(RecordError::Trailing),
        Err(e) => Err(RecordError::Undecodable(e.to_string())),
    }
}

/// Reads until `buf` is full or the reader ends; the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Atomically and durably replaces `dir/name` with `bytes`: written to `dir/name.tmp`, fsynced,
/// renamed over `dir/name`, then the directory fsynced. A crash at any point leaves the old file
/// or the new one (and perhaps a stale `.tmp`, which the next replace overwrites). Blocking.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), IoAt> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(at(&tmp))?;
    f.write_all(bytes).map_err(at(&tmp))?;
    f.sync_all().map_err(at(&tmp))?;
    drop(f);
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(at(&path))?;
    sync_dir(dir)
}

/// Fsyncs a directory, making the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), IoAt> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Format = Format::u32(4096);
    const BIG: Format = Format::u64(u64::MAX);

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Val {
        a: u64,
        b: Vec<u8>,
    }

    fn val(n: usize) -> Val {
        Val {
            a: n as u64 * 7919,
            b: (0..n).map(|i| (i % 251) as u8).collect(),
        }
    }

    #[test]
    fn values_round_trip_in_both_widths_and_the_layout_is_len_crc_body() {
        for f in [SMALL, BIG] {
            for n in [0, 1, 100, 1000] {
                let rec = f.encode(&val(n)).unwrap();
                let body = postcard::to_stdvec(&val(n)).unwrap();
                let w = f.width.bytes();
                assert_eq!(rec.len(), w + 4 + body.len());
                let mut len = [0u8; 8];
                len[..w].copy_from_slice(&rec[..w]);
                assert_eq!(u64::from_le_bytes(len), body.len() as u64);
                assert_eq!(rec[w..w + 4], crc32c::crc32c(&body).to_le_bytes());
                assert_eq!(rec[w + 4..], body[..]);
                assert_eq!(f.decode::<Val>(&rec).unwrap(), (val(n), rec.len()));
                let back: Option<Val> = f.read_from(&mut &rec[..]).unwrap();
                assert_eq!(back, Some(val(n)));
            }
        }
    }

    #[test]
    fn records_in_sequence_decode_one_after_another_and_trailing_bytes_are_left_alone() {
        let mut buf = Vec::new();
        for n in 0..5 {
            SMALL.encode_into(&mut buf, &val(n)).unwrap();
        }
        let mut off = 0;
        for n in 0..5 {
            let (v, size) = SMALL.decode::<Val>(&buf[off..]).unwrap();
            assert_eq!(v, val(n));
            off += size;
        }
        assert_eq!(off, buf.len());
        // A file rewritten in place with a shorter record keeps the old tail: it is ignored.
        let mut file = SMALL.encode(&val(3)).unwrap();
        file.extend_from_slice(b"stale bytes of a longer record");
        let v: Option<Val> = SMALL.read_from(&mut &file[..]).unwrap();
        assert_eq!(v, Some(val(3)));
    }

    #[test]
    fn every_torn_tail_is_an_error_that_reaches_the_end() {
        for f in [SMALL, BIG] {
            let rec = f.encode(&val(50)).unwrap();
            let body_len = (rec.len() - f.header_len()) as u64;
            for cut in 1..rec.len() {
                let bad = f.decode::<Val>(&rec[..cut]).unwrap_err();
                assert!(bad.reaches_end, "cut at {cut}: {bad:?}");
                let want = if cut < f.header_len() {
                    RecordError::TruncatedHeader
                } else {
                    RecordError::Truncated { len: body_len }
                };
                assert_eq!(bad.error, want, "cut at {cut}");
                // Short reads from a file say the same.
                let r = f.read_from::<Val, _>(&mut &rec[..cut]).unwrap_err();
                assert!(
                    matches!(
                        r,
                        ReadError::Bad(
                            RecordError::TruncatedHeader | RecordError::Truncated { .. }
                        )
                    ),
                    "cut at {cut}: {r:?}"
                );
            }
            assert_eq!(f.read_from::<Val, _>(&mut &rec[..0]).unwrap(), None);
        }
    }

    #[test]
    fn every_single_bit_flip_in_the_checksum_or_body_is_detected() {
        let rec = SMALL.encode(&val(20)).unwrap();
        for i in 32..rec.len() * 8 {
            let mut bad = rec.clone();
            bad[i / 8] ^= 1 << (i % 8);
            let e = SMALL.decode::<Val>(&bad).unwrap_err();
            assert_eq!(e.error, RecordError::Checksum, "bit {i}");
            assert!(e.reaches_end);
            // Followed by another record, the same damage does not reach the end.
            bad.extend_from_slice(&rec);
            assert!(
                !SMALL.decode::<Val>(&bad).unwrap_err().reaches_end,
                "bit {i}"
            );
            let r = SMALL.read_from::<Val, _>(&mut &bad[..]).unwrap_err();
            assert!(
                matches!(r, ReadError::Bad(RecordError::Checksum)),
                "bit {i}"
            );
        }
    }

    #[test]
    fn a_length_over_the_cap_is_refused_without_reading_or_allocating_the_body() {
        // A header claiming 4 GiB - 1 with 8 bytes behind it: refused from the header alone.
        let mut rec = u32::MAX.to_le_bytes().to_vec();
        rec.extend_from_slice(&[0; 12]);
        let e = SMALL.decode::<Val>(&rec).unwrap_err();
        assert_eq!(
            e.error,
            RecordError::TooLarge {
                len: u32::MAX as u64,
                max: 4096
            }
        );
        assert!(e.reaches_end, "claims more than there is");
        let r = SMALL.read_from::<Val, _>(&mut &rec[..]).unwrap_err();
        assert!(matches!(r, ReadError::Bad(RecordError::TooLarge { .. })));
        // A u64 header claiming an exabyte, uncapped: read_from grows with what arrives, so a
        // short file fails as truncated instead of allocating what the header says.
        let mut rec = (1u64 << 60).to_le_bytes().to_vec();
        rec.extend_from_slice(&[0; 100]);
        let r = BIG.read_from::<Val, _>(&mut &rec[..]).unwrap_err();
        assert!(
            matches!(r, ReadError::Bad(RecordError::Truncated { len }) if len == 1 << 60),
            "{r:?}"
        );
        // Encoding over the cap is refused too.
        let e = Format::u32(10).encode(&val(100)).unwrap_err();
        assert!(matches!(e, RecordError::TooLarge { max: 10, .. }));
    }

    #[test]
    fn a_body_that_passes_its_checksum_must_be_exactly_one_value() {
        let mut body = postcard::to_stdvec(&val(3)).unwrap();
        body.push(0);
        let mut rec = (body.len() as u32).to_le_bytes().to_vec();
        rec.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        rec.extend_from_slice(&body);
        assert_eq!(
            SMALL.decode::<Val>(&rec).unwrap_err().error,
            RecordError::Trailing
        );
        let body = [0xff_u8; 3];
        let mut rec = 3u32.to_le_bytes().to_vec();
        rec.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        rec.extend_from_slice(&body);
        assert!(matches!(
            SMALL.decode::<Val>(&rec).unwrap_err().error,
            RecordError::Undecodable(_)
        ));
    }

    #[test]
    fn a_replaced_file_holds_the_new_bytes_and_a_stale_temp_file_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vote");
        assert_eq!(SMALL.read_file::<Val>(&path).unwrap(), None, "missing");
        fs::write(&path, b"").unwrap();
        assert_eq!(SMALL.read_file::<Val>(&path).unwrap(), None, "empty");
        fs::write(dir.path().join("vote.tmp"), b"left by a crash").unwrap();
        replace_file(dir.path(), "vote", &SMALL.encode(&val(5)).unwrap()).unwrap();
        assert_eq!(SMALL.read_file::<Val>(&path).unwrap(), Some(val(5)));
        replace_file(dir.path(), "vote", &SMALL.encode(&val(9)).unwrap()).unwrap();
        assert_eq!(SMALL.read_file::<Val>(&path).unwrap(), Some(val(9)));
        assert!(!dir.path().join("vote.tmp").exists());
        fs::write(&path, &SMALL.encode(&val(9)).unwrap()[..7]).unwrap();
        let e = SMALL.read_file::<Val>(&path).unwrap_err();
        assert!(
            matches!(
                &e,
                FileError::Bad {
                    error: RecordError::TruncatedHeader,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("vote"), "{e}");
        let e = replace_file(&dir.path().join("missing"), "x", b"").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
