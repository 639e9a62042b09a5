//! The harness for tests that run the real binaries: find them, start them on free ports in
//! temp dirs, wait until they answer `PING`, and kill them (SIGKILL, like a crash) when a test
//! ends, also when it fails.
//!
//! The binaries must be built first: `make test` runs `cargo build --workspace --bins` before
//! the tests. A missing binary fails the test with that instruction.
//!
//! This file holds the single processes ([`Proc`], [`Sequencer`]) and the waits; whole systems
//! (a log cluster, a log cluster with a sequencer and a kvstore) are in `system.rs`.

#![warn(missing_docs)]

pub mod hops;
pub mod jepsen;
pub mod loadgen;
pub mod secure;
mod system;
pub mod workload;

pub use secure::{Credentials, Security};
pub use system::{wait_serving, wait_serving_as, wait_serving_with, LogCluster, Replica, System};

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test's target directory.
pub fn bin(name: &str) -> PathBuf {
    // Tests run from target/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first with `cargo build --workspace --bins` (make test does)",
        path.display()
    );
    path
}

/// A loopback port that is free now, for a server a test starts (maybe more than once: a
/// restarted process binds its port again).
///
/// The port comes from below the kernel's ephemeral range when there is room there. A port
/// from the ephemeral range (what binding `:0` gives) can be taken, while its process is down
/// for a restart, as the source port of some other test's outgoing connection, and the restart
/// then fails with "address in use". Ports are handed out once per test process, starting at
/// an offset from the pid so that concurrent test processes rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const LOW: u32 = 10_000;
    if ephemeral_low >= LOW + 2_000 {
        let span = ephemeral_low - LOW;
        let offset = std::process::id().wrapping_mul(7919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = LOW + (offset + n) % span;
            if let Ok(port) = u16::try_from(port) {
                if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                    return port;
                }
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// `127.0.0.1:<port>`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child process that is SIGKILLed when dropped. Its stderr goes to `<log>`.
pub struct Proc {
    child: Option<Child>,
    /// The binary's name, for messages.
    pub name: String,
    /// The file its stderr is appended to.
    pub log: PathBuf,
}

impl Proc {
    /// Starts the workspace binary `binary` with `args`, stderr appended to `log`.
    pub fn spawn(binary: &str, args: &[String], log: &Path) -> Proc {
        Proc::start(Proc::command(binary, args, log), binary, log)
    }

    /// [`spawn`](Self::spawn) with the soft open-file limit of the child set to `soft` (the
    /// hard limit unchanged), as a host with a low `ulimit -n` would start it.
    #[cfg(unix)]
    pub fn spawn_with_nofile(binary: &str, args: &[String], log: &Path, soft: u64) -> Proc {
        use std::os::unix::process::CommandExt;
        let mut cmd = Proc::command(binary, args, log);
        // SAFETY: between fork and exec only setrlimit, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                lim.rlim_cur = (soft as libc::rlim_t).min(lim.rlim_max);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Proc::start(cmd, binary, log)
    }

    /// The command every spawn runs: the binary with `args`, stderr appended to `log`.
    fn command(binary: &str, args: &[String], log: &Path) -> Command {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("opening log file");
        let mut cmd = Command::new(bin(binary));
        cmd.args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        cmd
    }

    fn start(mut cmd: Command, binary: &str, log: &Path) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {binary}: {e}"));
        Proc {
            child: Some(child),
            name: binary.to_string(),
            log: log.to_path_buf(),
        }
    }

    /// The process id, while it has not been killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL and reap: a crash, not a graceful stop.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the process to exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().ok()
    }

    /// Waits for the process to exit by itself (e.g. refusing to start).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `PING` until the server answers `PONG` (readiness, not a sleep), or fails after
/// `timeout` with the process's log. Dials with `DTKV_TEST_SECURE`'s credentials.
pub async fn wait_ready(addr: SocketAddr, proc_: &mut Proc, timeout: Duration) {
    wait_ready_with(addr, proc_, timeout, &Credentials::from_env()).await
}

/// [`wait_ready`], dialling with `creds`.
pub async fn wait_ready_with(
    addr: SocketAddr,
    proc_: &mut Proc,
    timeout: Duration,
    creds: &Credentials,
) {
    let deadline = Instant::now() + timeout;
    let addr_s = addr.to_string();
    loop {
        if let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(1), creds.connect_any(&addr_s)).await
        {
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), c.ping()).await {
                return;
            }
        }
        if !proc_.running() {
            panic!(
                "{} exited before answering PING; log:\n{}",
                proc_.name,
                proc_.log_tail(30)
            );
        }
        if Instant::now() > deadline {
            panic!(
                "{} did not answer PING on {addr} within {timeout:?}; log:\n{}",
                proc_.name,
                proc_.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A sequencer on a free port in its own data dir.
pub struct Sequencer {
    /// The process.
    pub proc_: Proc,
    /// Where it listens for DKSP.
    pub addr: SocketAddr,
    /// Its `--data-dir`.
    pub data_dir: PathBuf,
    extra: Vec<String>,
    /// The credentials it runs with.
    pub creds: Credentials,
}

impl Sequencer {
    /// Starts a sequencer on a free port with `data_dir` and the `extra` arguments, and waits until
    /// it answers `PING`.
    /// Runs with `DTKV_TEST_SECURE`'s credentials, if any.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> Sequencer {
        Sequencer::start_with(data_dir, extra, Credentials::from_env()).await
    }

    /// [`start`](Self::start) with `creds` (their flags are added to `extra`).
    pub async fn start_with(data_dir: &Path, extra: &[&str], creds: Credentials) -> Sequencer {
        let addr = local(free_port());
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        extra.extend(creds.args());
        let proc_ = Self::spawn(addr, data_dir, &extra);
        let mut s = Sequencer {
            proc_,
            addr,
            data_dir: data_dir.to_path_buf(),
            extra,
            creds,
        };
        wait_ready_with(s.addr, &mut s.proc_, Duration::from_secs(20), &s.creds).await;
        s
    }

    /// A member connection to it.
    pub async fn connect(&self) -> protocol::Client {
        self.creds
            .connect_member(&self.addr.to_string())
            .await
            .expect("connecting to the sequencer")
    }

    fn spawn(addr: SocketAddr, data_dir: &Path, extra: &[String]) -> Proc {
        let mut args = vec![
            "--listen".to_string(),
            addr.to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        Proc::spawn("sequencer", &args, &data_dir.join("sequencer.log"))
    }

    /// kill -9, then start again on the same port and data dir and wait until ready.
    pub async fn crash_and_restart(&mut self) {
        self.proc_.kill9();
        self.proc_ = Self::spawn(self.addr, &self.data_dir, &self.extra);
        wait_ready_with(
            self.addr,
            &mut self.proc_,
            Duration::from_secs(20),
            &self.creds,
        )
        .await;
    }
}

/// A kvstore user's credentials, for a test or load generator on a kvstore with `--users`:
/// [`connect`] sends `AUTH` with them right after connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// The user name.
    pub user: String,
    /// The password.
    pub password: String,
}

impl Auth {
    /// Credentials of `user` with `password`.
    pub fn new(user: &str, password: &str) -> Auth {
        Auth {
            user: user.to_string(),
            password: password.to_string(),
        }
    }

    /// Sends `AUTH` on `c`: `Ok` once the server answered `OK`.
    pub async fn login(&self, c: &mut protocol::Client) -> protocol::client::Result<()> {
        let req = protocol::kv::Request::Auth {
            user: self.user.clone().into(),
            password: protocol::kv::Password(self.password.clone().into()),
        };
        match c.call_ok(&req.encode()).await? {
            protocol::Response::Ok(_) => Ok(()),
            r => Err(protocol::client::ClientError::Unexpected(r)),
        }
    }
}

/// Connects to `addr` and, with `auth`, authenticates (the one way tests and load generators
/// should open kvstore connections, so turning users on for a test is one argument).
pub async fn connect(
    addr: SocketAddr,
    auth: Option<&Auth>,
) -> protocol::client::Result<protocol::Client> {
    let mut c = Credentials::from_env()
        .connect_kv(&addr.to_string())
        .await?;
    if let Some(a) = auth {
        a.login(&mut c).await?;
    }
    Ok(c)
}

/// Parses a `STATUS` reply into key/value pairs (dialling with `DTKV_TEST_SECURE`'s
/// credentials, as a member where the server has members).
pub async fn status(addr: SocketAddr) -> Option<std::collections::HashMap<String, String>> {
    status_with(addr, &Credentials::from_env()).await
}

/// [`status`], dialling with `creds`.
pub async fn status_with(
    addr: SocketAddr,
    creds: &Credentials,
) -> Option<std::collections::HashMap<String, String>> {
    status_full(addr, creds, None).await
}

/// [`status`] after `AUTH` with `auth` (a kvstore with `--users` answers `STATUS` only to an
/// admin).
pub async fn status_as(
    addr: SocketAddr,
    auth: Option<&Auth>,
) -> Option<std::collections::HashMap<String, String>> {
    status_full(addr, &Credentials::from_env(), auth).await
}

/// [`status`] dialling with `creds` and, with `auth`, after `AUTH`.
pub async fn status_full(
    addr: SocketAddr,
    creds: &Credentials,
    auth: Option<&Auth>,
) -> Option<std::collections::HashMap<String, String>> {
    let dial = async {
        let mut c = creds.connect_any(&addr.to_string()).await?;
        if let Some(a) = auth {
            a.login(&mut c).await?;
        }
        Ok::<_, protocol::ClientError>(c)
    };
    let mut c = tokio::time::timeout(Duration::from_secs(1), dial)
        .await
        .ok()?
        .ok()?;
    let pairs = tokio::time::timeout(Duration::from_secs(1), c.status())
        .await
        .ok()?
        .ok()?;
    Some(pairs.into_iter().collect())
}

/// Polls `cond` every 20 ms until it holds, or panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A checkpoint in the kvstore's format stating log index `index`, of about `bytes` bytes (the
/// logserver refuses a `CKPT_COMMIT` of anything else).
pub fn kv_checkpoint(index: u64, bytes: usize) -> Vec<u8> {
    let entries = (0..bytes / 32 + 1)
        .map(|i| {
            (
                bytes::Bytes::from(format!("key:{i:012}")),
                1 + i as u64,
                bytes::Bytes::from(vec![(i % 251) as u8; 12]),
            )
        })
        .collect::<Vec<_>>();
    protocol::kvlog::Checkpoint {
        index,
        max_ts: entries.len() as u64,
        epoch: 1,
        entries,
    }
    .encode()
    .expect("encoding a checkpoint")
}
