//! Jepsen-style runs against the real binaries: one short run per nemesis (two rounds of the
//! fault), each checked for snapshot-isolation anomalies, real-time order and durability by our
//! checker and by adya. Plus a live write skew that adya must call non-serializable, and the
//! long randomized `make torture` run (ignored unless asked for).

use cluster_tests::jepsen::history::{History, Mop, Outcome, Txn};
use cluster_tests::jepsen::nemesis::{self, Nemesis};
use cluster_tests::jepsen::proxy::Mode;
use cluster_tests::jepsen::{checker, elle, run, Config};
use protocol::{Client, CommitOutcome};
use rand::Rng;
use std::time::{Duration, Instant};

/// Two rounds of `n`, held 3 s each; asserts the run is valid and that the nemesis reported
/// what it did (`expect` appears in the history's events).
async fn short_run(n: Nemesis, expect: &str) {
    let seed: u64 = rand::thread_rng().gen();
    println!("{n}: seed {seed}");
    let schedule = nemesis::fixed(n, 2, Duration::from_secs(3), Duration::from_secs(1));
    let mut cfg = Config::new(seed, schedule);
    cfg.out_dir = Some(out_dir(&n.to_string().replace(' ', "_")));
    let r = run(cfg).await;
    let summary = r.summary();
    println!("{summary}");
    assert!(r.valid(), "{n}: anomalies found (seed {seed}):\n{summary}");
    assert!(
        r.report.events.iter().any(|e| e.contains(expect)),
        "{n}: no event mentions {expect:?}:\n{summary}"
    );
    assert!(r.report.ok > 0 && r.history.txns.iter().any(|t| t.is_final));
    checkers_catch_a_doctored_history(r.history);
}

/// Proof that the checkers are exercised by this very history: claim one committed append
/// that the final read shows was aborted instead; both checkers must call that an aborted read.
fn checkers_catch_a_doctored_history(mut h: History) {
    let victim = h
        .txns
        .iter()
        .position(|t| {
            t.outcome == Outcome::Ok && t.mops.iter().any(|m| matches!(m, Mop::Append { .. }))
        })
        .expect("some transaction appended");
    h.txns[victim].outcome = Outcome::Fail;
    h.txns[victim].note = "doctored".into();
    let found = checker::check(&h);
    assert!(
        found
            .iter()
            .any(|a| a.kind == "G1a" && a.txns.contains(&victim)),
        "T{victim} doctored to aborted, yet no G1a: {found:#?}"
    );
    let v = elle::list_append(&h, elle::PROMISED);
    assert_eq!(v.valid, adya::Valid::False, "{}", v.line());
}

/// `target/jepsen/<name>`: the last run's history and report, for a failure's post-mortem.
fn out_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/jepsen")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_kill_kvstore() {
    short_run(Nemesis::KillKvstore, "restarted the kvstore").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_kill_sequencer() {
    short_run(Nemesis::KillSequencer, "restarted the sequencer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_kill_log_leader() {
    short_run(Nemesis::KillLeader, "(leader)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_kill_log_follower() {
    short_run(Nemesis::KillFollower, "(follower)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_partition_leader_blackhole() {
    short_run(Nemesis::PartitionLeader(Mode::Blackhole), "was elected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_partition_leader_refuse() {
    short_run(Nemesis::PartitionLeader(Mode::Refuse), "was elected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_slow_links() {
    short_run(Nemesis::SlowLinks(20), "slowed links").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_restart_everything() {
    short_run(Nemesis::RestartAll, "restarted every process").await;
}

/// Runs `BEGIN; GET x; GET y; PUT <mine>` on a connection, leaving the COMMIT to the caller.
async fn skew_half(c: &mut Client, mine: u64, elem: u64) -> (u64, Vec<Mop>) {
    let start = c.begin().await.unwrap();
    let mut mops = Vec::new();
    for k in [0, 1] {
        let v = c
            .get(cluster_tests::jepsen::append::key_name(k))
            .await
            .unwrap();
        assert!(v.is_none(), "fresh system");
        mops.push(Mop::Read {
            key: k,
            value: Some(vec![]),
        });
    }
    c.put(
        cluster_tests::jepsen::append::key_name(mine),
        elem.to_string(),
    )
    .await
    .unwrap();
    mops.push(Mop::Append { key: mine, elem });
    (start, mops)
}

/// A write skew produced by dtkv itself, recorded as a history: both checkers accept it as
/// snapshot isolation, and adya flags it (G2-item) when asked for serializability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adya_flags_a_real_write_skew_under_serializability() {
    let sys = cluster_tests::System::start(&[]).await;
    let t0 = Instant::now();
    let ns = || t0.elapsed().as_nanos() as u64;
    let (mut c1, mut c2) = (sys.connect_kv().await, sys.connect_kv().await);
    let invoked = ns();
    let (s1, m1) = skew_half(&mut c1, 0, 1).await;
    let (s2, m2) = skew_half(&mut c2, 1, 2).await;
    let mut txns = Vec::new();
    for (p, c, start, mops) in [(0, &mut c1, s1, m1), (1, &mut c2, s2, m2)] {
        let CommitOutcome::Committed(ts) = c.commit().await.unwrap() else {
            panic!("snapshot isolation lets both halves of a write skew commit");
        };
        let mut t = Txn::new(p, mops, Outcome::Ok, invoked, ns());
        t.start_ts = Some(start);
        t.commit_ts = Some(ts);
        txns.push(t);
    }
    let invoked = ns();
    let mut final_mops = Vec::new();
    for k in [0, 1] {
        let v = c1
            .get(cluster_tests::jepsen::append::key_name(k))
            .await
            .unwrap()
            .expect("both writes committed");
        final_mops.push(Mop::Read {
            key: k,
            value: Some(cluster_tests::jepsen::append::parse_list(&v).unwrap()),
        });
    }
    txns.push(Txn::new(2, final_mops, Outcome::Ok, invoked, ns()));
    let h = History::from_txns(txns);

    assert!(checker::check(&h).is_empty(), "{:#?}", checker::check(&h));
    for v in elle::promised(&h) {
        assert_eq!(v.valid, adya::Valid::True, "{}", v.line());
    }
    let v = elle::list_append(&h, "serializable");
    assert_eq!(v.valid, adya::Valid::False, "{}", v.line());
    assert_eq!(v.anomaly_types, ["G2-item"], "{}", v.line());
    println!("{}\n{}", v.line(), v.explanations.join("\n"));
}

/// `make torture SECONDS=600 SEED=n`: a long random schedule of every nemesis. The seed is
/// printed and reproduces the schedule; the history and report are kept under
/// `target/jepsen/<seed>/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long; run with make torture"]
async fn torture() {
    let secs: u64 = std::env::var("TORTURE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let seed: u64 = std::env::var("TORTURE_SEED")
        .ok()
        .filter(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let schedule = nemesis::random(seed, Duration::from_secs(secs));
    println!(
        "torture: seed {seed} ({secs} s); reproduce with: make torture SECONDS={secs} SEED={seed}"
    );
    for (i, s) in schedule.iter().enumerate() {
        println!("  {:3}. {s}", i + 1);
    }
    let dir = out_dir(&seed.to_string());
    let mut cfg = Config::new(seed, schedule);
    cfg.out_dir = Some(dir.clone());
    let r = run(cfg).await;
    let summary = r.summary();
    println!("{summary}");
    println!("history and report in {}", dir.display());
    assert!(r.valid(), "torture seed {seed} found anomalies:\n{summary}");
}
