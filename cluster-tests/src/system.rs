//! Whole systems for tests: a three-replica log cluster ([`LogCluster`]) and a log cluster with
//! a sequencer and a kvstore ([`System`]), each process on free ports in one temp dir, killed
//! when the value is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{
    free_port, local, status_with, wait_ready_with, wait_until, Credentials, Proc, Security,
    Sequencer,
};

/// One logserver replica of a test cluster.
pub struct Replica {
    /// Its Raft id (1 to 3).
    pub id: u64,
    /// Where it listens for DKSP.
    pub dksp: SocketAddr,
    /// Where it listens for Raft RPCs.
    pub raft: SocketAddr,
    /// The DKSP address the membership advertises (in `REDIRECT`s): `dksp`, unless clients
    /// reach this replica through a proxy.
    pub advertise: SocketAddr,
    /// Arguments for this replica only (e.g. `--raft-route`).
    pub extra: Vec<String>,
    /// Its `--data-dir`.
    pub data_dir: PathBuf,
    /// The running process; `None` while it is stopped.
    pub proc_: Option<Proc>,
}

/// Three logserver replicas on free ports in a temp dir.
pub struct LogCluster {
    /// The temp dir holding every replica's data and logs.
    pub dir: tempfile::TempDir,
    /// The replicas, ids 1 to 3 in order.
    pub replicas: Vec<Replica>,
    /// Arguments for every replica.
    pub extra: Vec<String>,
    /// The credentials every process of this cluster (and a [`System`] around it) runs with.
    pub creds: Credentials,
}

impl LogCluster {
    /// Every entry of replica `i`, read in pages.
    pub async fn read_all(&self, i: usize) -> Vec<(u64, bytes::Bytes)> {
        let mut client = self.connect_log(i).await;
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

    /// [`start`](Self::start) with credentials made in the cluster's temp dir.
    pub async fn start_secured(extra: &[&str], security: Security) -> LogCluster {
        let mut c = LogCluster::new_secured(extra, security);
        c.launch().await;
        c
    }

    /// [`new`](Self::new) with credentials made in the cluster's temp dir.
    pub fn new_secured(extra: &[&str], security: Security) -> LogCluster {
        let mut c = LogCluster::new(extra);
        c.creds = Credentials::make(security, &c.dir.path().join("creds"), "dtkv test CA");
        c
    }

    /// A member connection to replica `i` (0-based).
    pub async fn connect_log(&self, i: usize) -> protocol::Client {
        self.creds
            .connect_member(&self.replicas[i].dksp.to_string())
            .await
            .unwrap_or_else(|e| panic!("connecting to replica {}: {e}", i + 1))
    }

    /// A log client over every replica, proving membership with the cluster's credentials.
    pub fn log_client(&self) -> protocol::LogClient {
        protocol::LogClient::new(self.addrs()).with_trust(self.creds.member.clone())
    }

    /// Three replicas with their ports and directories chosen, none started yet; with
    /// `DTKV_TEST_SECURE`'s credentials, if any.
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
            creds: Credentials::from_env(),
        }
    }

    /// Starts every replica of a [`new`](Self::new) cluster and waits for a leader.
    pub async fn launch(&mut self) {
        for i in 0..self.replicas.len() {
            self.spawn(i, i == 0).await;
        }
        self.wait_for_leader().await;
    }

    /// The `--peers` value: `id=raft/advertised-dksp` for every replica.
    pub fn peers(&self) -> String {
        self.replicas
            .iter()
            .map(|r| format!("{}={}/{}", r.id, r.raft, r.advertise))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every replica's DKSP address (the kvstore's `--log`).
    pub fn addrs(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.dksp.to_string()).collect()
    }

    async fn spawn(&mut self, i: usize, init: bool) {
        let r = &self.replicas[i];
        let (dksp, log) = (r.dksp, self.dir.path().join(format!("log-{}.log", r.id)));
        let mut p = self.spawn_unready(i, init, &log);
        wait_ready_with(dksp, &mut p, Duration::from_secs(20), &self.creds).await;
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
        args.extend(self.creds.args());
        args.extend(self.extra.iter().cloned());
        args.extend(r.extra.iter().cloned());
        std::fs::create_dir_all(&r.data_dir).expect("data dir");
        Proc::spawn("logserver", &args, log)
    }

    /// Starts a new, empty replica `id` (not in the membership yet, no `--init`) on free ports,
    /// with this cluster's peers, credentials and extra flags, and waits until it answers; for
    /// tests that `ADD_REPLICA` it. Returns its DKSP and Raft addresses and the process.
    pub async fn spawn_new_replica(&self, id: u64) -> (SocketAddr, SocketAddr, Proc) {
        let (dksp, raft) = (local(free_port()), local(free_port()));
        let dir = self.dir.path().join(format!("log-{id}"));
        std::fs::create_dir_all(&dir).expect("data dir");
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            dksp.to_string(),
            "--raft-listen".into(),
            raft.to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--peers".into(),
            self.peers(),
        ];
        args.extend(self.creds.args());
        args.extend(self.extra.iter().cloned());
        let log = self.dir.path().join(format!("log-{id}.log"));
        let mut p = Proc::spawn("logserver", &args, &log);
        wait_ready_with(dksp, &mut p, Duration::from_secs(20), &self.creds).await;
        (dksp, raft, p)
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

    /// Replica `i`'s `STATUS` as a map; `None` if it does not answer.
    pub async fn status(&self, i: usize) -> Option<std::collections::HashMap<String, String>> {
        status_with(self.replicas[i].dksp, &self.creds).await
    }

    /// The index of the replica that says it is leader, if one does and the live replicas agree.
    pub async fn leader(&self) -> Option<usize> {
        let mut leader = None;
        let mut leader_addr = None;
        for (i, r) in self.replicas.iter().enumerate() {
            if r.proc_.is_none() {
                continue;
            }
            let s = status_with(r.dksp, &self.creds).await?;
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

    /// Waits (up to 20 s) until the live replicas agree on a leader and returns its index; panics
    /// with their log tails otherwise.
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
        let creds = &self.creds;
        wait_until(
            Duration::from_secs(30),
            &format!("replica {} to apply index {last}", i + 1),
            || async move {
                status_with(addr, creds)
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
    /// The three log replicas.
    pub log: LogCluster,
    /// The sequencer.
    pub seq: Sequencer,
    /// The kvstore; `None` while it is stopped.
    pub kv: Option<Proc>,
    /// Where the kvstore listens; kept across restarts.
    pub kv_addr: SocketAddr,
    /// Arguments for every kvstore started.
    pub kv_extra: Vec<String>,
    /// Where the kvstore is told the sequencer and the log replicas are: their own addresses,
    /// unless the links go through proxies.
    pub kv_seq_route: String,
    /// The log replicas' addresses as the kvstore is told them.
    pub kv_log_route: Vec<String>,
    /// An admin user of the kvstore's `--users` file, if it has one: the harness's own
    /// `STATUS` (readiness) logs in with it, and tests can [`System::connect`] as it.
    pub kv_auth: Option<crate::Auth>,
    kv_starts: usize,
}

impl System {
    /// Starts a log cluster, a sequencer and a kvstore with `kv_extra`, and waits until the kvstore
    /// serves.
    pub async fn start(kv_extra: &[&str]) -> System {
        System::start_as(kv_extra, None).await
    }

    /// [`System::start`] for a kvstore with users (`kv_extra` holds its `--users FILE`):
    /// `admin` is a user of that file with the admin right, for the harness's `STATUS`.
    pub async fn start_as(kv_extra: &[&str], admin: Option<crate::Auth>) -> System {
        let log = LogCluster::start(&[]).await;
        let mut s = System::assemble(log, kv_extra).await;
        s.kv_auth = admin;
        s.start_kv().await;
        s
    }

    /// A connection to the kvstore, logged in as [`System::kv_auth`] if that is set.
    pub async fn connect(&self) -> protocol::client::Result<protocol::Client> {
        crate::connect(self.kv_addr, self.kv_auth.as_ref()).await
    }

    /// [`start`](Self::start) with credentials (made in the system's temp dir) on every
    /// process: the sequencer, the three replicas and the kvstore.
    pub async fn start_secured(kv_extra: &[&str], security: Security) -> System {
        let log = LogCluster::start_secured(&[], security).await;
        let mut s = System::assemble(log, kv_extra).await;
        s.start_kv().await;
        s
    }

    /// The credentials every process runs with (the log cluster's).
    pub fn creds(&self) -> &Credentials {
        &self.log.creds
    }

    /// A client of the kvstore (under TLS if on; sends [`kv_auth`](Self::kv_auth) if set).
    pub async fn connect_kv(&self) -> protocol::Client {
        let mut c = self
            .log
            .creds
            .connect_kv(&self.kv_addr.to_string())
            .await
            .expect("connecting to the kvstore");
        if let Some(a) = &self.kv_auth {
            a.login(&mut c).await.expect("AUTH");
        }
        c
    }

    /// A member connection to log replica `i` (0-based).
    pub async fn connect_log(&self, i: usize) -> protocol::Client {
        self.log.connect_log(i).await
    }

    /// A log client over the three replicas, as a member.
    pub fn log_client(&self) -> protocol::LogClient {
        self.log.log_client()
    }

    /// A member connection to the sequencer.
    pub async fn connect_seq(&self) -> protocol::Client {
        self.seq.connect().await
    }

    /// A sequencer next to a running log cluster, with its credentials; the kvstore is not
    /// started yet.
    pub async fn assemble(log: LogCluster, kv_extra: &[&str]) -> System {
        let seq_dir = log.dir.path().join("sequencer");
        std::fs::create_dir_all(&seq_dir).expect("sequencer dir");
        let seq = Sequencer::start_with(&seq_dir, &[], log.creds.clone()).await;
        System {
            kv_seq_route: seq.addr.to_string(),
            kv_log_route: log.addrs(),
            log,
            seq,
            kv: None,
            kv_addr: local(free_port()),
            kv_extra: kv_extra.iter().map(|s| s.to_string()).collect(),
            kv_auth: None,
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
        args.extend(self.log.creds.args());
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
        wait_ready_with(addr, &mut p, Duration::from_secs(20), &self.log.creds).await;
        wait_serving_with(addr, &mut p, &self.log.creds, self.kv_auth.as_ref()).await;
        p
    }

    /// Starts the kvstore on `kv_addr` and waits until it serves.
    pub async fn start_kv(&mut self) {
        let p = self.spawn_kv(self.kv_addr).await;
        self.kv = Some(p);
    }

    /// kill -9 the kvstore, if it runs.
    pub fn kill_kv(&mut self) {
        if let Some(mut p) = self.kv.take() {
            p.kill9();
        }
    }

    /// kill -9 the kvstore and start it again on the same address.
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

/// Waits until a kvstore reports `state=serving` (it replays the log first); dials with
/// `DTKV_TEST_SECURE`'s credentials.
pub async fn wait_serving(addr: SocketAddr, p: &mut Proc) {
    wait_serving_with(addr, p, &Credentials::from_env(), None).await
}

/// [`wait_serving`] for a kvstore with users: asks `STATUS` as `auth` (an admin).
pub async fn wait_serving_as(addr: SocketAddr, p: &mut Proc, auth: Option<&crate::Auth>) {
    wait_serving_with(addr, p, &Credentials::from_env(), auth).await
}

/// [`wait_serving`], dialling with `creds` and logging in as `auth`.
pub async fn wait_serving_with(
    addr: SocketAddr,
    p: &mut Proc,
    creds: &Credentials,
    auth: Option<&crate::Auth>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = crate::status_full(addr, creds, auth).await {
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
