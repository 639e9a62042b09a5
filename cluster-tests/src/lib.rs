//! The harness for tests that run the real binaries: find them, start them on free ports in
//! temp dirs, wait until they answer `PING`, and kill them (SIGKILL, like a crash) when a test
//! ends, also when it fails.
//!
//! The binaries must be built first: `make test` runs `cargo build --workspace --bins` before
//! the tests. A missing binary fails the test with that instruction.

pub mod hops;
pub mod jepsen;
pub mod loadgen;
pub mod workload;

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

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child process that is SIGKILLed when dropped. Its stderr goes to `<log>`.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
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
/// `timeout` with the process's log.
pub async fn wait_ready(addr: SocketAddr, proc_: &mut Proc, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(1), protocol::Client::connect(addr)).await
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
    pub proc_: Proc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    extra: Vec<String>,
}

impl Sequencer {
    pub async fn start(data_dir: &Path, extra: &[&str]) -> Sequencer {
        let addr = local(free_port());
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let proc_ = Self::spawn(addr, data_dir, &extra);
        let mut s = Sequencer {
            proc_,
            addr,
            data_dir: data_dir.to_path_buf(),
            extra,
        };
        wait_ready(s.addr, &mut s.proc_, Duration::from_secs(20)).await;
        s
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
        wait_ready(self.addr, &mut self.proc_, Duration::from_secs(20)).await;
    }
}

/// Parses a `STATUS` reply into key/value pairs.
pub async fn status(addr: SocketAddr) -> Option<std::collections::HashMap<String, String>> {
    let mut c = tokio::time::timeout(Duration::from_secs(1), protocol::Client::connect(addr))
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

/// One logserver replica of a test cluster.
pub struct Replica {
    pub id: u64,
    pub dksp: SocketAddr,
    pub raft: SocketAddr,
    /// The DKSP address the membership advertises (in `REDIRECT`s): `dksp`, unless clients
    /// reach this replica through a proxy.
    pub advertise: SocketAddr,
    /// Arguments for this replica only (e.g. `--raft-route`).
    pub extra: Vec<String>,
    pub data_dir: PathBuf,
    pub proc_: Option<Proc>,
}

/// Three logserver replicas on free ports in a temp dir.
pub struct LogCluster {
    pub dir: tempfile::TempDir,
    pub replicas: Vec<Replica>,
    pub extra: Vec<String>,
}

impl LogCluster {
    /// Every entry of replica `i`, read in pages.
    pub async fn read_all(&self, i: usize) -> Vec<(u64, bytes::Bytes)> {
        let mut client = protocol::Client::connect(self.replicas[i].dksp)
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let page = client.read_log(from, Some(1000)).await.unwrap();
            let Some(&(last, _)) = page.last() else {
                return out;
            };
            from = last + 1;
            out.extend(page);
        }
    }

    /// Starts three replicas (replica 1 with `--init`) and waits for a leader.
    pub async fn start(extra: &[&str]) -> LogCluster {
        let mut c = LogCluster::new(extra);
        c.launch().await;
        c
    }

    /// Three replicas with their ports and directories chosen, none started yet.
    pub fn new(extra: &[&str]) -> LogCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let replicas = (1..=3)
            .map(|id| {
                let dksp = local(free_port());
                Replica {
                    id,
                    dksp,
                    raft: local(free_port()),
                    advertise: dksp,
                    extra: Vec::new(),
                    data_dir: dir.path().join(format!("log-{id}")),
                    proc_: None,
                }
            })
            .collect();
        LogCluster {
            dir,
            replicas,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Starts every replica of a [`new`](Self::new) cluster and waits for a leader.
    pub async fn launch(&mut self) {
        for i in 0..self.replicas.len() {
            self.spawn(i, i == 0).await;
        }
        self.wait_for_leader().await;
    }

    pub fn peers(&self) -> String {
        self.replicas
            .iter()
            .map(|r| format!("{}={}/{}", r.id, r.raft, r.advertise))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn addrs(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.dksp.to_string()).collect()
    }

    async fn spawn(&mut self, i: usize, init: bool) {
        let r = &self.replicas[i];
        let (dksp, log) = (r.dksp, self.dir.path().join(format!("log-{}.log", r.id)));
        let mut p = self.spawn_unready(i, init, &log);
        wait_ready(dksp, &mut p, Duration::from_secs(20)).await;
        self.replicas[i].proc_ = Some(p);
    }

    /// Starts replica `i` logging to `log` without waiting for it to serve (for a replica
    /// expected to refuse to start or to exit by itself). The caller owns the process.
    pub fn spawn_unready(&self, i: usize, init: bool, log: &Path) -> Proc {
        let peers = self.peers();
        let r = &self.replicas[i];
        let mut args = vec![
            "--id".to_string(),
            r.id.to_string(),
            "--listen".into(),
            r.dksp.to_string(),
            "--raft-listen".into(),
            r.raft.to_string(),
            "--data-dir".into(),
            r.data_dir.display().to_string(),
            "--peers".into(),
            peers,
        ];
        if init {
            args.push("--init".into());
        }
        args.extend(self.extra.iter().cloned());
        args.extend(r.extra.iter().cloned());
        std::fs::create_dir_all(&r.data_dir).expect("data dir");
        Proc::spawn("logserver", &args, log)
    }

    /// kill -9 replica `i` (0-based).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].proc_.take() {
            p.kill9();
        }
    }

    /// Starts replica `i` again on its ports and data dir (never with --init).
    pub async fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.spawn(i, false).await;
    }

    /// Deletes replica `i`'s data (it must be stopped).
    pub fn wipe(&mut self, i: usize) {
        assert!(self.replicas[i].proc_.is_none(), "wipe a stopped replica");
        let _ = std::fs::remove_dir_all(&self.replicas[i].data_dir);
    }

    pub async fn status(&self, i: usize) -> Option<std::collections::HashMap<String, String>> {
        status(self.replicas[i].dksp).await
    }

    /// The index of the replica that says it is leader, if one does and the live replicas agree.
    pub async fn leader(&self) -> Option<usize> {
        let mut leader = None;
        let mut leader_addr = None;
        for (i, r) in self.replicas.iter().enumerate() {
            if r.proc_.is_none() {
                continue;
            }
            let s = status(r.dksp).await?;
            if s.get("role").map(String::as_str) == Some("leader") {
                leader = Some(i);
            }
            let l = s.get("leader").cloned()?;
            if l == "none" || leader_addr.get_or_insert(l.clone()) != &l {
                return None;
            }
        }
        leader
    }

    pub async fn wait_for_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self.leader().await {
                return l;
            }
            if Instant::now() > deadline {
                let mut logs = String::new();
                for r in &self.replicas {
                    if let Some(p) = &r.proc_ {
                        logs.push_str(&format!("--- replica {} ---\n{}\n", r.id, p.log_tail(15)));
                    }
                }
                panic!("no leader within 20 s\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until replica `i` has applied logical index `last`.
    pub async fn wait_applied(&self, i: usize, last: u64) {
        let addr = self.replicas[i].dksp;
        wait_until(
            Duration::from_secs(30),
            &format!("replica {} to apply index {last}", i + 1),
            || async move {
                status(addr)
                    .await
                    .and_then(|s| s.get("last")?.parse::<u64>().ok())
                    .is_some_and(|l| l >= last)
            },
        )
        .await;
    }
}

/// A whole system: three log replicas, a sequencer and a kvstore, each on free ports.
pub struct System {
    pub log: LogCluster,
    pub seq: Sequencer,
    pub kv: Option<Proc>,
    pub kv_addr: SocketAddr,
    pub kv_extra: Vec<String>,
    /// Where the kvstore is told the sequencer and the log replicas are: their own addresses,
    /// unless the links go through proxies.
    pub kv_seq_route: String,
    pub kv_log_route: Vec<String>,
    kv_starts: usize,
}

impl System {
    pub async fn start(kv_extra: &[&str]) -> System {
        let log = LogCluster::start(&[]).await;
        let mut s = System::assemble(log, kv_extra).await;
        s.start_kv().await;
        s
    }

    /// A sequencer next to a running log cluster; the kvstore is not started yet.
    pub async fn assemble(log: LogCluster, kv_extra: &[&str]) -> System {
        let seq_dir = log.dir.path().join("sequencer");
        std::fs::create_dir_all(&seq_dir).expect("sequencer dir");
        let seq = Sequencer::start(&seq_dir, &[]).await;
        System {
            kv_seq_route: seq.addr.to_string(),
            kv_log_route: log.addrs(),
            log,
            seq,
            kv: None,
            kv_addr: local(free_port()),
            kv_extra: kv_extra.iter().map(|s| s.to_string()).collect(),
            kv_starts: 0,
        }
    }

    /// Arguments for a kvstore on `addr` pointed at this system's sequencer and log.
    pub fn kv_args(&self, addr: SocketAddr) -> Vec<String> {
        let mut args = vec![
            "--listen".to_string(),
            addr.to_string(),
            "--sequencer".into(),
            self.kv_seq_route.clone(),
            "--log".into(),
            self.kv_log_route.join(","),
        ];
        args.extend(self.kv_extra.iter().cloned());
        args
    }

    /// Starts a kvstore process on `addr` and waits until it serves.
    pub async fn spawn_kv(&mut self, addr: SocketAddr) -> Proc {
        self.kv_starts += 1;
        let log = self
            .log
            .dir
            .path()
            .join(format!("kvstore-{}.log", self.kv_starts));
        let mut p = Proc::spawn("kvstore", &self.kv_args(addr), &log);
        wait_ready(addr, &mut p, Duration::from_secs(20)).await;
        wait_serving(addr, &mut p).await;
        p
    }

    pub async fn start_kv(&mut self) {
        let p = self.spawn_kv(self.kv_addr).await;
        self.kv = Some(p);
    }

    pub fn kill_kv(&mut self) {
        if let Some(mut p) = self.kv.take() {
            p.kill9();
        }
    }

    pub async fn restart_kv(&mut self) {
        self.kill_kv();
        self.start_kv().await;
    }

    /// The running servers' process ids by name (`kvstore`, `log-1`..`log-3`, `sequencer`),
    /// for benchmarks that watch their memory. A stopped process is left out.
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut pids = Vec::new();
        if let Some(pid) = self.kv.as_ref().and_then(Proc::pid) {
            pids.push(("kvstore".to_string(), pid));
        }
        for r in &self.log.replicas {
            if let Some(pid) = r.proc_.as_ref().and_then(Proc::pid) {
                pids.push((format!("log-{}", r.id), pid));
            }
        }
        if let Some(pid) = self.seq.proc_.pid() {
            pids.push(("sequencer".to_string(), pid));
        }
        pids
    }
}

/// Waits until a kvstore reports `state=serving` (it replays the log first).
pub async fn wait_serving(addr: SocketAddr, p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = status(addr).await {
            if s.get("state").map(String::as_str) == Some("serving") {
                return;
            }
        }
        if !p.running() || Instant::now() > deadline {
            panic!("kvstore on {addr} is not serving; log:\n{}", p.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
