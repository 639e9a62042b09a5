//! Credentials for test systems: a cluster secret and/or development certificates made in a
//! test's temp dir, the server flags naming them, and the [`Trust`] the test process dials with.
//!
//! Without credentials (the default) every process trusts loopback peers, exactly as before
//! issue #19. `DTKV_TEST_SECURE=secret`, `tls` or `tls+secret` turns credentials on for every
//! system a test process starts (one set per test process, removed at exit), so whole suites can
//! be run secured; [`crate::System::start_secured`] asks for them explicitly.
//!
//! Invariant: every process of one system gets the same flags, and the test's member
//! [`Trust`] holds the same secret and a certificate from the same CA.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use protocol::trust::devcerts::{self, DevCerts};
use protocol::trust::{Trust, TrustArgs};
use protocol::{Client, ClientError, ErrorCode};

/// The env var that secures every system a test process starts.
pub const SECURE_ENV: &str = "DTKV_TEST_SECURE";

/// Which credentials a test system runs with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Security {
    /// A cluster secret file (`--cluster-secret-file`).
    pub secret: bool,
    /// A dev CA and node certificate (`--tls-cert`, `--tls-key`, `--tls-ca`).
    pub tls: bool,
}

impl Security {
    /// No credentials: loopback is trusted.
    pub const NONE: Security = Security {
        secret: false,
        tls: false,
    };
    /// The cluster secret only.
    pub const SECRET: Security = Security {
        secret: true,
        tls: false,
    };
    /// TLS only.
    pub const TLS: Security = Security {
        secret: false,
        tls: true,
    };
    /// TLS and the secret.
    pub const BOTH: Security = Security {
        secret: true,
        tls: true,
    };

    /// Parses a `DTKV_TEST_SECURE` value: empty/`none`, `secret`, `tls`, `tls+secret`.
    pub fn parse(s: &str) -> Option<Security> {
        let mut out = Security::NONE;
        for part in s.split('+').map(str::trim).filter(|p| !p.is_empty()) {
            match part.to_ascii_lowercase().as_str() {
                "none" | "0" | "off" => {}
                "secret" => out.secret = true,
                "tls" => out.tls = true,
                _ => return None,
            }
        }
        Some(out)
    }

    /// What `DTKV_TEST_SECURE` asks for (none when unset); panics on a value it cannot parse,
    /// so a typo does not silently run a suite unsecured.
    pub fn from_env() -> Security {
        match std::env::var(SECURE_ENV) {
            Ok(v) => Security::parse(&v).unwrap_or_else(|| {
                panic!("{SECURE_ENV}={v:?}: expected secret, tls or tls+secret")
            }),
            Err(_) => Security::NONE,
        }
    }

    /// Whether any credential is on.
    pub fn any(self) -> bool {
        self.secret || self.tls
    }
}

/// The credential files of one system, and the trust a test dials its processes with.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// What was asked for.
    pub security: Security,
    /// The secret file, if any.
    pub secret_file: Option<PathBuf>,
    /// The dev certificates, if any.
    pub certs: Option<DevCerts>,
    /// A cluster member's trust: the secret and/or the node certificate.
    pub member: Trust,
}

impl Credentials {
    /// No credentials.
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// Makes the files `security` asks for in `dir` (a secret as 64 hex digits, certificates
    /// from a fresh CA named `ca_name`).
    pub fn make(security: Security, dir: &Path, ca_name: &str) -> Credentials {
        std::fs::create_dir_all(dir).expect("credentials dir");
        let secret_file = security.secret.then(|| {
            let path = dir.join("cluster.secret");
            let bytes: [u8; 32] = rand::random();
            std::fs::write(&path, protocol::trust::secret::hex(&bytes)).expect("secret file");
            path
        });
        let certs = security
            .tls
            .then(|| devcerts::generate(&dir.join("tls"), ca_name, &[]).expect("dev certs"));
        let member = TrustArgs {
            cluster_secret_file: secret_file.clone(),
            tls_cert: certs.as_ref().map(|c| c.cert.clone()),
            tls_key: certs.as_ref().map(|c| c.key.clone()),
            tls_ca: certs.as_ref().map(|c| c.ca.clone()),
        }
        .load()
        .expect("loading the test credentials");
        Credentials {
            security,
            secret_file,
            certs,
            member,
        }
    }

    /// The credentials of `DTKV_TEST_SECURE`: one set per test process, made on first use in a
    /// temp dir removed at exit; none when the variable is unset. `DTKV_CLUSTER_SECRET_FILE`
    /// instead names an existing secret (a tool run against a system `scripts/dtkv.sh`
    /// started, such as `dtkv-bench hops` in `make bench-latency`).
    pub fn from_env() -> Credentials {
        let (c, _) = ENV.get_or_init(|| {
            if let Some(f) = std::env::var_os("DTKV_CLUSTER_SECRET_FILE") {
                let args = TrustArgs {
                    cluster_secret_file: Some(f.into()),
                    ..TrustArgs::default()
                };
                let c = Credentials::from_files(&args).expect("DTKV_CLUSTER_SECRET_FILE");
                return (c, None);
            }
            let security = Security::from_env();
            if !security.any() {
                return (Credentials::none(), None);
            }
            let dir = tempfile::Builder::new()
                .prefix("dtkv-test-creds-")
                .tempdir()
                .expect("tempdir")
                .keep();
            register_cleanup(dir.clone());
            (Credentials::make(security, &dir, "dtkv test CA"), Some(dir))
        });
        c.clone()
    }

    /// Credentials from existing files (a tool run against `make run`'s system, such as
    /// drill), for the harness's clients.
    pub fn from_files(args: &TrustArgs) -> Result<Credentials, protocol::trust::TrustError> {
        let member = args.load()?;
        Ok(Credentials {
            security: Security {
                secret: member.secret.is_some(),
                tls: member.tls.is_some(),
            },
            secret_file: args.cluster_secret_file.clone(),
            certs: None,
            member,
        })
    }

    /// Makes `self` what [`from_env`](Self::from_env) returns in this process (before its
    /// first use; false after it).
    pub fn install(self) -> bool {
        ENV.set((self, None)).is_ok()
    }

    /// The server flags naming these files, for every process of the system.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(f) = &self.secret_file {
            args.extend(["--cluster-secret-file".to_string(), f.display().to_string()]);
        }
        if let Some(c) = &self.certs {
            args.extend([
                "--tls-cert".to_string(),
                c.cert.display().to_string(),
                "--tls-key".into(),
                c.key.display().to_string(),
                "--tls-ca".into(),
                c.ca.display().to_string(),
            ]);
        }
        args
    }

    /// The trust for a kvstore's client port: TLS if on (no cluster handshake, which the
    /// kvstore does not speak).
    pub fn kv_client(&self) -> Trust {
        Trust {
            secret: None,
            tls: self.member.tls.clone(),
        }
    }

    /// Connects to a sequencer or logserver as a member.
    pub async fn connect_member(&self, addr: &str) -> protocol::client::Result<Client> {
        Client::connect_trusted(addr, &self.member).await
    }

    /// Connects to a kvstore's client port (under TLS if on).
    pub async fn connect_kv(&self, addr: &str) -> protocol::client::Result<Client> {
        Client::connect_trusted(addr, &self.kv_client()).await
    }

    /// Connects to any of the servers: under TLS if on; with the secret's handshake where the
    /// server speaks it (a kvstore answers `HELLO` with `UNKNOWN_COMMAND` and the connection is
    /// used as it is). For the harness's waits and `STATUS` polls, which do not know which
    /// server a port is.
    pub async fn connect_any(&self, addr: &str) -> protocol::client::Result<Client> {
        let mut c = Client::connect_trusted(addr, &self.kv_client()).await?;
        if let Some(secret) = self.member.secret.as_ref() {
            if self.member.tls.is_none() {
                match c.prove(secret).await {
                    Ok(()) => {}
                    Err(ClientError::Server(e)) if e.code == ErrorCode::UnknownCommand => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(c)
    }
}

/// The process's harness credentials (see [`Credentials::from_env`]).
static ENV: OnceLock<(Credentials, Option<PathBuf>)> = OnceLock::new();

/// Removes the env credentials' dir when the test process exits (statics are never dropped).
fn register_cleanup(dir: PathBuf) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let _ = DIR.set(dir);
    extern "C" fn cleanup() {
        if let Some(d) = DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    // SAFETY: registers a plain function with no captured state; it only removes a dir.
    #[cfg(unix)]
    unsafe {
        libc::atexit(cleanup);
    }
}
