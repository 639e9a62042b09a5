//! TLS configuration from PEM files: one cluster CA, and each process's certificate and key.
//!
//! Every listener presents its certificate; every dialler verifies the server against the CA
//! and the host it dialled, and presents its own certificate. Listeners ask for a client
//! certificate but do not require one: a verified certificate makes the connection a cluster
//! member (see [`super`]), and a kvstore's clients connect without one. A certificate from any
//! other CA fails the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// rustls refused the configuration (a key that does not match its certificate, say).
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    Ok(Arc::new(roots))
}

/// The rustls configurations of one process.
#[derive(Clone)]
pub struct TlsConfig {
    /// For its listeners (absent for a client-only process such as `dksp`).
    pub server: Option<Arc<ServerConfig>>,
    /// For its dialers.
    pub client: Arc<ClientConfig>,
}

impl TlsConfig {
    /// A member's configuration: its certificate chain and key, and the cluster CA.
    pub fn member(cert: &Path, key: &Path, ca: &Path) -> Result<TlsConfig, TlsError> {
        let chain = certs(cert)?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
        let roots = roots(ca)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key_der.clone_key())
            .map_err(|e| TlsError::Config(format!("{}: {e}", key.display())))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| TlsError::Config(format!("{}: {e}", key.display())))?;
        Ok(TlsConfig {
            server: Some(Arc::new(server)),
            client: Arc::new(client),
        })
    }

    /// A client that only verifies servers against `ca` and presents no certificate (a user's
    /// `dksp --tls`).
    pub fn client_only(ca: &Path) -> Result<TlsConfig, TlsError> {
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth();
        Ok(TlsConfig {
            server: None,
            client: Arc::new(client),
        })
    }
}
