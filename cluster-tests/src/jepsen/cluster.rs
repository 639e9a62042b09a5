//! A whole dtkv system with a [`Proxy`] on every inter-process link.
//!
//! The kvstore is given proxy addresses for the sequencer and for each log replica; the
//! replicas advertise the kvstore-side proxies as their DKSP addresses, so a `REDIRECT` to the
//! new leader also goes through a proxy. Each replica dials each peer through its own proxy
//! (`raft[i][j]`, set with the logserver's `--raft-route` testing hook), so a replica can be
//! cut off from the others in both directions while those two still talk.

use std::time::Duration;

use super::proxy::{Mode, Proxy};
use crate::{wait_serving, LogCluster, System};

/// A whole system with a fault-injecting proxy on every link.
pub struct FaultyCluster {
    /// The processes; their peers are dialled through the proxies.
    pub sys: System,
    /// The kvstore to the sequencer.
    pub kv_seq: Proxy,
    /// `kv_log[i]`: kvstore (and any client following a `REDIRECT`) to replica `i`.
    pub kv_log: Vec<Proxy>,
    /// `raft[i][j]`: replica `i` dialling replica `j` (`None` on the diagonal).
    pub raft: Vec<Vec<Option<Proxy>>>,
}

impl FaultyCluster {
    /// Starts three replicas, the sequencer and a kvstore (checkpointing every
    /// `checkpoint_every` commits, so compaction happens under faults too).
    pub async fn start(checkpoint_every: u64) -> FaultyCluster {
        let mut log = LogCluster::new(&[]);
        let n = log.replicas.len();
        let mut kv_log = Vec::new();
        for r in &log.replicas {
            kv_log.push(Proxy::start(&format!("kv->log{}", r.id), r.dksp).await);
        }
        let mut raft = Vec::new();
        for i in 0..n {
            let mut row = Vec::new();
            for j in 0..n {
                row.push(if i == j {
                    None
                } else {
                    let name = format!("log{}->log{}", i + 1, j + 1);
                    Some(Proxy::start(&name, log.replicas[j].raft).await)
                });
            }
            raft.push(row);
        }
        for (i, r) in log.replicas.iter_mut().enumerate() {
            r.advertise = kv_log[i].addr;
            let routes: Vec<String> = (0..n)
                .filter_map(|j| Some(format!("{}={}", j + 1, raft[i][j].as_ref()?.addr)))
                .collect();
            r.extra = vec!["--raft-route".into(), routes.join(",")];
        }
        log.launch().await;
        let checkpoint = checkpoint_every.to_string();
        let mut sys = System::assemble(
            log,
            &["--checkpoint-every", &checkpoint, "--checkpoint-ratio", "0"],
        )
        .await;
        let kv_seq = Proxy::start("kv->seq", sys.seq.addr).await;
        sys.kv_seq_route = kv_seq.addr.to_string();
        sys.kv_log_route = kv_log.iter().map(|p| p.addr.to_string()).collect();
        sys.start_kv().await;
        FaultyCluster {
            sys,
            kv_seq,
            kv_log,
            raft,
        }
    }

    /// Every proxy of the system.
    pub fn proxies(&self) -> impl Iterator<Item = &Proxy> {
        std::iter::once(&self.kv_seq)
            .chain(self.kv_log.iter())
            .chain(self.raft.iter().flatten().flatten())
    }

    /// Every link back to a plain pipe.
    pub fn heal_network(&self) {
        for p in self.proxies() {
            p.heal();
        }
    }

    /// Cuts replica `i` off from both other replicas, both ways. Its link to the kvstore stays.
    pub fn isolate(&self, i: usize, mode: Mode) {
        for j in 0..self.raft.len() {
            for p in [&self.raft[i][j], &self.raft[j][i]].into_iter().flatten() {
                p.set_mode(mode);
            }
        }
    }

    /// The 0-based index of the replica that leads, once the live replicas agree on one.
    pub async fn leader(&self) -> usize {
        self.sys.log.wait_for_leader().await
    }

    /// Waits until a replica other than `old` leads and the other live non-isolated replica
    /// agrees. (`LogCluster::leader` needs all live replicas to agree, which an isolated old
    /// leader does not while it is cut off.)
    pub async fn wait_new_leader(&self, old: usize) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.leader_among(old).await {
                return l;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the majority did not elect a new leader within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn leader_among(&self, old: usize) -> Option<usize> {
        let mut leader = None;
        let mut agreed: Option<String> = None;
        for i in (0..self.sys.log.replicas.len()).filter(|&i| i != old) {
            let s = self.sys.log.status(i).await?;
            if s.get("role").map(String::as_str) == Some("leader") {
                leader = Some(i);
            }
            let l = s.get("leader")?;
            if l == "none" || agreed.get_or_insert_with(|| l.clone()) != l {
                return None;
            }
        }
        leader
    }

    /// kill -9 every process, then start them all again (replicas, sequencer, kvstore) and
    /// wait until the kvstore serves.
    pub async fn restart_all(&mut self) {
        self.kill_all();
        self.start_all().await;
    }

    /// kill -9 every process.
    pub fn kill_all(&mut self) {
        self.sys.kill_kv();
        for i in 0..self.sys.log.replicas.len() {
            self.sys.log.kill9(i);
        }
        self.sys.seq.proc_.kill9();
    }

    /// Starts every process after [`kill_all`](Self::kill_all).
    pub async fn start_all(&mut self) {
        for i in 0..self.sys.log.replicas.len() {
            self.sys.log.restart(i).await;
        }
        self.sys.seq.crash_and_restart().await;
        self.sys.start_kv().await;
    }

    /// Starts the kvstore if it is down, and waits until it serves.
    pub async fn ensure_kv(&mut self) {
        match self.sys.kv.as_mut() {
            Some(p) => wait_serving(self.sys.kv_addr, p).await,
            None => self.sys.start_kv().await,
        }
    }
}
