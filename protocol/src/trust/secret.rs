//! The shared cluster secret and the challenge–response proofs made with it.
//!
//! A member proves it holds the secret without sending it: each side picks a fresh 32-byte nonce,
//! and the client answers `HMAC-SHA256(secret, "dtkv-cluster-v1 client" ‖ server nonce ‖ client
//! nonce)`, the server `HMAC-SHA256(secret, "dtkv-cluster-v1 server" ‖ …)` back, so each side
//! also knows the other holds it (a fake server cannot collect proofs to replay: every proof
//! covers the other side's fresh nonce). Proofs are compared in constant time.
//!
//! Invariant: a [`ClusterSecret`] never holds fewer than [`MIN_SECRET_BYTES`] bytes, and never
//! prints them (its `Debug` shows only the length).

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::fmt;
use std::path::{Path, PathBuf};

/// The shortest secret accepted, after trimming surrounding whitespace: 128 bits of hex.
pub const MIN_SECRET_BYTES: usize = 32;

/// Bytes in a nonce and in a proof.
pub const NONCE_BYTES: usize = 32;

const CONTEXT: &[u8] = b"dtkv-cluster-v1 ";

/// Which side of the handshake a proof is from: a proof is only ever valid for one side, so a
/// client's proof cannot be reflected back as a server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that dialled.
    Client,
    /// The side that accepted.
    Server,
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file cannot be read.
    #[error("cannot read the cluster secret {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file holds too little.
    #[error(
        "the cluster secret {path} is {len} bytes; at least {MIN_SECRET_BYTES} are needed \
         (make one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE`)"
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length after trimming.
        len: usize,
    },
}

/// The secret every member of one cluster holds (`--cluster-secret-file`).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Vec<u8>);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret({} bytes)", self.0.len())
    }
}

impl ClusterSecret {
    /// The secret `bytes` (surrounding whitespace trimmed), if long enough.
    pub fn new(bytes: &[u8]) -> Option<ClusterSecret> {
        let t = bytes.trim_ascii();
        (t.len() >= MIN_SECRET_BYTES).then(|| ClusterSecret(t.to_vec()))
    }

    /// Reads the secret from `path`; warns if the file is readable by group or others.
    pub fn load(path: &Path) -> Result<ClusterSecret, SecretError> {
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(path) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        "the cluster secret {} is readable by others (mode {:o}); chmod 600 it",
                        path.display(),
                        m.permissions().mode() & 0o777
                    );
                }
            }
        }
        ClusterSecret::new(&bytes).ok_or_else(|| SecretError::TooShort {
            path: path.to_path_buf(),
            len: bytes.trim_ascii().len(),
        })
    }

    /// The proof `side` gives for the handshake with these nonces.
    pub fn proof(&self, side: Side, server_nonce: &[u8], client_nonce: &[u8]) -> [u8; 32] {
        self.mac(side, server_nonce, client_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is `side`'s proof for these nonces (constant time).
    pub fn verify(
        &self,
        side: Side,
        server_nonce: &[u8],
        client_nonce: &[u8],
        proof: &[u8],
    ) -> bool {
        self.mac(side, server_nonce, client_nonce)
            .verify_slice(proof)
            .is_ok()
    }

    fn mac(&self, side: Side, server_nonce: &[u8], client_nonce: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; this cannot fail.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(CONTEXT);
        mac.update(match side {
            Side::Client => b"client",
            Side::Server => b"server",
        });
        mac.update(&(server_nonce.len() as u32).to_be_bytes());
        mac.update(server_nonce);
        mac.update(client_nonce);
        mac
    }
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// The bytes of hex `s`, if it is exactly `N` bytes of hex.
pub fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> ClusterSecret {
        ClusterSecret::new(b"0123456789abcdef0123456789abcdef\n").expect("long enough")
    }

    #[test]
    fn a_proof_verifies_for_its_side_and_nonces_only() {
        let s = secret();
        let (sn, cn) = (nonce(), nonce());
        let p = s.proof(Side::Client, &sn, &cn);
        assert!(s.verify(Side::Client, &sn, &cn, &p));
        assert!(
            !s.verify(Side::Server, &sn, &cn, &p),
            "a client proof is no server proof"
        );
        assert!(
            !s.verify(Side::Client, &cn, &sn, &p),
            "nonces are not interchangeable"
        );
        assert!(!s.verify(Side::Client, &sn, &nonce(), &p));
        let other = ClusterSecret::new(b"another secret of thirty-two bytes!!").expect("long");
        assert!(!other.verify(Side::Client, &sn, &cn, &p));
    }

    #[test]
    fn a_short_secret_is_refused_and_whitespace_is_not_part_of_it() {
        assert!(ClusterSecret::new(b"   short   ").is_none());
        assert_eq!(
            secret(),
            ClusterSecret::new(b"  0123456789abcdef0123456789abcdef").expect("ok")
        );
        assert_eq!(format!("{:?}", secret()), "ClusterSecret(32 bytes)");
    }

    #[test]
    fn hex_round_trips_and_refuses_wrong_lengths_and_digits() {
        let n = nonce();
        assert_eq!(unhex::<32>(hex(&n).as_bytes()), Some(n));
        assert_eq!(unhex::<2>(b"0aff"), Some([0x0a, 0xff]));
        assert_eq!(unhex::<2>(b"0af"), None);
        assert_eq!(unhex::<2>(b"0afg"), None);
    }
}
