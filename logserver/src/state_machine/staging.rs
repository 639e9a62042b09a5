//! A checkpoint upload in progress: its chunks, kept as the `Bytes` the log entries carry, and
//! how a snapshot stores them.
//!
//! Invariant: a snapshot stores the staged bytes as one byte string, exactly as the `Vec<u8>`
//! they once were, so snapshot files written before stay readable.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A checkpoint upload in progress. The chunks are kept as the `Bytes` the log entries carry,
/// so staging shares memory with the in-memory Raft log instead of copying every chunk into a
/// growing `Vec` (which, with its doubling, held up to twice the upload again). They are joined
/// once, at `CKPT_COMMIT`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Staging {
    pub(super) id: u64,
    #[serde(with = "chunks_as_bytes")]
    pub(super) data: Chunks,
}

/// The staged chunks, in order, and their total length.
#[derive(Debug, Clone, Default)]
pub(super) struct Chunks {
    parts: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    pub(super) fn push(&mut self, b: Bytes) {
        self.len = self.len.saturating_add(b.len());
        if !b.is_empty() {
            self.parts.push(b);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn crc32c(&self) -> u32 {
        self.parts
            .iter()
            .fold(0, |crc, p| crc32c::crc32c_append(crc, p))
    }

    /// One contiguous buffer (no copy if there is a single chunk).
    pub(super) fn join(self) -> Bytes {
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts.into_iter().next().unwrap_or_default(),
            _ => {
                let mut out = Vec::with_capacity(self.len);
                for p in &self.parts {
                    out.extend_from_slice(p);
                }
                Bytes::from(out)
            }
        }
    }
}

/// Snapshots store the staged bytes as one byte string, exactly as the `Vec<u8>` this used to
/// be (postcard writes both as a length and the bytes), so existing snapshot files stay readable.
mod chunks_as_bytes {
    use super::Chunks;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &Chunks, s: S) -> Result<S::Ok, S::Error> {
        let mut all = Vec::with_capacity(c.len);
        for p in &c.parts {
            all.extend_from_slice(p);
        }
        s.serialize_bytes(&all)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Chunks, D::Error> {
        let mut c = Chunks::default();
        c.push(Bytes::deserialize(d)?);
        Ok(c)
    }
}
