//! The Raft network under what a real deployment sends: log entries near the largest the
//! kvstore produces (a 1 MiB transaction fully quoted is ~5-6 MiB), a leader killed while they
//! replicate, a wiped replica catching up while they arrive, and a hostile frame header on the
//! Raft port. Default Raft timing throughout (50 ms heartbeat, 250-450 ms elections): the
//! point is that these hold with the flags an operator gets.

use bytes::Bytes;
use cluster_tests::{wait_until, LogCluster};
use protocol::LogClient;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The logserver `--max-line` that lets one `APPEND` carry any transaction the kvstore accepts.
const MAX_LINE: &str = "8388608";

/// Payload of writer `w`'s append `seq`: `len` bytes that say whose they are.
fn payload(w: u64, seq: u64, len: usize) -> Vec<u8> {
    let tag = format!("w{w}-s{seq}:");
    let mut p = tag.into_bytes();
    p.resize(len, b'a' + (seq % 26) as u8);
    p
}

type Acked = Arc<Mutex<BTreeMap<(u64, u64), u64>>>;

/// `writers` concurrent writers appending `len`-byte payloads until `stop`; returns their
/// handles. Each acknowledged append goes into `acked` as (writer, seq) -> index.
fn start_writers(
    c: &LogCluster,
    writers: u64,
    len: usize,
    acked: &Acked,
    total: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let (addrs, acked, total, stop) =
                (c.addrs(), acked.clone(), total.clone(), stop.clone());
            tokio::spawn(async move {
                let mut log = LogClient::new(addrs);
                log.deadline = Duration::from_secs(30);
                log.attempt_timeout = Duration::from_secs(10);
                let mut seq = 0;
                while !stop.load(Ordering::SeqCst) {
                    seq += 1;
                    let idx = log
                        .append(format!("w{w}").as_bytes(), seq, &payload(w, seq, len))
                        .await
                        .unwrap_or_else(|e| panic!("writer {w} seq {seq}: {e}"));
                    acked.lock().unwrap().insert((w, seq), idx);
                    total.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect()
}

/// Waits for `at_least` acknowledged appends: 60 s, plus a second for each, for soak sizes.
async fn wait_total(total: &Arc<AtomicU64>, at_least: u64, what: &str) {
    let t = total.clone();
    let timeout = Duration::from_secs(60u64.saturating_add(at_least));
    wait_until(timeout, what, || {
        let t = t.clone();
        async move { t.load(Ordering::SeqCst) >= at_least }
    })
    .await;
}

/// Every acknowledged append is on replica `i`, exactly once, at its index, intact.
async fn check_replica(c: &LogCluster, i: usize, acked: &BTreeMap<(u64, u64), u64>, len: usize) {
    let last = *acked.values().max().expect("some appends");
    c.wait_applied(i, last).await;
    let entries: BTreeMap<u64, Bytes> = c.read_all(i).await.into_iter().collect();
    for ((w, seq), idx) in acked {
        let got = entries.get(idx);
        assert!(
            got.is_some_and(|p| p[..] == payload(*w, *seq, len)[..]),
            "replica {}: acknowledged append w{w} s{seq} missing or wrong at {idx}",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_size_appends_replicate_through_a_leader_kill_with_default_timing() {
    const LEN: usize = 5 * 1024 * 1024;
    // Appends before and after the kill; the soak runs 250 + 250 (`RAFT_LARGE_PER_PHASE`).
    let per_phase: u64 = std::env::var("RAFT_LARGE_PER_PHASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let mut c = LogCluster::start(&["--any-payload", "--max-line", MAX_LINE]).await;
    let acked: Acked = Arc::default();
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&c, 3, LEN, &acked, &total, &stop);
    wait_total(&total, per_phase, "acknowledged 5 MiB appends").await;

    let old_leader = c.wait_for_leader().await;
    let term_before: u64 = c.status(old_leader).await.expect("status")["term"]
        .parse()
        .expect("term");
    c.kill9(old_leader);
    let killed_at = std::time::Instant::now();
    let at_kill = total.load(Ordering::SeqCst);
    let new_leader = c.wait_for_leader().await;
    let elected = killed_at.elapsed();
    // Appends in flight at the kill may still be acknowledged by the old leader; more than
    // the writers can have outstanding proves the new leader commits.
    wait_total(
        &total,
        at_kill + 4,
        "appends to continue after the leader kill",
    )
    .await;
    let resumed = killed_at.elapsed();
    wait_total(
        &total,
        at_kill + per_phase,
        "more appends after the leader kill",
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer panicked");
    }

    // A storm shows as terms climbing by dozens (past 41 within seconds in #18); one failover
    // takes one election, or a few on a host this test shares with others.
    let term_after: u64 = c.status(new_leader).await.expect("status")["term"]
        .parse()
        .expect("term");
    if term_after > term_before + 10 || std::env::var_os("DUMP").is_some() {
        dump_logs(&c);
    }
    assert!(
        term_after <= term_before + 10,
        "term went from {term_before} to {term_after}: repeated elections"
    );
    let acked = acked.lock().unwrap().clone();
    for i in (0..3).filter(|&i| i != old_leader) {
        check_replica(&c, i, &acked, LEN).await;
    }
    // The killed leader comes back and catches up with everything.
    c.restart(old_leader).await;
    check_replica(&c, old_leader, &acked, LEN).await;
    println!(
        "{} acknowledged 5 MiB appends checked; term {term_before} -> {term_after}; \
         new leader {elected:?} after the kill, 4 more appends acknowledged by {resumed:?}",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_catches_up_by_snapshot_while_large_appends_run() {
    // The snapshot holds every entry since the last checkpoint (none here), so it grows by
    // this much per entry; 256 KiB keeps it to tens of MB, many chunks.
    const LEN: usize = 256 * 1024;
    // Snapshots every 20 entries and 5 kept after one: a replica that missed 40 entries must
    // take a snapshot while the leader keeps appending.
    let mut c = LogCluster::start(&[
        "--any-payload",
        "--max-line",
        MAX_LINE,
        "--snapshot-every",
        "20",
        "--keep-after-snapshot",
        "5",
        "--snapshot-chunk-bytes",
        "524288",
    ])
    .await;
    let acked: Acked = Arc::default();
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&c, 2, LEN, &acked, &total, &stop);
    wait_total(&total, 10, "10 acknowledged appends").await;

    let leader = c.wait_for_leader().await;
    let victim = (leader + 1) % 3;
    c.kill9(victim);
    c.wipe(victim);
    let now = total.load(Ordering::SeqCst);
    wait_total(&total, now + 40, "40 more appends with the replica down").await;
    // Only a snapshot can bring the replica back once every replica that could lead has
    // purged entries it missed.
    for i in (0..3).filter(|&i| i != victim) {
        let addr = c.replicas[i].dksp;
        wait_until(
            Duration::from_secs(60),
            "the live replicas to purge their Raft logs",
            || async move {
                cluster_tests::status(addr)
                    .await
                    .and_then(|s| s.get("purged")?.parse::<u64>().ok())
                    .is_some()
            },
        )
        .await;
    }

    c.restart(victim).await;
    let restarted = std::time::Instant::now();
    // Caught up while the writers run: its applied Raft index reaches what the leader had
    // applied once it was back.
    let target: u64 = c.status(leader).await.expect("status")["raft_applied"]
        .parse()
        .expect("raft_applied");
    let addr = c.replicas[victim].dksp;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let applied = cluster_tests::status(addr)
            .await
            .and_then(|s| s.get("raft_applied")?.parse::<u64>().ok());
        if applied.is_some_and(|a| a >= target) {
            break;
        }
        if std::time::Instant::now() > deadline {
            dump_logs(&c);
            panic!("the wiped replica did not catch up to {target} under load: at {applied:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "the wiped replica applied Raft index {target} {:?} after its restart",
        restarted.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        if w.await.is_err() {
            dump_logs(&c);
            panic!("a writer failed");
        }
    }
    let acked = acked.lock().unwrap().clone();
    check_replica(&c, victim, &acked, LEN).await;
}

/// The end of every running replica's log, for a failure message.
fn dump_logs(c: &LogCluster) {
    for r in &c.replicas {
        if let Some(p) = &r.proc_ {
            eprintln!(
                "--- replica {} ---\n{}",
                r.id,
                p.log_tail(
                    std::env::var("DUMP")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(60)
                )
            );
        }
    }
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_frame_header_over_the_cap_closes_the_connection_unread() {
    let c = LogCluster::start(&["--any-payload"]).await;
    let pid = c.replicas[1]
        .proc_
        .as_ref()
        .and_then(|p| p.pid())
        .expect("pid");
    let before = rss(pid);
    let mut s = tokio::net::TcpStream::connect(c.replicas[1].raft)
        .await
        .expect("connect");
    // The codec's header: a 4-byte big-endian length, here 500 MiB, then data.
    s.write_all(&(500u32 * 1024 * 1024).to_be_bytes())
        .await
        .expect("header");
    let junk = vec![0x5au8; 1024 * 1024];
    let mut sent = 0usize;
    for _ in 0..256 {
        if s.write_all(&junk).await.is_err() {
            break;
        }
        sent += junk.len();
    }
    // Closed by the replica: reads end (EOF or reset) rather than block.
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the replica must close the connection");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert!(
        sent < 256 * junk.len(),
        "all 256 MiB were accepted: the connection was not closed at the header"
    );
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 64 * 1024 * 1024,
        "RSS grew by {grown} bytes for a refused frame"
    );
    // The replica still serves, Raft included.
    let mut log = LogClient::new(c.addrs());
    let idx = log
        .append(b"after", 1, b"still fine")
        .await
        .expect("append");
    for i in 0..3 {
        c.wait_applied(i, idx).await;
    }
}
