//! Jepsen-style verification: run random transactions against a whole dtkv system while a
//! nemesis breaks things, record everything the clients saw, and check the history.
//!
//! The pieces, each in its own module:
//!
//! - [`proxy`]: a controllable TCP proxy; [`cluster`]: a system with one on every link.
//! - [`nemesis`]: the faults (kill -9 and restart of any process, partitioning the log leader,
//!   slow links, restarting everything) and seeded schedules of them.
//! - [`append`]: the list-append workload; [`history`]: what it records.
//! - [`checker`]: our snapshot-isolation checker; [`elle`]: the same history through the
//!   `adya` crate (Elle's checker) as a second opinion.
//!
//! A [`run`] starts a system, starts the clients, plays the schedule (after each heal it
//! waits until transactions commit again, so a fault that leaves the system stuck fails the
//! run), stops the clients, kills and restarts every process, reads every key in one final
//! transaction, and checks the whole history. The final read is what durability is checked
//! against: every transaction acknowledged `COMMITTED` must be in it.

pub mod append;
pub mod checker;
pub mod cluster;
pub mod elle;
pub mod history;
pub mod nemesis;
pub mod proxy;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use self::append::Shared;
use self::checker::Report;
use self::cluster::FaultyCluster;
use self::history::History;
use self::nemesis::Step;

/// One Jepsen-style run: clients, schedule and checkpoint settings.
pub struct Config {
    /// Concurrent list-append clients.
    pub clients: u64,
    /// Seeds the clients' transactions (the schedule has its own seeds).
    pub seed: u64,
    /// The faults to inject, in order.
    pub schedule: Vec<Step>,
    /// The kvstore's `--checkpoint-every`: small, so checkpoints and log compaction happen
    /// under faults too.
    pub checkpoint_every: u64,
    /// Commits required after each heal before the schedule goes on.
    pub progress: usize,
    /// Where to write `history.jsonl` (Elle format), `history.txt` and `report.txt`.
    pub out_dir: Option<PathBuf>,
}

impl Config {
    /// A run of `schedule` with the default settings: 6 clients, a checkpoint every 300
    /// commits, 20 commits of progress after each heal.
    pub fn new(seed: u64, schedule: Vec<Step>) -> Config {
        Config {
            clients: 6,
            seed,
            schedule,
            checkpoint_every: 300,
            progress: 20,
            out_dir: None,
        }
    }
}

/// What a run produced: its history and both checkers' conclusions.
pub struct RunResult {
    /// Every transaction and nemesis event.
    pub history: History,
    /// What the checkers concluded.
    pub report: Report,
    /// Properties the nemeses check themselves, e.g. the isolated leader acknowledged nothing.
    pub nemesis_failures: Vec<String>,
}

impl RunResult {
    /// The report, the nemesis failures, and whether all is well.
    pub fn summary(&self) -> String {
        let mut s = self.report.render(&self.history);
        for f in &self.nemesis_failures {
            s.push_str(&format!("nemesis check FAILED: {f}\n"));
        }
        s
    }

    /// Whether the checkers and the nemeses' own checks all passed.
    pub fn valid(&self) -> bool {
        self.report.valid() && self.nemesis_failures.is_empty()
    }
}

async fn wait_commits(shared: &Shared, n: usize, what: &str) {
    let target = shared.committed() + n;
    crate::wait_until(Duration::from_secs(60), what, || async {
        shared.committed() >= target
    })
    .await;
}

/// Runs a schedule against a fresh system and checks the history.
pub async fn run(cfg: Config) -> RunResult {
    let mut fc = FaultyCluster::start(cfg.checkpoint_every).await;
    let shared = Shared::new(fc.sys.kv_addr, cfg.clients);
    let clients: Vec<_> = (0..cfg.clients)
        .map(|c| {
            tokio::spawn(append::client(
                shared.clone(),
                c,
                cfg.seed.wrapping_mul(31).wrapping_add(c),
            ))
        })
        .collect();
    wait_commits(&shared, cfg.progress, "the first commits").await;
    let mut nemesis_failures = Vec::new();
    for (i, step) in cfg.schedule.iter().enumerate() {
        println!("step {}/{}: {step}", i + 1, cfg.schedule.len());
        let (active, what) = nemesis::inject(&mut fc, step).await;
        shared.event(what);
        let before = shared.committed();
        tokio::time::sleep(step.hold).await; // the schedule, not synchronisation
        let during = shared.committed() - before;
        match nemesis::heal(&mut fc, active).await {
            Ok(what) => shared.event(format!("{what} ({during} commits during the fault)")),
            Err(e) => {
                shared.event(format!("FAILED: {e}"));
                nemesis_failures.push(e);
            }
        }
        fc.ensure_kv().await;
        wait_commits(
            &shared,
            cfg.progress,
            &format!("commits after healing step {} ({step})", i + 1),
        )
        .await;
        tokio::time::sleep(step.quiet).await;
    }
    shared.stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("a client panicked");
    }
    fc.heal_network();
    fc.restart_all().await;
    shared.event("final: killed and restarted every process");
    if let Err(e) = append::final_read(&shared).await {
        nemesis_failures.push(e);
    }
    let history = std::mem::take(&mut *shared.history.lock().unwrap());
    drop(fc);
    finish(history, nemesis_failures, cfg.out_dir)
}

/// Checks a finished history with both checkers and writes the files.
pub fn finish(
    history: History,
    nemesis_failures: Vec<String>,
    out_dir: Option<PathBuf>,
) -> RunResult {
    let anomalies = checker::check(&history);
    let mut report = Report::new(&history, anomalies);
    for v in elle::promised(&history) {
        report.adya.push(v.line());
        if v.valid == adya::Valid::False {
            report.adya_failed = true;
            report.adya.extend(v.explanations.iter().take(3).cloned());
        }
    }
    let result = RunResult {
        history,
        report,
        nemesis_failures,
    };
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(&dir).expect("report directory");
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).expect("writing the report files");
        };
        write("history.jsonl", result.history.to_elle_json());
        write("history.txt", result.history.dump());
        write("report.txt", result.summary());
    }
    result
}
