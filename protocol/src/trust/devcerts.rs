//! Development certificates: a cluster CA and one certificate for every process of a cluster
//! on one machine, for `make run TLS=1` and the tests. A production cluster uses its own CA and
//! a certificate per host; nothing here is needed for that.
//!
//! The node certificate names `localhost`, 127.0.0.1 and ::1 (and any extra hosts given), and
//! is good for both TLS server and client authentication, so every process can use the same
//! one. Keys are written with mode 0600.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Why the certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    /// rcgen refused (a host name it cannot encode, say).
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where [`generate`] wrote the files.
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// The CA certificate (`--tls-ca`).
    pub ca: PathBuf,
    /// The CA's key (keep it to sign more; not needed to run).
    pub ca_key: PathBuf,
    /// The node certificate (`--tls-cert`).
    pub cert: PathBuf,
    /// The node key (`--tls-key`).
    pub key: PathBuf,
}

/// Writes `text` to `path` through a temporary file and a rename; a private file is created
/// with mode 0600 before any byte of the key is in it.
fn write(path: &Path, text: &str, private: bool) -> Result<(), DevCertError> {
    use std::io::Write;
    let err = |source| DevCertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Makes a CA named `ca_name` and a node certificate it signed, into `dir` as `ca.pem`,
/// `ca.key`, `node.pem` and `node.key` (replacing any there).
pub fn generate(
    dir: &Path,
    ca_name: &str,
    extra_hosts: &[String],
) -> Result<DevCerts, DevCertError> {
    std::fs::create_dir_all(dir).map_err(|source| DevCertError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;

    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    hosts.extend(extra_hosts.iter().cloned());
    let node_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(hosts)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "dtkv node");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let node = params.signed_by(&node_key, &ca, &ca_key)?;

    let out = DevCerts {
        ca: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
    };
    write(&out.ca, &ca.pem(), false)?;
    write(&out.ca_key, &ca_key.serialize_pem(), true)?;
    write(&out.cert, &node.pem(), false)?;
    write(&out.key, &node_key.serialize_pem(), true)?;
    Ok(out)
}
