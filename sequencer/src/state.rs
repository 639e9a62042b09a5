//! The sequencer's only durable state: the reserved high-water mark.
//!
//! No timestamp above the mark is ever handed out, so after a crash the sequencer restarts above
//! it and cannot reissue anything. The file is 20 bytes: a magic, the mark (u64 LE) and a CRC32C
//! of both. It is replaced atomically ([`protocol::record::replace_file`]: write a temp file,
//! fsync it, rename over the old one, fsync the directory), so a crash leaves either the old
//! mark or the new one. A file that fails its checksum means the mark is unknown; starting
//! anyway could reissue timestamps, so loading refuses with an error that says what to do.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"DTKVSEQ1";
const FILE_NAME: &str = "sequencer.state";
const LEN: usize = 20;

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the file failed; the sequencer cannot vouch for its mark.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file exists but does not hold a valid mark; the sequencer refuses to start.
    #[error(
        "{path} is corrupt ({why}); refusing to start, as the last reserved timestamp is unknown \
         and could be reissued. If you know a safe mark, write it with `sequencer --data-dir DIR \
         --reset-to N` (N above any timestamp ever issued)"
    )]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong with its contents.
        why: DecodeError,
    },
}

/// Why a state file's bytes are not a valid mark. Every kind means the same to the sequencer
/// (the mark is unknown: refuse to start); they differ in what an operator looks for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not the 20 bytes of the format: a torn write of a first file, or another file.
    #[error("{0} bytes, expected {LEN}")]
    Length(usize),
    /// The first 8 bytes are not `DTKVSEQ1`: not a state file.
    #[error("bad magic")]
    Magic,
    /// The CRC32C does not match: the file was damaged on disk.
    #[error("checksum mismatch")]
    Checksum,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The state file in one data directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    /// Creates the directory if needed.
    pub fn open(dir: &Path) -> Result<StateFile, StateError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(StateFile {
            dir: dir.to_path_buf(),
        })
    }

    /// The state file's path, `<dir>/sequencer.state`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The persisted mark, or 0 for a fresh directory.
    pub fn load(&self) -> Result<u64, StateError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(&path)(e)),
        };
        decode(&bytes).map_err(|why| StateError::Corrupt { path, why })
    }

    /// Durably replaces the mark. Blocking: call from a blocking thread.
    pub fn store(&self, mark: u64) -> Result<(), StateError> {
        protocol::record::replace_file(&self.dir, FILE_NAME, &encode(mark)).map_err(|e| {
            StateError::Io {
                path: e.path,
                source: e.source,
            }
        })
    }
}

/// The file's 20 bytes for `mark`: magic, the mark little-endian, CRC32C of both.
pub fn encode(mark: u64) -> [u8; LEN] {
    let mut buf = [0u8; LEN];
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&mark.to_le_bytes());
    let crc = crc32c::crc32c(&buf[..16]);
    buf[16..].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// The mark in a file's bytes, or why they are not a valid state file.
pub fn decode(bytes: &[u8]) -> Result<u64, DecodeError> {
    if bytes.len() != LEN {
        return Err(DecodeError::Length(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(DecodeError::Magic);
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[16..]);
    if crc32c::crc32c(&bytes[..16]) != u32::from_le_bytes(crc) {
        return Err(DecodeError::Checksum);
    }
    let mut mark = [0u8; 8];
    mark.copy_from_slice(&bytes[8..16]);
    Ok(u64::from_le_bytes(mark))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_fresh_dir() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateFile::open(dir.path()).unwrap();
        assert_eq!(s.load().unwrap(), 0);
        s.store(12345).unwrap();
        assert_eq!(s.load().unwrap(), 12345);
        s.store(u64::MAX - 1).unwrap();
        assert_eq!(s.load().unwrap(), u64::MAX - 1);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let good = encode(987654321);
        for i in 0..LEN * 8 {
            let mut bad = good;
            bad[i / 8] ^= 1 << (i % 8);
            assert!(decode(&bad).is_err(), "flip of bit {i} not detected");
        }
    }

    #[test]
    fn a_bad_file_says_which_part_is_wrong() {
        let good = encode(7);
        let mut magic = good;
        magic[0] ^= 1;
        assert_eq!(decode(&magic), Err(DecodeError::Magic));
        let mut mark = good;
        mark[9] ^= 1;
        assert_eq!(decode(&mark), Err(DecodeError::Checksum));
        assert_eq!(decode(&good[..3]), Err(DecodeError::Length(3)));
    }

    #[test]
    fn torn_or_corrupt_file_refuses_to_load() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateFile::open(dir.path()).unwrap();
        s.store(500).unwrap();
        let full = fs::read(s.path()).unwrap();
        for cut in [0, 1, 8, 19] {
            fs::write(s.path(), &full[..cut]).unwrap();
            let err = s.load().unwrap_err();
            assert!(
                matches!(err, StateError::Corrupt { why: DecodeError::Length(n), .. } if n == cut),
                "cut at {cut}: {err}"
            );
        }
        // A leftover temp file from a crash between write and rename is ignored.
        s.store(600).unwrap();
        fs::write(dir.path().join(format!("{FILE_NAME}.tmp")), b"garbage").unwrap();
        assert_eq!(s.load().unwrap(), 600);
    }
}
