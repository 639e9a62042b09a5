//! The kvstore as a process, against a real log cluster and sequencer: the MVCC scripts, crash
//! recovery under load, logserver failover, fencing, checkpoints, timeouts.

use bytes::Bytes;
use cluster_tests::workload::{check_history, workload, History};
use cluster_tests::{wait_until, System};
use protocol::{Client, CommitOutcome, Response};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn render(cmd: &str, r: &Response) -> String {
    let verb = cmd
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    match r {
        Response::Ok(args) if verb == "BEGIN" && args.len() == 1 => "OK <ts>".into(),
        Response::Committed(_) => "COMMITTED <ts>".into(),
        r => String::from_utf8_lossy(&r.to_line()).into_owned(),
    }
}

#[test]
fn mvcc_scripts() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sys = rt.block_on(System::start(&[]));
    let mut clients: HashMap<String, Client> = HashMap::new();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/mvcc.txt");
    golden::check_script(&path, |input| {
        let (name, cmd) = input.split_once(": ").expect("'> name: COMMAND'");
        rt.block_on(async {
            if !clients.contains_key(name) {
                clients.insert(
                    name.to_string(),
                    Client::connect(sys.kv_addr).await.unwrap(),
                );
            }
            let c = clients.get_mut(name).unwrap();
            c.send(cmd.as_bytes());
            let mut out = Vec::new();
            loop {
                let r = c.recv().await.unwrap();
                out.push(render(cmd, &r));
                if !matches!(r, Response::Kv(..)) {
                    break;
                }
            }
            out.join("\n")
        })
    });
    drop(clients);
    drop(sys);
}

async fn run_load_with(
    sys: &mut System,
    clients: u64,
    fault: impl AsyncFnOnce(&mut System),
) -> History {
    let hist = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let seed: u64 = rand::thread_rng().gen();
    println!("seed {seed}");
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            tokio::spawn(workload(
                sys.kv_addr,
                String::new(),
                c,
                hist.clone(),
                stop.clone(),
                seed ^ c,
            ))
        })
        .collect();
    let committed = |h: &Arc<Mutex<History>>| {
        h.lock()
            .unwrap()
            .outcomes
            .values()
            .filter(|o| **o == Some(true))
            .count()
    };
    let h = hist.clone();
    wait_until(
        Duration::from_secs(30),
        "200 commits before the fault",
        || {
            let h = h.clone();
            async move { committed(&h) >= 200 }
        },
    )
    .await;
    fault(sys).await;
    let before = committed(&hist);
    let h = hist.clone();
    wait_until(
        Duration::from_secs(60),
        "200 more commits after the fault",
        || {
            let h = h.clone();
            async move { committed(&h) >= before + 200 }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("workload panicked");
    }
    let taken = std::mem::take(&mut *hist.lock().unwrap());
    taken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_kvstore_under_load_keeps_every_commit() {
    let mut sys = System::start(&[]).await;
    let hist = run_load_with(&mut sys, 8, async |s: &mut System| {
        s.kill_kv();
        s.start_kv().await;
    })
    .await;
    println!("{}", hist.summary());
    check_history(sys.kv_addr, "", &hist, 8).await.unwrap();
    // And once more from a cold start: everything comes back from the log alone.
    sys.restart_kv().await;
    check_history(sys.kv_addr, "", &hist, 8).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logserver_leader_failover_under_load_keeps_every_commit() {
    let mut sys = System::start(&[]).await;
    let hist = run_load_with(&mut sys, 8, async |s: &mut System| {
        let l = s.log.wait_for_leader().await;
        s.log.kill9(l);
        s.log.wait_for_leader().await;
        s.log.restart(l).await;
    })
    .await;
    check_history(sys.kv_addr, "", &hist, 8).await.unwrap();
    sys.restart_kv().await;
    check_history(sys.kv_addr, "", &hist, 8).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_kvstore_fences_the_first() {
    fencing(true).await;
}

/// Without the TAIL follower, the commit path alone must still fence: the old kvstore's next
/// append comes back at an unexpected index and the gap holds the newer EPOCH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_kvstore_fences_the_first_at_its_next_commit() {
    fencing(false).await;
}

/// Starts one more kvstore on the same log (a takeover) and connects to it; the process lives
/// as long as the returned `Proc`.
async fn another_kvstore(sys: &mut System) -> (cluster_tests::Proc, Client) {
    let addr = cluster_tests::local(cluster_tests::free_port());
    let p = sys.spawn_kv(addr).await;
    (p, Client::connect(addr).await.unwrap())
}

/// Waits until a checkpoint has compacted the log (on replica 1) so that it starts after `index`.
async fn wait_compacted_beyond(sys: &System, index: u64) {
    let addr = sys.log.replicas[0].dksp;
    let what = format!("a checkpoint to compact the log beyond {index}");
    wait_until(Duration::from_secs(30), &what, || async move {
        cluster_tests::status(addr)
            .await
            .and_then(|s| s.get("first")?.parse::<u64>().ok())
            .is_some_and(|first| first > index)
    })
    .await;
}

/// A replaced kvstore whose next commit lands after the newer one has checkpointed past it
/// cannot read the gap (compacted). It must not acknowledge that commit: every replay skips
/// it, as it came after the takeover. (It once logged the failed read and answered OK.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_kvstore_that_cannot_read_the_gap_acknowledges_nothing() {
    let mut sys = System::start(&["--no-tail", "--checkpoint-every", "20"]).await;
    let mut old = Client::connect(sys.kv_addr).await.unwrap();
    old.put("before", "old").await.unwrap();
    let old_applied: u64 = cluster_tests::status(sys.kv_addr).await.unwrap()["applied"]
        .parse()
        .unwrap();
    let (_second, mut new) = another_kvstore(&mut sys).await;
    for i in 0..100 {
        new.put(format!("k{i}"), "new").await.unwrap();
    }
    // The new kvstore's checkpoint compacts the log past the old one's applied index.
    wait_compacted_beyond(&sys, old_applied + 1).await;
    match old.call(b"PUT stale value").await.unwrap() {
        Response::Err(e) => assert_eq!(e.code, protocol::ErrorCode::Fenced, "{e}"),
        r => panic!("replaced kvstore answered {r:?}"),
    }
    let st = cluster_tests::status(sys.kv_addr).await.unwrap();
    assert_eq!(
        st.get("fenced_by").map(String::as_str),
        Some("unknown"),
        "{st:?}"
    );
    assert_eq!(new.get("stale").await.unwrap(), None);
    let (_third, mut third) = another_kvstore(&mut sys).await;
    assert_eq!(third.get("stale").await.unwrap(), None);
    assert_eq!(third.get("k99").await.unwrap(), Some(Bytes::from("new")));
}

async fn fencing(tail: bool) {
    let mut sys = System::start(if tail { &[] } else { &["--no-tail"] }).await;
    let mut old = Client::connect(sys.kv_addr).await.unwrap();
    old.put("before", "old").await.unwrap();
    let (_second, mut new) = another_kvstore(&mut sys).await;
    assert_eq!(new.get("before").await.unwrap(), Some(Bytes::from("old")));
    new.put("after", "new").await.unwrap();
    let old_addr = sys.kv_addr;
    let fenced_read = || async {
        let mut c = Client::connect(old_addr).await.unwrap();
        matches!(c.call(b"GET before").await.unwrap(),
            Response::Err(e) if e.code == protocol::ErrorCode::Fenced)
    };
    if tail {
        // The TAIL follower sees the newer EPOCH and stops reads too, with no commit on the old
        // kvstore to find it.
        wait_until(
            Duration::from_secs(10),
            "the old kvstore to fence",
            fenced_read,
        )
        .await;
        let st = cluster_tests::status(old_addr).await.unwrap();
        assert_eq!(
            st.get("state").map(String::as_str),
            Some("fenced"),
            "{st:?}"
        );
    } else {
        // Without it the old kvstore still serves (stale) reads until it tries to commit.
        assert!(
            !fenced_read().await,
            "fenced before any commit without TAIL"
        );
    }
    match old.call(b"PUT stale value").await.unwrap() {
        Response::Err(e) => assert_eq!(e.code, protocol::ErrorCode::Fenced, "{e}"),
        r => panic!("fenced kvstore answered {r:?}"),
    }
    assert!(fenced_read().await, "reads after the fence");
    assert_eq!(new.get("stale").await.unwrap(), None);
    // A fresh start replays the same decision.
    let (_third, mut third) = another_kvstore(&mut sys).await;
    assert_eq!(third.get("stale").await.unwrap(), None);
    assert_eq!(third.get("after").await.unwrap(), Some(Bytes::from("new")));
}

/// The committer gives up on a log replica that leaves an append unanswered for 1 s. A commit
/// after a longer quiet spell must not count the quiet as waiting (it once did, and every such
/// commit went to another replica and back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_after_a_quiet_spell_is_not_taken_for_a_dead_leader() {
    let sys = System::start(&[]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    c.put("a", "1").await.unwrap();
    // The quiet spell is what is tested: longer than the committer's 1 s append timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.put("b", "2").await.unwrap();
    let log = std::fs::read_to_string(sys.log.dir.path().join("kvstore-1.log")).unwrap();
    assert!(
        !log.contains("no answer from log replica"),
        "the committer gave up on a healthy leader:\n{log}"
    );
}

/// A few commits of large values trigger a checkpoint by bytes long before the commit count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_written_after_enough_bytes() {
    let sys = System::start(&["--checkpoint-every", "1000000", "--checkpoint-mib", "1"]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    let value = "x".repeat(100_000);
    // 8 x 100 KB: under 1 MiB, so no checkpoint yet.
    for i in 0..8 {
        c.put(format!("big{i}"), value.clone()).await.unwrap();
    }
    let addr = sys.log.replicas[0].dksp;
    let mut log = Client::connect(addr).await.unwrap();
    assert!(
        matches!(log.call(b"CKPT_INFO").await.unwrap(), Response::Err(_)),
        "checkpoint before 1 MiB"
    );
    for i in 8..16 {
        c.put(format!("big{i}"), value.clone()).await.unwrap();
    }
    wait_until(
        Duration::from_secs(30),
        "a checkpoint by bytes",
        || async move {
            let mut log = Client::connect(addr).await.unwrap();
            matches!(log.call(b"CKPT_INFO").await.unwrap(), Response::Ok(_))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_compact_the_log_and_recovery_uses_them() {
    // Ratio 0: a checkpoint every 50 commits even though the first one (the big values) is
    // far larger than the log that follows it.
    let mut sys = System::start(&["--checkpoint-every", "50", "--checkpoint-ratio", "0"]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    // Big binary values first, so every later checkpoint spans many chunks (uploaded and
    // fetched pipelined) and exercises the quoting of every byte value.
    let big = |i: usize| -> Bytes { (0..65_536).map(|j| ((i * 7 + j) % 256) as u8).collect() };
    for i in 0..40 {
        c.put(format!("big{i:02}"), big(i)).await.unwrap();
    }
    for i in 0..300 {
        c.put(format!("key{i:04}"), format!("value{i}"))
            .await
            .unwrap();
    }
    c.del("key0007").await.unwrap();
    wait_compacted_beyond(&sys, 100).await;
    sys.restart_kv().await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    let rows = c.scan("key", "key~", None).await.unwrap();
    assert_eq!(rows.len(), 299);
    assert_eq!(
        c.get("key0299").await.unwrap(),
        Some(Bytes::from("value299"))
    );
    assert_eq!(c.get("key0007").await.unwrap(), None);
    for i in 0..40 {
        assert_eq!(c.get(format!("big{i:02}")).await.unwrap(), Some(big(i)));
    }
    let log = std::fs::read_to_string(sys.log.dir.path().join("kvstore-2.log")).unwrap();
    assert!(
        log.contains("loaded checkpoint"),
        "recovery did not use the checkpoint:\n{log}"
    );
    let fetched: u64 = log
        .lines()
        .filter_map(|l| l.split_once("fetched checkpoint ")?.1.split_once(": "))
        .find_map(|(_, rest)| rest.strip_suffix(" bytes")?.parse().ok())
        .unwrap_or(0);
    assert!(
        fetched > 2_000_000,
        "expected a multi-chunk checkpoint, fetched {fetched} bytes:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transactions_time_out_and_oversized_lines_are_refused() {
    let sys = System::start(&["--txn-timeout-secs", "1", "--max-line", "200"]).await;
    let mut c = Client::connect(sys.kv_addr).await.unwrap();
    c.begin().await.unwrap();
    c.put("t", "v").await.unwrap();
    // The timeout itself is what is tested here.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        c.commit().await.unwrap(),
        CommitOutcome::Aborted(vec![Bytes::from("TIMEOUT")])
    );
    assert_eq!(c.get("t").await.unwrap(), None);
    let long = format!("PUT k {}", "x".repeat(1000));
    match c.call(long.as_bytes()).await.unwrap() {
        Response::Err(e) => assert_eq!(e.code, protocol::ErrorCode::TooLarge),
        r => panic!("{r:?}"),
    }
    c.put("k", "fine").await.unwrap();
    assert_eq!(c.get("k").await.unwrap(), Some(Bytes::from("fine")));
    // Pipelined autocommit writes are answered in order, and a read after them sees them all.
    let mut p = Client::connect(sys.kv_addr).await.unwrap();
    for i in 0..500 {
        p.send(format!("PUT pipe{i:03} v{i}").as_bytes());
    }
    p.send(b"DEL pipe000");
    p.send(b"GET pipe499");
    p.send(b"SCAN pipe pipe~ LIMIT 2");
    p.flush().await.unwrap();
    for _ in 0..501 {
        assert_eq!(p.recv().await.unwrap(), Response::ok());
    }
    assert_eq!(p.recv().await.unwrap(), Response::Value("v499".into()));
    assert_eq!(
        p.recv().await.unwrap(),
        Response::Kv("pipe001".into(), "v1".into())
    );
    assert_eq!(
        p.recv().await.unwrap(),
        Response::Kv("pipe002".into(), "v2".into())
    );
    assert_eq!(p.recv().await.unwrap(), Response::End);
    // A connection that closes mid-transaction aborts it.
    let mut d = Client::connect(sys.kv_addr).await.unwrap();
    d.begin().await.unwrap();
    d.put("dropped", "x").await.unwrap();
    drop(d);
    let addr = sys.kv_addr;
    wait_until(
        Duration::from_secs(5),
        "the dropped transaction to be released",
        || async move {
            cluster_tests::status(addr)
                .await
                .is_some_and(|s| s["open_txns"] == "0")
        },
    )
    .await;
    assert_eq!(c.get("dropped").await.unwrap(), None);
    let _ = AtomicU64::new(0);
}
